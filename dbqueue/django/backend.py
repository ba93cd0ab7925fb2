"""`dbqueue.django.TaskBackend`: Django's Tasks API (`django.tasks`) on dbqueue's queue.

    TASKS = {"default": {"BACKEND": "dbqueue.django.TaskBackend", "QUEUES": [...],
                         "OPTIONS": {"DATABASE": "default", ...}}}

A Django task becomes a row of dbqueue's `tasks` table, written on Django's own connection
(connection.borrowed) inside the caller's `transaction.atomic()`, so it commits or rolls back
with the block. Its handler is the task function's `module:qualname`; the module attribute there
is the `@task` object (a `DbqueueTask`), whose `__dbqueue_func__` is what a dbqueue worker
calls (runner.py). This module maps the Tasks API onto dbqueue's rows and back.

Priority: Django's runs larger first (-100..100), dbqueue's runs lower first, so a Django
priority p is stored as -p and read back as -value (clamped to Django's range when an operator
set something outside it). Arguments and return values are JSON by Django's contract; dbqueue
still signs and pickles them (of JSON values only). Retries are dbqueue's: OPTIONS MAX_ATTEMPTS
(default 25) or `@task(max_attempts=...)`; a failed run that will be retried reads as READY.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import pickle
from typing import Any

import sqlalchemy as sa
from django.db import connections, transaction
from django.tasks import DEFAULT_TASK_BACKEND_ALIAS, TaskResult, TaskResultStatus
from django.tasks.backends.base import BaseTaskBackend
from django.tasks.base import TASK_MAX_PRIORITY, TASK_MIN_PRIORITY, Task, TaskError
from django.tasks.exceptions import InvalidTask, InvalidTaskBackend, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued
from django.utils import timezone

from dbqueue import config, errors, retry, serializer, store
from dbqueue.django import connection
from dbqueue.django.runner import DbqueueTask, Runner, path_of
from dbqueue.enqueue import enqueue as dbqueue_enqueue
from dbqueue.schema import FINISHED, Status

OPTIONS = frozenset({"DATABASE", "MAX_ATTEMPTS", "TIMEOUT", "INLINE", "SECRET_KEY"})

_STATUS = {
    Status.QUEUED.value: TaskResultStatus.READY,
    Status.RUNNING.value: TaskResultStatus.RUNNING,
    Status.SUCCEEDED.value: TaskResultStatus.SUCCESSFUL,
    Status.FAILED.value: TaskResultStatus.FAILED,
    Status.CANCELLED.value: TaskResultStatus.FAILED,
}


def to_dbqueue_priority(priority: int) -> int:
    """Django's priority (larger runs first) as dbqueue's (lower runs first)."""
    return -int(priority)


def from_dbqueue_priority(priority: int) -> int:
    """dbqueue's priority as Django's, kept inside Django's -100..100."""
    return max(TASK_MIN_PRIORITY, min(TASK_MAX_PRIORITY, -int(priority)))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _exception_path(settings: config.Settings, row: Any) -> str:
    """The exception class of the last failed run: from its signed pickle, else read off the
    traceback's last line (`module.Class: message`)."""
    if row.exception is not None:
        try:
            exc = serializer.loads(settings.keyring(), "exception", row.handler, row.exception)
            if isinstance(exc, BaseException):
                return path_of(type(exc))
        except Exception:
            pass
    last = (row.error or "").strip().splitlines()[-1:] or ["Exception"]
    name = last[0].split(":", 1)[0].strip() or "Exception"
    return name if "." in name else f"builtins.{name}"


class TaskBackend(BaseTaskBackend):
    """Django's task backend storing tasks in dbqueue's table of the project's database.

    OPTIONS: DATABASE (the DATABASES alias, default "default"), MAX_ATTEMPTS (runs before a
    task fails for good, default 25), TIMEOUT (seconds per run, default none), INLINE (run
    each task in this process once its transaction commits: for tests and development),
    SECRET_KEY (dbqueue's signing key; default DBQUEUE_SECRET_KEY, else derived from Django's
    SECRET_KEY, so every process with the project's settings agrees).
    """

    task_class = DbqueueTask
    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        where = f"TASKS[{alias!r}]['OPTIONS']"
        unknown = set(self.options) - OPTIONS
        if unknown:
            raise InvalidTaskBackend(
                f"{where} has unknown key(s) {', '.join(sorted(unknown))}; "
                f"dbqueue's are {', '.join(sorted(OPTIONS))}"
            )
        self.database: str = self.options.get("DATABASE", "default")
        self.max_attempts: int = self.options.get("MAX_ATTEMPTS", retry.DEFAULT_MAX_ATTEMPTS)
        self.timeout: float | None = self.options.get("TIMEOUT")
        self.inline: bool = bool(self.options.get("INLINE", False))
        if not _positive_int(self.max_attempts):
            raise InvalidTaskBackend(
                f"{where}['MAX_ATTEMPTS'] must be a positive whole number, not "
                f"{self.max_attempts!r}"
            )
        if self.timeout is not None and not _positive_number(self.timeout):
            raise InvalidTaskBackend(
                f"{where}['TIMEOUT'] must be a positive number of seconds, not {self.timeout!r}"
            )
        self._settings: config.Settings | None = None

    @property
    def settings(self) -> config.Settings:
        """dbqueue's settings on Django's own connection (enqueues, results, test helpers)."""
        if self._settings is None:
            key, fallbacks = connection.signing_keys(self.options)
            self._settings = config.Settings(
                database_url=connection.engine(self.database).url.render_as_string(),
                engine=connection.engine(self.database),
                secret_key=key,
                fallback_keys=fallbacks,
                inline=False,
            )
        return self._settings

    def worker_settings(self) -> config.Settings:
        """dbqueue's settings for worker processes: their own connections, from DATABASES."""
        key, fallbacks = connection.signing_keys(self.options)
        return config.Settings(
            database_url=connection.database_url(self.database),
            secret_key=key,
            fallback_keys=fallbacks,
        )

    def check(self, **kwargs: Any) -> list[Any]:
        """Django's system checks (`manage.py check`, every runserver and migrate): the app
        that creates dbqueue's tables must be installed."""
        from django.apps import apps
        from django.core import checks

        if apps.is_installed("dbqueue.django"):
            return []
        return [
            checks.Error(
                f"TASKS[{self.alias!r}] uses dbqueue, but 'dbqueue.django' is not in "
                "INSTALLED_APPS, so `manage.py migrate` creates no tasks table",
                hint="add 'dbqueue.django' to INSTALLED_APPS, then run `manage.py migrate`",
                id="dbqueue.E001",
            )
        ]

    def validate_task(self, task: Task) -> None:
        super().validate_task(task)
        if not isinstance(task, DbqueueTask):
            raise InvalidTask(
                f"{task.module_path} was made by another backend's @task: dbqueue's workers "
                f"run tasks decorated with @task(backend={self.alias!r})"
            )
        if task.max_attempts is not None and not _positive_int(task.max_attempts):
            raise InvalidTask(
                f"max_attempts must be a positive whole number, not {task.max_attempts!r}"
            )
        if task.timeout is not None and not _positive_number(task.timeout):
            raise InvalidTask(f"timeout must be a positive number of seconds, not {task.timeout!r}")

    def enqueue(
        self, task: Task, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]
    ) -> TaskResult:
        """Store the task on Django's connection, in the caller's transaction if any."""
        self.validate_task(task)
        assert isinstance(task, DbqueueTask)
        result = TaskResult(  # normalises the arguments: TypeError unless they are JSON
            task=task,
            id="",
            status=TaskResultStatus.READY,
            enqueued_at=None,
            started_at=None,
            last_attempted_at=None,
            finished_at=None,
            args=list(args),
            kwargs=dict(kwargs),
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )
        run_at = task.run_after
        if run_at is not None and timezone.is_naive(run_at):  # USE_TZ = False
            run_at = timezone.make_aware(run_at)
        meta: dict[str, Any] = {}  # only what the row's columns do not say (rarely anything)
        if self.alias != DEFAULT_TASK_BACKEND_ALIAS:
            meta["django_backend"] = self.alias
        if run_at is not None:
            meta["run_after"] = run_at.isoformat()
        try:
            with (
                transaction.atomic(using=self.database, savepoint=False),
                connection.borrowed(self.database) as conn,
            ):
                stored = dbqueue_enqueue(
                    task.func,
                    result.args,
                    result.kwargs,
                    priority=to_dbqueue_priority(task.priority),
                    queue=task.queue_name,
                    run_at=run_at,
                    max_attempts=task.max_attempts or self.max_attempts,
                    timeout=task.timeout if task.timeout is not None else self.timeout,
                    meta=meta or None,
                    connection=conn,
                    settings=self.settings,
                )
        except errors.EnqueueError as exc:
            raise InvalidTask(str(exc)) from exc
        except sa.exc.DBAPIError as exc:
            # The driver's error as Django words it (django.db.IntegrityError, ...), as any
            # failed query on this connection would be, so callers catch what they know.
            if exc.orig is None:
                raise
            with connections[self.database].wrap_database_errors:
                raise exc.orig from exc
        object.__setattr__(result, "id", str(stored.id))
        object.__setattr__(result, "enqueued_at", timezone.now())
        if self.inline:
            from dbqueue.django import testing

            transaction.on_commit(
                functools.partial(testing.run_task, self, stored.id), using=self.database
            )
        task_enqueued.send(type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> TaskResult:
        """The task's result as stored now, read on Django's connection (so a test sees the
        tasks of its own transaction)."""
        try:
            task_id = int(result_id)
        except (TypeError, ValueError):
            raise TaskResultDoesNotExist(f"no task {result_id!r} (ids are numbers)") from None
        with connection.borrowed(self.database) as conn:
            row = store.get(conn, task_id)
        if row is None:
            raise TaskResultDoesNotExist(f"no task {result_id!r} (it may have been pruned)")
        return self.result_from_row(row)

    def result_from_row(self, row: Any) -> TaskResult:
        """Django's TaskResult for one row of dbqueue's `tasks`."""
        settings = self.settings
        try:
            runner = serializer.import_handler(row.handler)
        except (ImportError, AttributeError) as exc:
            raise TaskResultDoesNotExist(
                f"task {row.id} runs {row.handler}, which does not import here: {exc}"
            ) from exc
        if not isinstance(runner, Runner):
            raise TaskResultDoesNotExist(f"task {row.id} ({row.handler}) is not a Django task")
        _ref, args, kwargs = pickle.loads(
            serializer.verify(settings.keyring(), "payload", row.handler, row.payload)
        )
        meta = row.meta
        if isinstance(meta, str):  # Django's psycopg connection leaves jsonb as text
            meta = json.loads(meta)
        meta = meta or {}
        run_after = meta.get("run_after")
        try:
            task = runner.task.using(
                priority=from_dbqueue_priority(row.priority),
                queue_name=row.queue,
                backend=meta.get("django_backend", DEFAULT_TASK_BACKEND_ALIAS),
                run_after=dt.datetime.fromisoformat(run_after) if run_after else None,
            )
        except InvalidTask:  # moved by an operator to a queue this backend does not list
            task = runner.task
        status = _STATUS[row.status]
        task_errors = []
        if row.error and row.status != Status.SUCCEEDED.value:
            task_errors.append(
                TaskError(exception_class_path=_exception_path(settings, row), traceback=row.error)
            )
        result = TaskResult(
            task=task,
            id=str(row.id),
            status=status,
            enqueued_at=row.created_at,
            started_at=row.started_at,
            last_attempted_at=row.started_at,
            finished_at=row.finished_at if row.status in FINISHED else None,
            args=list(args),
            kwargs=dict(kwargs),
            backend=task.backend,
            errors=task_errors,
            worker_ids=[row.locked_by or "dbqueue"] * row.attempts,
        )
        if status == TaskResultStatus.SUCCESSFUL and row.result is not None:
            value = serializer.loads(settings.keyring(), "result", row.handler, row.result)
            object.__setattr__(result, "_return_value", value)
        return result
