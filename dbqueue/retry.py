"""When and whether a failed run is tried again. Pure functions, no SQL.

The rule is delayed_job's: wait `5 + attempts**4` seconds, up to `max_attempts` runs. A task
function can override the delay by carrying a `retry_delay(attempts, exception)` attribute
(set by `handle_asynchronously(retry_delay=...)`), and some failures are never retried.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dbqueue import errors

DEFAULT_MAX_ATTEMPTS = 25

#: Failures that another run cannot fix: retrying them would only repeat the same outcome.
NOT_RETRIED: tuple[type[BaseException], ...] = (errors.SignatureError, errors.HandlerNotAllowed)


def backoff(attempts: int) -> float:
    """Seconds to wait after the `attempts`-th failed run."""
    return float(5 + attempts**4)


def should_retry(attempts: int, max_attempts: int, exc: BaseException | None = None) -> bool:
    """Whether a task that failed its `attempts`-th run goes back to the queue."""
    if exc is not None and isinstance(exc, NOT_RETRIED):
        return False
    return attempts < max_attempts


def delay_for(func: Any, attempts: int, exc: BaseException) -> float:
    """The task's own `retry_delay` when it has one, else the default backoff."""
    custom: Callable[[int, BaseException], float] | None = getattr(func, "retry_delay", None)
    if custom is not None:
        try:
            return max(0.0, float(custom(attempts, exc)))
        except Exception:  # a broken override must not lose the task
            return backoff(attempts)
    return backoff(attempts)
