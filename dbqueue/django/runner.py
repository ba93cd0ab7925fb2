"""What a dbqueue worker runs for a Django task: `DbqueueTask` (the backend's `task_class`)
and its `__dbqueue_func__`, the runner.

A Django task's row names the task function's `module:qualname`; the module attribute there is
the `@task` object, and dbqueue's worker calls what `serializer.undecorated` finds on it: the
runner, which runs the function as Django's own backends do (its TaskContext, the
task_started/task_finished signals, a JSON return value) and closes Django's stale connections
around it, as Django does around a request.
"""

from __future__ import annotations

import contextvars
import os
import socket
from dataclasses import dataclass
from inspect import iscoroutinefunction
from typing import Any

from django.db import connections
from django.tasks import DEFAULT_TASK_BACKEND_ALIAS, TaskContext, TaskResult, TaskResultStatus
from django.tasks.base import Task, TaskError
from django.tasks.signals import task_finished, task_started
from django.utils import timezone
from django.utils.json import normalize_json

from dbqueue import hooks, retry


class ResultNotJSON(TypeError):
    """A task returned what Django's contract does not allow (not JSON): never retried, the
    next run would return the same."""


retry.NOT_RETRIED = (*retry.NOT_RETRIED, ResultNotJSON)


def _json(value: Any, task: Task) -> Any:
    try:
        return normalize_json(value)
    except TypeError as exc:
        raise ResultNotJSON(
            f"{task.module_path} returned {type(value).__name__}, which is not JSON ({exc}): "
            "return str, int, float, bool, None, lists and dicts of them"
        ) from exc


# The running task as a dbqueue hook sees it (id, attempts), for the function's TaskContext.
_running: contextvars.ContextVar[hooks.TaskView | None] = contextvars.ContextVar(
    "dbqueue_django_running", default=None
)


def _remember_view(view: hooks.TaskView, call_next: Any) -> Any:
    """An around_task hook of every Django task: the executor passes the row's view to hooks
    only, and the runner needs its id and attempts to build Django's TaskContext."""
    token = _running.set(view)
    try:
        return call_next()
    finally:
        _running.reset(token)


@dataclass(frozen=True, slots=True, kw_only=True)
class DbqueueTask(Task):
    """Django's Task, with dbqueue's options: `@task(max_attempts=3, timeout=60)`."""

    max_attempts: int | None = None  # runs before it fails for good; OPTIONS' MAX_ATTEMPTS
    timeout: float | None = None  # seconds per run; OPTIONS' TIMEOUT

    @property
    def __dbqueue_func__(self) -> Runner:
        """What a dbqueue worker calls for this task (serializer.undecorated)."""
        return Runner(self)


def _close_old_connections() -> None:
    """Django's request-boundary cleanup, for a task's boundaries in a worker: drop broken or
    expired connections (CONN_MAX_AGE). Never one inside an atomic block: a task run in a
    test's transaction (testing.run_tasks) must keep it."""
    for conn in connections.all(initialized_only=True):
        if not conn.in_atomic_block:
            conn.close_if_unusable_or_obsolete()


class Runner:
    """Runs one Django task in a worker, as Django's own backends do: its TaskContext when it
    takes one, task_started/task_finished signals, a JSON-normalised return value."""

    def __init__(self, task: DbqueueTask) -> None:
        self.task = task
        self.__dbqueue_hooks__ = {"around_task": _remember_view}

    def _result(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TaskResult:
        view = _running.get()
        task = self.task
        if view is not None:
            backend = view.meta.get("django_backend", DEFAULT_TASK_BACKEND_ALIAS)
            if backend != task.backend:
                task = task.using(backend=backend)
        now = timezone.now()
        return TaskResult(
            task=task,
            id=str(view.id) if view is not None else "",
            status=TaskResultStatus.RUNNING,
            enqueued_at=None,
            started_at=now,
            last_attempted_at=now,
            finished_at=None,
            args=list(args),
            kwargs=dict(kwargs),
            backend=task.backend,
            errors=[],
            worker_ids=[f"{socket.gethostname()}:{os.getpid()}"] * (view.attempts if view else 1),
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self._result(args, kwargs)
        if self.task.takes_context:
            args = (TaskContext(task_result=result), *args)
        if iscoroutinefunction(self.task.func):
            return self._acall(result, args, kwargs)
        _close_old_connections()
        task_started.send(type(self.task.get_backend()), task_result=result)
        try:
            value = _json(self.task.func(*args, **kwargs), self.task)
        except BaseException as exc:
            self._finished(result, exc)
            raise
        finally:
            _close_old_connections()
        self._finished(result, None)
        return value

    async def _acall(self, result: TaskResult, args: tuple[Any, ...], kwargs: Any) -> Any:
        task_started.send(type(self.task.get_backend()), task_result=result)
        try:
            value = _json(await self.task.func(*args, **kwargs), self.task)
        except BaseException as exc:
            self._finished(result, exc)
            raise
        self._finished(result, None)
        return value

    def _finished(self, result: TaskResult, exc: BaseException | None) -> None:
        object.__setattr__(result, "finished_at", timezone.now())
        if exc is None:
            object.__setattr__(result, "status", TaskResultStatus.SUCCESSFUL)
        else:
            object.__setattr__(result, "status", TaskResultStatus.FAILED)
            result.errors.append(TaskError(exception_class_path=path_of(type(exc)), traceback=""))
        task_finished.send(type(self.task.get_backend()), task_result=result)


def path_of(cls: type) -> str:
    """`module.QualName` of a class, as Django's TaskError names an exception class."""
    return f"{cls.__module__}.{cls.__qualname__}"
