"""Running Django tasks inside a test, under Django's test runner or pytest-django.

    run_tasks()        run every ready task now, in this process, on Django's connection:
                       a TestCase's own transaction included (the test's uncommitted rows and
                       the tasks enqueued beside them are visible, nothing is committed)
    inline()           a `with` block in which each enqueued task runs in this process once
                       its transaction commits (TestCase: inside `captureOnCommitCallbacks(
                       execute=True)`, pytest-django: `django_capture_on_commit_callbacks`)

Nothing is faked: the tasks are real rows, claimed, run by dbqueue's executor and recorded as
a worker would, so `get_result()` afterwards reads what a worker would have left.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.tasks import DEFAULT_TASK_BACKEND_ALIAS, TaskResult, task_backends

from dbqueue import executor, identity, store
from dbqueue.django import connection

if TYPE_CHECKING:
    from dbqueue.django.backend import TaskBackend


def _backend(alias: str) -> TaskBackend:
    from dbqueue.django.backend import TaskBackend

    backend = task_backends[alias]
    if not isinstance(backend, TaskBackend):
        raise TypeError(f"TASKS[{alias!r}] is {type(backend).__name__}, not dbqueue's TaskBackend")
    return backend


def _worker_name() -> str:
    return f"django-test:{socket.gethostname()}:{os.getpid()}"


def _run(backend: TaskBackend, claim: Any) -> TaskResult | None:
    """Claim one task with `claim(conn, worker_name)`, run it here, record how it ended."""
    name = _worker_name()
    alias = backend.database
    with transaction.atomic(using=alias), connection.borrowed(alias) as conn:
        store.register_worker(
            conn, name, socket.gethostname(), os.getpid(), None, identity.host_id()
        )
        rows = claim(conn, name)
    try:
        if not rows:
            return None
        outcome = executor.execute(backend.settings, rows[0])
        with transaction.atomic(using=alias), connection.borrowed(alias) as conn:
            store.record(conn, name, [outcome])
    finally:
        with transaction.atomic(using=alias), connection.borrowed(alias) as conn:
            store.remove_workers(conn, [name])
    return backend.get_result(str(rows[0].id))


def run_task(backend: TaskBackend, task_id: int) -> TaskResult | None:
    """Run one task by id (INLINE's on-commit callback); None when it is no longer queued."""
    return _run(backend, lambda conn, name: store.claim_by_id(conn, name, task_id))


def run_tasks(
    queues: Sequence[str] | None = None, *, backend: str = DEFAULT_TASK_BACKEND_ALIAS
) -> list[TaskResult]:
    """Run every task that is ready now (and those they enqueue), in this process, in claim
    order; returns their results. A failed task that will be retried is not run again: its
    retry is not ready yet."""
    chosen = _backend(backend)
    results: list[TaskResult] = []
    while True:
        result = _run(chosen, lambda conn, name: store.claim(conn, name, 1, queues))
        if result is None:
            return results
        results.append(result)


@contextmanager
def inline(backend: str = DEFAULT_TASK_BACKEND_ALIAS) -> Iterator[None]:
    """Within the block, each task enqueued on `backend` runs here once its transaction
    commits (never if it rolls back), like OPTIONS' INLINE."""
    chosen = _backend(backend)
    before = chosen.inline
    chosen.inline = True
    try:
        yield
    finally:
        chosen.inline = before
