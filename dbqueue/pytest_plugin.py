"""The pytest plugin (entry point `pytest11`, active once dbqueue is installed).

    dbqueue_inline    tasks run once their enqueue commits, in the test's process (inline mode)
    dbqueue_workoff   a callable running every ready task in process; returns the Summary
    assert_enqueued   a callable: `assert_enqueued(func, args=..., kwargs=..., queue=...)`
    refute_enqueued   a callable: the same, asserting that no such task is queued

The fixtures use dbqueue's default settings (`dbqueue.configure(...)` or DBQUEUE_DATABASE_URL),
which the application's conftest points at its test database. Nothing is faked: tasks are real
rows, read back through store.py and the signed payload, and run by the real Worker.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest

from dbqueue import config, serializer, store, worker
from dbqueue import task as task_module
from dbqueue.enqueue import reference


def _handler(func: Any) -> str:
    if isinstance(func, str):
        return func
    return reference(getattr(func, "__dbqueue_func__", func))[0]


def queued_calls(
    func: Any, settings: config.Settings | None = None
) -> list[tuple[int, str, tuple[Any, ...], dict[str, Any]]]:
    """(id, queue, args, kwargs) of each queued task of `func` (or a `module:qualname`)."""
    settings = settings or config.current()
    handler = _handler(func)
    with settings.get_engine().connect() as conn:
        rows = store.queued_by_handler(conn, handler)
        conn.rollback()
    calls = []
    for row in rows:
        body = serializer.verify(settings.keyring(), "payload", handler, row.payload)
        _ref, args, kwargs = pickle.loads(body)
        calls.append((row.id, row.queue, tuple(args), dict(kwargs)))
    return calls


def _matching(
    func: Any,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    queue: str | None,
) -> tuple[list[task_module.Task], list[str]]:
    """(matching queued tasks, a description of every queued task of `func`)."""
    matches: list[task_module.Task] = []
    seen: list[str] = []
    for task_id, task_queue, task_args, task_kwargs in queued_calls(func):
        seen.append(f"#{task_id} args={task_args!r} kwargs={task_kwargs!r} queue={task_queue!r}")
        if args is not None and task_args != tuple(args):
            continue
        if kwargs is not None and task_kwargs != dict(kwargs):
            continue
        if queue is not None and task_queue != queue:
            continue
        matches.append(task_module.Task(task_id))
    return matches, seen


def _wanted(args: Any, kwargs: Any, queue: Any) -> str:
    parts = [
        f"{name}={value!r}"
        for name, value in (("args", args), ("kwargs", kwargs), ("queue", queue))
        if value is not None
    ]
    return f" with {', '.join(parts)}" if parts else ""


def assert_enqueued(
    func: Any,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    queue: str | None = None,
    count: int | None = None,
) -> list[task_module.Task]:
    """Assert that a queued task of `func` matches (`count` of them if given); returns them.

    `args`, `kwargs` and `queue` left out match anything.
    """
    matches, seen = _matching(func, args, kwargs, queue)
    ok = len(matches) == count if count is not None else bool(matches)
    if not ok:
        expected = f"{count} queued" if count is not None else "a queued"
        raise AssertionError(
            f"expected {expected} task {_handler(func)}{_wanted(args, kwargs, queue)}, "
            f"found {len(matches)}. Queued tasks of {_handler(func)}: "
            + ("; ".join(seen) if seen else "none")
        )
    return matches


def refute_enqueued(
    func: Any,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    queue: str | None = None,
) -> None:
    """Assert that no queued task of `func` matches."""
    matches, seen = _matching(func, args, kwargs, queue)
    if matches:
        raise AssertionError(
            f"expected no queued task {_handler(func)}{_wanted(args, kwargs, queue)}, found "
            f"{len(matches)}: " + "; ".join(seen)
        )


def workoff(
    queues: Sequence[str] | None = None, *, settings: config.Settings | None = None
) -> worker.Summary:
    """Run every task that is ready now in this process, as `dbqueue workoff` would."""
    return worker.Worker(settings or config.current(), queues).work_off()


@pytest.fixture
def dbqueue_inline() -> Iterator[None]:
    """Tasks run in this process once their enqueue commits, their rows recorded as a worker
    would."""
    with config.inline():
        yield


@pytest.fixture
def dbqueue_workoff() -> Callable[..., worker.Summary]:
    """`dbqueue_workoff(queues=None)`: run the ready tasks here; returns the Summary."""
    return workoff


@pytest.fixture(name="assert_enqueued")
def assert_enqueued_fixture() -> Callable[..., list[task_module.Task]]:
    """`assert_enqueued(func, args=..., kwargs=..., queue=..., count=...)`."""
    return assert_enqueued


@pytest.fixture(name="refute_enqueued")
def refute_enqueued_fixture() -> Callable[..., None]:
    """`refute_enqueued(func, args=..., kwargs=..., queue=...)`."""
    return refute_enqueued
