"""The exceptions dbqueue raises to its users; each message says what to do next."""

from __future__ import annotations


class DbqueueError(Exception):
    """Base class of every error dbqueue raises on purpose: `except dbqueue.DbqueueError`
    catches them all. Each message is one line saying what went wrong and what to do."""


class ConfigurationError(DbqueueError):
    """Settings that cannot work: a bad URL, a missing driver, an unusable key, a wrong
    password, a PgBouncer setting that contradicts the URL. Retrying will not help; the CLI
    exits with status 2."""


class EnqueueError(DbqueueError, ValueError):
    """A task that cannot be stored: unpicklable arguments, a payload over the size limit, a
    callable workers cannot import, a bad option. Raised before anything is stored (also a
    `ValueError`)."""


class SchemaError(DbqueueError):
    """The database schema is missing, older or newer than this version of dbqueue: run
    `dbqueue migrate` (or upgrade dbqueue, when the schema is newer). The CLI exits with 2."""


class DatabaseUnavailable(DbqueueError):
    """The database cannot be reached (down, restarting, network cut); nothing was stored.
    Workers retry on their own; an application enqueueing gets this error and decides."""


class LockConflict(DbqueueError):
    """MySQL/MariaDB ended a statement or transaction over a lock conflict (deadlock 1213,
    lock wait timeout 1205). dbqueue runs its own transactions again a few times before
    raising this; inside the application's transaction it raises it at once, because only the
    application can run its whole transaction again (after rolling it back)."""


class SignatureError(DbqueueError):
    """A stored envelope whose signature did not verify (another key, a forged or damaged
    row): it is never unpickled. Users see it as a failed task or a `ResultNotStored`."""


class ResultNotStored(DbqueueError):
    """The task's result or exception could not be stored or read back; the reason says why."""


class TaskNotFound(DbqueueError, LookupError):
    """No task has this id (it may have been pruned). Also a `LookupError`."""


class TaskTimeout(DbqueueError, TimeoutError):
    """Raised inside a task that ran past its timeout (the run fails and is retried per its
    policy), and by `Task.wait()` when waiting ran out. Also a `TimeoutError`."""


class HandlerNotAllowed(DbqueueError):
    """The task's handler is outside DBQUEUE_ALLOWED_MODULES: the worker fails the task
    without unpickling it, and does not retry it."""


class TaskCancelled(DbqueueError):
    """Raised inside a running task whose cancellation was requested (Task.cancel(),
    `dbqueue cancel`); the run is recorded `cancelled`, not retried."""


class InvalidOperation(DbqueueError):
    """The operation does not apply to the task in its current state (the message says why)."""


class Snooze(Exception):
    """Raise (or return) `Snooze(seconds)` from a task to run it again `seconds` from now
    without spending an attempt and without recording an error.

    Args:
        seconds: how long to wait before the next run, >= 0.

    Raises:
        ValueError: `seconds` is not a number >= 0.
    """

    def __init__(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError(f"Snooze takes a number of seconds >= 0, not {seconds!r}")
        super().__init__(f"snoozed for {seconds:g}s")
        self.seconds = float(seconds)
