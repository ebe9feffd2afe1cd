"""What runs cost: one dated price table, overridable, for ``--dry-run`` and ``--max-cost``.

Prices change; this table is what Parallel's pricing pages said on `PRICES_AS_OF`. Override
it with a JSON file of ``{"processor": USD per 1,000 runs}`` (``--prices FILE`` or the
``PARALLEL_ASYNC_PRICES`` environment variable): its entries replace or add to the table's.
Only completed runs are billed, so an estimate that counts every run is an upper bound.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping

from ._errors import InvalidArgumentError

__all__ = ["PRICES_AS_OF", "PRICES_ENV", "PRICES_PER_1000", "load_prices", "price_per_run"]

PRICES_AS_OF = "2026-11"
"""When `PRICES_PER_1000` was read from Parallel's pricing pages."""
PRICES_ENV = "PARALLEL_ASYNC_PRICES"
"""Environment variable naming a JSON price file that overrides the table."""
PRICES_PER_1000: Mapping[str, float] = {
    "lite": 5.0,
    "base": 10.0,
    "core": 25.0,
    "core2x": 50.0,
    "pro": 100.0,
    "ultra": 300.0,
    "ultra2x": 600.0,
    "ultra4x": 1200.0,
    "ultra8x": 2400.0,
}
"""USD per 1,000 runs, by processor; a ``-fast`` variant costs what its processor does."""


def load_prices(path: str | os.PathLike[str] | None = None) -> dict[str, float]:
    """The table with the overrides of ``path`` (else of ``$PARALLEL_ASYNC_PRICES``) applied.

    Raises:
        InvalidArgumentError: the file cannot be read or is not ``{"name": number}``.
    """
    prices = dict(PRICES_PER_1000)
    source = path if path is not None else os.environ.get(PRICES_ENV) or None
    if source is None:
        return prices
    file = pathlib.Path(source)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read the price file {file}: {exc.strerror}") from None
    except ValueError as exc:
        raise InvalidArgumentError(f"the price file {file} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError(
            f'the price file {file} must be a JSON object like {{"base": 10}} (USD per 1,000 runs)'
        )
    for name, value in data.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise InvalidArgumentError(
                f"the price file {file}: {name!r} must be USD per 1,000 runs (a number >= 0)"
            )
        prices[str(name)] = float(value)
    return prices


def price_per_run(processor: str, prices: Mapping[str, float] | None = None) -> float | None:
    """USD per run of ``processor`` (``None`` if the table does not know it)."""
    table = PRICES_PER_1000 if prices is None else prices
    per_1000 = table.get(processor)
    if per_1000 is None and processor.endswith("-fast"):
        per_1000 = table.get(processor.removesuffix("-fast"))
    return None if per_1000 is None else per_1000 / 1000
