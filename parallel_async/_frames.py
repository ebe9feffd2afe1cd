"""pandas and polars DataFrames in and out of an enrichment (optional extras, imported lazily).

A DataFrame in gives a DataFrame out: the same rows in the same order (pandas: the same index),
the input columns untouched, then one typed column per output field (pandas nullable dtypes
``Int64``/``Float64``/``boolean``/``string``; polars ``Int64``/``Float64``/``Boolean``/
``String``/``List``), then ``_status``, ``_error`` and ``_run_id``. Fields of type ``json``
(nested objects) are Python objects in pandas and JSON text in polars.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import msgspec

from ._errors import InvalidArgumentError
from ._fields import RESERVED_COLUMNS, OutputSpec

__all__ = [
    "FrameBuilder",
    "FrameKind",
    "check_clashes",
    "frame_columns",
    "frame_kind",
    "frame_rows",
]

FrameKind = Literal["pandas", "polars"]
_CHUNK = 2_000
_PANDAS_DTYPES = {"int": "Int64", "float": "Float64", "bool": "boolean", "str": "string"}


def frame_kind(records: object) -> FrameKind | None:
    """Which DataFrame ``records`` is, without importing a library that is not loaded."""
    pandas = sys.modules.get("pandas")
    if pandas is not None and isinstance(records, pandas.DataFrame):
        return "pandas"
    polars = sys.modules.get("polars")
    if polars is not None and isinstance(records, polars.DataFrame):
        return "polars"
    return None


def frame_columns(df: Any) -> list[str]:
    """The column names, as strings."""
    return [str(c) for c in df.columns]


def check_clashes(columns: Sequence[str], spec: OutputSpec) -> None:
    """Refuse output fields named like an input column: the input stays untouched."""
    taken = set(columns)
    clash = [n for n in (*spec.names, *RESERVED_COLUMNS) if n in taken]
    if clash:
        raise InvalidArgumentError(
            f"the input already has column(s) {', '.join(map(repr, clash))}: rename the output "
            "field(s) or the input column(s), the input columns are never overwritten"
        )


def frame_rows(df: Any, kind: FrameKind) -> Iterator[dict[str, Any]]:
    """The rows as plain dicts of Python values (missing values: ``None``), read in chunks."""
    names = frame_columns(df)
    if kind == "polars":
        for row in df.iter_rows():
            yield {n: _plain(v) for n, v in zip(names, row, strict=True)}
        return
    for start in range(0, len(df), _CHUNK):
        chunk = df.iloc[start : start + _CHUNK]
        for row in chunk.itertuples(index=False, name=None):
            yield {n: _plain(v) for n, v in zip(names, row, strict=True)}


def _plain(value: Any) -> Any:
    """A JSON-ready Python value: numpy scalars unboxed, NaN/NA/NaT as ``None``."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and type(value).__module__ == "numpy":
        return _plain(item())
    pandas = sys.modules.get("pandas")
    if pandas is not None and (value is pandas.NA or value is pandas.NaT):
        return None
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class FrameBuilder:
    """Collects the new columns row by row, then builds the output DataFrame."""

    def __init__(self, df: Any, kind: FrameKind, spec: OutputSpec) -> None:
        self._df = df
        self._kind = kind
        self._spec = spec
        self._columns: dict[str, list[Any]] = {n: [] for n in (*spec.names, *RESERVED_COLUMNS)}

    def add(self, row: dict[str, Any]) -> None:
        """Take the new columns' values of the next row (rows come in input order)."""
        for name, values in self._columns.items():
            values.append(row.get(name))

    def build(self) -> Any:
        """The input DataFrame with the new columns."""
        if self._kind == "polars":
            return self._polars()
        return self._pandas()

    def _pandas(self) -> Any:
        import pandas as pd

        out = self._df.copy(deep=False)
        types = {f.name: f.type for f in self._spec.fields}
        for name, values in self._columns.items():
            dtype = _PANDAS_DTYPES.get(types.get(name, "str"), object)
            out[name] = pd.Series(values, index=self._df.index, dtype=dtype)
        return out

    def _polars(self) -> Any:
        import polars as pl

        scalars = {"int": pl.Int64, "float": pl.Float64, "bool": pl.Boolean, "str": pl.String}
        series = []
        types = {f.name: f for f in self._spec.fields}
        for name, values in self._columns.items():
            field = types.get(name)
            if field is None:
                series.append(pl.Series(name, values, dtype=pl.String))
            elif field.item_type is not None:
                dtype = pl.List(scalars[field.item_type])
                series.append(pl.Series(name, values, dtype=dtype))
            elif field.type in scalars:
                series.append(pl.Series(name, values, dtype=scalars[field.type]))
            else:
                text = [None if v is None else msgspec.json.encode(v).decode() for v in values]
                series.append(pl.Series(name, text, dtype=pl.String))
        return self._df.with_columns(series)
