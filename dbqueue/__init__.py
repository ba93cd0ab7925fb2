"""dbqueue: a background task queue that lives in the database your application already has.

`import dbqueue` loads only the exceptions: every other public name is imported on first use
(PEP 562), so a program that imports dbqueue, or a `dbqueue --help`, does not pay for
SQLAlchemy, alembic, the event bus or the counter caches until it needs them. Type checkers
read the imports under TYPE_CHECKING below; `tests/test_cold_start.py` checks that every name
in `__all__` resolves and what `import dbqueue` loads.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from dbqueue.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DbqueueError,
    EnqueueError,
    InvalidOperation,
    LockConflict,
    ResultNotStored,
    SchemaError,
    SignatureError,
    Snooze,
    TaskCancelled,
    TaskNotFound,
    TaskTimeout,
)

if TYPE_CHECKING:
    from dbqueue import bus, counters
    from dbqueue.aio import enqueue_async, enqueue_many_async, schedule_async
    from dbqueue.config import Settings, configure, inline
    from dbqueue.control import configure_queue, pause, paused_queues, resume
    from dbqueue.counters import async_counter_cache
    from dbqueue.decorator import delay, handle_asynchronously
    from dbqueue.enqueue import enqueue, enqueue_many, schedule
    from dbqueue.periodic import periodic
    from dbqueue.schema import Status
    from dbqueue.task import Task

_LAZY = {  # public name -> the module that defines it (a module itself for bus and counters)
    "bus": "dbqueue.bus",
    "counters": "dbqueue.counters",
    "enqueue_async": "dbqueue.aio",
    "enqueue_many_async": "dbqueue.aio",
    "schedule_async": "dbqueue.aio",
    "Settings": "dbqueue.config",
    "configure": "dbqueue.config",
    "inline": "dbqueue.config",
    "configure_queue": "dbqueue.control",
    "pause": "dbqueue.control",
    "paused_queues": "dbqueue.control",
    "resume": "dbqueue.control",
    "async_counter_cache": "dbqueue.counters",
    "delay": "dbqueue.decorator",
    "handle_asynchronously": "dbqueue.decorator",
    "enqueue": "dbqueue.enqueue",
    "enqueue_many": "dbqueue.enqueue",
    "schedule": "dbqueue.enqueue",
    "periodic": "dbqueue.periodic",
    "Status": "dbqueue.schema",
    "Task": "dbqueue.task",
}


if not TYPE_CHECKING:  # a type checker reads the imports above, and flags unknown names

    def __getattr__(name: str) -> Any:
        module_name = _LAZY.get(name)
        if module_name is None:
            raise AttributeError(f"module 'dbqueue' has no attribute {name!r}")
        module = importlib.import_module(module_name)
        value = module if name in _MODULES else getattr(module, name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(__all__))


_MODULES = {"bus", "counters"}  # public names that are modules


class _Package(types.ModuleType):
    """`dbqueue.enqueue` and `dbqueue.periodic` are functions that share their name with
    their module: importing the submodule (as `from dbqueue.enqueue import build` inside
    dbqueue does) makes Python set the package attribute to the module, which would hide the
    function from a later `from dbqueue import enqueue`. The function is kept instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            name not in _MODULES
            and name in _LAZY
            and isinstance(value, types.ModuleType)
            and value.__name__ == f"dbqueue.{name}"
        ):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "ConfigurationError",
    "DatabaseUnavailable",
    "DbqueueError",
    "EnqueueError",
    "InvalidOperation",
    "LockConflict",
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
