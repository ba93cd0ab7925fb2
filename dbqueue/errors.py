"""The exceptions dbqueue raises to its users; each message says what to do next."""

from __future__ import annotations


class DbqueueError(Exception):
    """Base class of every error dbqueue raises on purpose."""


class ConfigurationError(DbqueueError):
    """Settings that cannot work: a bad URL, a missing driver, an unusable key."""


class EnqueueError(DbqueueError, ValueError):
    """A task that cannot be stored: unpicklable arguments, a callable workers cannot import."""


class SchemaError(DbqueueError):
    """The database schema is missing, older or newer than this version of dbqueue."""


class DatabaseUnavailable(DbqueueError):
    """The database cannot be reached; nothing was stored."""


class SignatureError(DbqueueError):
    """A stored envelope whose signature did not verify: it is never unpickled."""


class ResultNotStored(DbqueueError):
    """The task's result or exception could not be stored or read back; the reason says why."""


class TaskNotFound(DbqueueError, LookupError):
    """No task has this id (it may have been pruned)."""


class TaskTimeout(DbqueueError, TimeoutError):
    """Raised in a task that ran past its timeout, and by Task.wait() when waiting ran out."""


class HandlerNotAllowed(DbqueueError):
    """The task's handler is outside DBQUEUE_ALLOWED_MODULES."""


class TaskCancelled(DbqueueError):
    """Raised inside a running task whose cancellation was requested (Task.cancel(),
    `dbqueue cancel`); the run is recorded `cancelled`, not retried."""


class InvalidOperation(DbqueueError):
    """The operation does not apply to the task in its current state (the message says why)."""


class Snooze(Exception):
    """Raise (or return) `Snooze(seconds)` from a task to run it again `seconds` from now
    without spending an attempt and without recording an error."""

    def __init__(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError(f"Snooze takes a number of seconds >= 0, not {seconds!r}")
        super().__init__(f"snoozed for {seconds:g}s")
        self.seconds = float(seconds)
