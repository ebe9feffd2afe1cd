"""Tables in and out of ``parallel-async enrich``: CSV, JSON lines and Parquet, streamed.

Readers yield one dict per row (CSV cells stay strings, an empty cell ``""``; Parquet values
keep their types), and a `BadRecord` for a line that cannot be read (reported with its line
number; the job goes on). Writers put the input columns first, unchanged and in order, then
the output fields, then ``_status``, ``_error``, ``_run_id``; a file is written beside its
destination and renamed over it only when complete. Parquet needs the ``parquet`` extra.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import pathlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

import msgspec

from .._enrich_job import BadRecord
from .._errors import InvalidArgumentError
from .._fields import RESERVED_COLUMNS, OutputSpec

__all__ = ["FORMATS", "TableReader", "TableWriter", "detect_format", "need"]

FORMATS = ("csv", "jsonl", "parquet")
_EXTENSIONS = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_PARQUET_BATCH = 1_000
_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()

BadLine = Callable[[int, str], None]


def need(module: str, extra: str) -> Any:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise InvalidArgumentError(
            f"this needs {module.partition('.')[0]}: pip install 'parallel-async[{extra}]'"
        ) from None


def detect_format(path: str, given: str | None) -> str:
    """The format of ``path``: ``given``, else from its extension."""
    if given is not None:
        return given
    if path == "-":
        raise InvalidArgumentError("reading or writing '-' needs --format csv, jsonl or parquet")
    fmt = _EXTENSIONS.get(pathlib.Path(path).suffix.lower())
    if fmt is None:
        raise InvalidArgumentError(
            f"cannot tell the format of {path!r} from its extension: name it .csv, .jsonl or "
            ".parquet, or give --format"
        )
    return fmt


class TableReader:
    """Rows of an input table. ``columns`` is known before the first row (CSV, Parquet).

    Args:
        path: a file, or ``-`` for stdin.
        fmt: ``csv``, ``jsonl`` or ``parquet``.
        on_bad: called with (line number, message) for each line that cannot be read.
    """

    def __init__(self, path: str, fmt: str, on_bad: BadLine) -> None:
        self.path = path
        self.fmt = fmt
        self._on_bad = on_bad
        self.columns: list[str] | None = None
        self.arrow_schema: Any = None
        self.rows: int | None = None  # known up front for Parquet
        self._stack = contextlib.ExitStack()
        try:
            self._open()
        except OSError as exc:
            self._stack.close()
            raise InvalidArgumentError(f"cannot read {path}: {exc.strerror or exc}") from None

    def _binary(self) -> IO[bytes]:
        if self.path == "-":
            return sys.stdin.buffer
        return self._stack.enter_context(open(self.path, "rb"))

    def _open(self) -> None:
        if self.fmt == "parquet":
            pq = need("pyarrow.parquet", "parquet")
            source: Any = self.path if self.path != "-" else io.BytesIO(sys.stdin.buffer.read())
            try:
                self._parquet = pq.ParquetFile(source)
            except Exception as exc:  # pyarrow's errors are its own
                raise InvalidArgumentError(f"{self.path} is not a Parquet file ({exc})") from None
            self.arrow_schema = self._parquet.schema_arrow
            self.columns = list(self.arrow_schema.names)
            self.rows = self._parquet.metadata.num_rows
            return
        self._file = self._binary()
        if self.fmt == "csv":
            self._text = io.TextIOWrapper(self._file, encoding="utf-8-sig", newline="")
            self._stack.callback(self._text.detach)
            self._csv = csv.reader(self._text)
            try:
                header = next(self._csv, None)
            except (csv.Error, UnicodeDecodeError) as exc:
                raise InvalidArgumentError(f"{self.path}: unreadable header ({exc})") from None
            if not header:
                raise InvalidArgumentError(f"{self.path} is empty: a CSV file needs a header row")
            duplicated = sorted({c for c in header if header.count(c) > 1})
            if duplicated:
                raise InvalidArgumentError(
                    f"{self.path}: the header names {', '.join(map(repr, duplicated))} twice"
                )
            self.columns = header

    def records(self) -> Iterator[dict[str, Any] | BadRecord]:
        """The rows, lazily."""
        if self.fmt == "parquet":
            for batch in self._parquet.iter_batches(batch_size=_PARQUET_BATCH):
                yield from batch.to_pylist()
        elif self.fmt == "csv":
            yield from self._csv_records()
        else:
            yield from self._jsonl_records()

    def _bad(self, line: int, message: str) -> BadRecord:
        self._on_bad(line, message)
        return BadRecord(f"line {line}: {message}")

    def _csv_records(self) -> Iterator[dict[str, Any] | BadRecord]:
        assert self.columns is not None  # noqa: S101
        header = self.columns
        width = len(header)
        while True:
            line = self._csv.line_num + 1
            try:
                cells = next(self._csv)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                yield self._bad(line, f"unreadable CSV ({exc})")
                continue
            if not cells:
                continue  # a blank line
            if len(cells) != width:
                yield self._bad(line, f"{len(cells)} cells where the header has {width}")
                continue
            yield dict(zip(header, cells, strict=True))

    def _jsonl_records(self) -> Iterator[dict[str, Any] | BadRecord]:
        for number, raw in enumerate(self._file, 1):
            if not raw.strip():
                continue
            try:
                value = _DECODER.decode(raw)
            except msgspec.DecodeError as exc:
                yield self._bad(number, f"malformed JSON ({exc})")
                continue
            if not isinstance(value, dict):
                yield self._bad(number, f"a JSON {type(value).__name__}, not an object")
                continue
            yield value

    def close(self) -> None:
        """Close the file."""
        self._stack.close()


class TableWriter:
    """Writes enriched rows to a file (atomically) or stdout.

    Args:
        path: a file, or ``-`` for stdout.
        fmt: ``csv``, ``jsonl`` or ``parquet``.
        columns: the input columns (``None``: those of the first row).
        spec: the output spec (its fields are the next columns, typed).
        arrow_schema: the input's Arrow schema (Parquet in): input columns keep their types.
    """

    def __init__(
        self,
        path: str,
        fmt: str,
        columns: Sequence[str] | None,
        spec: OutputSpec,
        arrow_schema: Any = None,
    ) -> None:
        self.path = path
        self.fmt = fmt
        self._columns = None if columns is None else list(columns)
        self._spec = spec
        self._input_schema = arrow_schema
        self._header: list[str] | None = None
        self._pending: list[Mapping[str, Any]] = []
        self._parquet: Any = None
        self.rows = 0
        if path == "-":
            self._partial = None
            self._out: IO[bytes] = sys.stdout.buffer
        else:
            target = pathlib.Path(path)
            self._partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
            try:
                self._out = open(self._partial, "wb")  # noqa: SIM115
            except OSError as exc:
                raise InvalidArgumentError(f"cannot write {path}: {exc.strerror}") from None
        if fmt == "csv":
            self._text = io.TextIOWrapper(self._out, encoding="utf-8", newline="")
            self._csv = csv.writer(self._text)
        if fmt == "parquet":
            need("pyarrow", "parquet")

    def _names(self, first: Mapping[str, Any]) -> list[str]:
        if self._columns is None:
            tail = {*self._spec.names, *RESERVED_COLUMNS}
            self._columns = [c for c in first if c not in tail]
        return [*self._columns, *self._spec.names, *RESERVED_COLUMNS]

    def write(self, row: Mapping[str, Any]) -> None:
        """Write the next row."""
        self.rows += 1
        if self._header is None:
            self._header = self._names(row)
            if self.fmt == "csv":
                self._csv.writerow(self._header)
        if self.fmt == "csv":
            self._csv.writerow([_cell(row.get(c)) for c in self._header])
        elif self.fmt == "jsonl":
            self._out.write(_ENCODER.encode(row) + b"\n")
        else:
            self._pending.append(row)
            if len(self._pending) >= _PARQUET_BATCH:
                self._flush_parquet()

    def _flush_parquet(self) -> None:
        pa = need("pyarrow", "parquet")
        if not self._pending:
            return
        assert self._header is not None  # noqa: S101
        json_fields = {f.name for f in self._spec.fields if f.type == "json"}
        rows = [
            {c: _json_text(r.get(c)) if c in json_fields else r.get(c) for c in self._header}
            for r in self._pending
        ]
        self._pending = []
        if self._parquet is None:
            schema = _arrow_schema(
                pa,
                self._header,
                inputs=self._columns or [],
                rows=rows,
                input_schema=self._input_schema,
                spec=self._spec,
            )
            pq = need("pyarrow.parquet", "parquet")
            self._parquet = pq.ParquetWriter(self._out, schema)
        table = pa.Table.from_pylist(rows, schema=self._parquet.schema)
        self._parquet.write_table(table)

    def commit(self) -> None:
        """Finish the table and put it in place."""
        if self.fmt == "csv":
            if self._header is None:
                self._csv.writerow([*(self._columns or []), *self._spec.names, *RESERVED_COLUMNS])
            self._text.flush()
            self._text.detach()
        elif self.fmt == "parquet":
            if self._header is None:
                self._header = [*(self._columns or []), *self._spec.names, *RESERVED_COLUMNS]
            if self._parquet is None and not self._pending:
                pa = need("pyarrow", "parquet")
                pq = need("pyarrow.parquet", "parquet")
                schema = _arrow_schema(
                    pa,
                    self._header,
                    inputs=self._columns or [],
                    rows=[],
                    input_schema=self._input_schema,
                    spec=self._spec,
                )
                self._parquet = pq.ParquetWriter(self._out, schema)
            self._flush_parquet()
            self._parquet.close()
        self._out.flush()
        if self._partial is not None:
            self._out.close()
            os.replace(self._partial, self.path)

    def abort(self) -> None:
        """Drop what was written (the destination is left as it was)."""
        if self._partial is not None:
            with contextlib.suppress(OSError):
                self._out.close()
            with contextlib.suppress(OSError):
                self._partial.unlink()


def _json_text(value: Any) -> str | None:
    return None if value is None else _ENCODER.encode(value).decode()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | dict):
        return _ENCODER.encode(value).decode()
    return str(value)


def _arrow_schema(
    pa: Any,
    header: list[str],
    *,
    inputs: list[str],
    rows: list[dict[str, Any]],
    input_schema: Any,
    spec: OutputSpec,
) -> Any:
    """Input columns as they were (Parquet in) or inferred; typed fields; string statuses."""
    scalars = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "str": pa.string()}
    fields = []
    inferred = None
    if input_schema is None and rows:
        inferred = pa.Table.from_pylist([{c: r.get(c) for c in inputs} for r in rows]).schema
    for name in inputs:
        if input_schema is not None and name in input_schema.names:
            fields.append(input_schema.field(name))
        elif inferred is not None and name in inferred.names:
            kind = inferred.field(name).type
            fields.append(pa.field(name, pa.string() if pa.types.is_null(kind) else kind))
        else:
            fields.append(pa.field(name, pa.string()))
    for field in spec.fields:
        item = field.item_type
        if item is not None:
            fields.append(pa.field(field.name, pa.list_(scalars[item])))
        else:
            fields.append(pa.field(field.name, scalars.get(field.type, pa.string())))
    fields.extend(pa.field(c, pa.string()) for c in RESERVED_COLUMNS)
    assert [f.name for f in fields] == header  # noqa: S101
    return pa.schema(fields)
