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
