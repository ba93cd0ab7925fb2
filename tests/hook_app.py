"""Hooks registered by an application module: `dbqueue work --import tests.hook_app` loads
them in the worker process. Each hook appends (event, task id, detail) to `hook_events` in the
database named by HOOK_EVENTS_URL, so a test can read what ran in another process."""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa

from dbqueue import hooks


def record(event: str, task_id: Any, detail: Any = "") -> None:
    engine = sa.create_engine(os.environ["HOOK_EVENTS_URL"], poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO hook_events (event, task_id, detail) VALUES (:e, :t, :d)"),
            {"e": event, "t": task_id, "d": str(detail)[:200]},
        )
    engine.dispose()


@hooks.worker_started
def started(worker: Any) -> None:
    record("worker_started", None, worker.name)


@hooks.worker_stopping
def stopping(worker: Any) -> None:
    record("worker_stopping", None, worker.name)


@hooks.before_task
def before(task: hooks.TaskView) -> None:
    record("before_task", task.id, f"{task.handler} attempt={task.attempts} args={task.args}")


@hooks.on_success
def success(task: hooks.TaskView, result: Any) -> None:
    record("on_success", task.id, result)


@hooks.on_retry
def retrying(task: hooks.TaskView, exc: BaseException) -> None:
    record("on_retry", task.id, type(exc).__name__)


@hooks.on_failure
def failed(task: hooks.TaskView, exc: BaseException) -> None:
    record("on_failure", task.id, type(exc).__name__)


@hooks.after_task
def after(task: hooks.TaskView, outcome: hooks.Outcome) -> None:
    record("after_task", task.id, outcome.status)
