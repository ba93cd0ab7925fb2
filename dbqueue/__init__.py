"""dbqueue: a background task queue that lives in the database your application already has."""

from __future__ import annotations

from dbqueue import bus, counters
from dbqueue.aio import enqueue_async, enqueue_many_async, schedule_async
from dbqueue.config import Settings, configure, inline
from dbqueue.control import configure_queue, pause, paused_queues, resume
from dbqueue.counters import async_counter_cache
from dbqueue.decorator import delay, handle_asynchronously
from dbqueue.enqueue import enqueue, enqueue_many, schedule
from dbqueue.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DbqueueError,
    EnqueueError,
    InvalidOperation,
    ResultNotStored,
    SchemaError,
    SignatureError,
    Snooze,
    TaskCancelled,
    TaskNotFound,
    TaskTimeout,
)
from dbqueue.periodic import periodic
from dbqueue.schema import Status
from dbqueue.task import Task

__all__ = [
    "ConfigurationError",
    "DatabaseUnavailable",
    "DbqueueError",
    "EnqueueError",
    "InvalidOperation",
    "ResultNotStored",
    "SchemaError",
    "Settings",
    "SignatureError",
    "Snooze",
    "Status",
    "Task",
    "TaskCancelled",
    "TaskNotFound",
    "TaskTimeout",
    "async_counter_cache",
    "bus",
    "configure",
    "configure_queue",
    "counters",
    "delay",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "enqueue_many_async",
    "handle_asynchronously",
    "inline",
    "pause",
    "paused_queues",
    "periodic",
    "resume",
    "schedule",
    "schedule_async",
]
