"""One deadline type on one clock (``time.monotonic``), and the one "positive seconds" check.

A `Deadline` is an instant that may be "never": callers ask how much time is left instead of
juggling ``None`` and ``math.inf``. It remembers the timeout it was made from and what that
timeout bounds, so the error raised when it passes can say which timeout it was.
"""

from __future__ import annotations

import math
import time
from enum import Enum

from ._errors import InvalidArgumentError

__all__ = ["NEVER", "Deadline", "Scope", "check_seconds", "now"]

now = time.monotonic
"""The clock every deadline is on."""


class Scope(Enum):
    """What a deadline bounds: named in timeout errors."""

    CALL = "call"  # one call's own ``timeout`` (result(), execute(), a request)
    RUN = "run"  # one run's ``run_timeout`` in a fan-out
    FANOUT = "fanout"  # a whole fan-out's ``timeout``


class Deadline:
    """An instant on `now`'s clock, or never."""

    __slots__ = ("at", "scope", "timeout")

    def __init__(self, at: float, timeout: float | None, scope: Scope = Scope.CALL) -> None:
        self.at = at
        self.timeout = timeout
        self.scope = scope

    @classmethod
    def after(
        cls, timeout: float | None, scope: Scope = Scope.CALL, *, start: float | None = None
    ) -> Deadline:
        """``timeout`` seconds from ``start`` (default: now); ``None`` is never."""
        if timeout is None:
            return cls(math.inf, None, scope)
        return cls((now() if start is None else start) + timeout, timeout, scope)

    @property
    def is_never(self) -> bool:
        """True when there is no deadline."""
        return self.at == math.inf

    def remaining(self, at: float | None = None) -> float:
        """Seconds left (``inf`` for never, never negative)."""
        return max(0.0, self.at - (now() if at is None else at))

    def passed(self, at: float | None = None) -> bool:
        """True once the instant is reached."""
        return (now() if at is None else at) >= self.at

    def earliest(self, other: Deadline) -> Deadline:
        """The sooner of two deadlines (the first on a tie)."""
        return other if other.at < self.at else self

    def as_float(self) -> float | None:
        """The instant for APIs that take ``None`` for never (the retry layer)."""
        return None if self.is_never else self.at

    def __repr__(self) -> str:
        return f"Deadline({self.scope.value}, timeout={self.timeout})"


NEVER = Deadline(math.inf, None)


def check_seconds(
    name: str, value: object, *, meaning: str | None = None, allow_none: bool = True
) -> float | None:
    """``value`` as positive seconds; an `InvalidArgumentError` that says what to pass otherwise.

    The one validator for "positive seconds" (``meaning`` says what the value is for).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        if meaning is not None:
            none = ", or None" if allow_none else ""
            message = f"{name} is {meaning} in seconds (> 0{none}), got {value!r}"
        else:
            none = " or None" if allow_none else ""
            message = f"{name} must be a positive number of seconds{none}, got {value!r}"
        raise InvalidArgumentError(message)
    if value == math.inf:
        return None if allow_none else float(value)
    return float(value)
