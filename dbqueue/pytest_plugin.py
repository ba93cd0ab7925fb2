"""The pytest plugin (entry point `pytest11`, active once dbqueue is installed).

    dbqueue_inline    tasks run once their enqueue commits, in the test's process (inline mode)
    dbqueue_workoff   a callable running every ready task in process; returns the Summary
    assert_enqueued   a callable: `assert_enqueued(func, args=..., kwargs=..., queue=...)`
    refute_enqueued   a callable: the same, asserting that no such task is queued
    dbqueue_published   the bus events whose publish committed during the test
    assert_published  a callable: `assert_published("user_created", id=42)`
    refute_published  a callable: the same, asserting that no such event was published

The fixtures use dbqueue's default settings (`dbqueue.configure(...)` or DBQUEUE_DATABASE_URL),
which the application's conftest points at its test database. Nothing is faked: tasks are real
rows, read back through store.py and the signed payload, and run by the real Worker.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest

from dbqueue import bus, config, serializer, store, worker
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


def _published(
    events: Sequence[bus.Published], event_type: str, attributes: dict[str, Any]
) -> tuple[list[bus.Published], str]:
    """(events of that type whose attributes include `attributes`, every event, described)."""
    wanted = json.loads(json.dumps(attributes))  # compared as subscribers receive them
    matches = [
        e
        for e in events
        if e.event_type == event_type
        and all(k in e.attributes and e.attributes[k] == v for k, v in wanted.items())
    ]
    seen = "; ".join(f"{e.event_type} {e.attributes!r}" for e in events) or "none"
    return matches, seen


def _described(event_type: str, attributes: dict[str, Any]) -> str:
    parts = ", ".join(f"{k}={v!r}" for k, v in attributes.items())
    return f"{event_type!r}" + (f" with {parts}" if parts else "")


@pytest.fixture
def dbqueue_published() -> Iterator[list[bus.Published]]:
    """The bus events whose publish committed during the test, subscribers or not."""
    with bus.recording() as events:
        yield events


@pytest.fixture(name="assert_published")
def assert_published_fixture(
    dbqueue_published: list[bus.Published],
) -> Callable[..., list[bus.Published]]:
    """`assert_published(event_type, **attributes)`: an event of that type was published
    (and committed) in this test with at least these attributes; returns the matches."""

    def assert_published(event_type: str, /, **attributes: Any) -> list[bus.Published]:
        matches, seen = _published(dbqueue_published, event_type, attributes)
        if not matches:
            raise AssertionError(
                f"expected event {_described(event_type, attributes)} to be published, found "
                f"none. Events published in this test: {seen}"
            )
        return matches

    return assert_published


@pytest.fixture(name="refute_published")
def refute_published_fixture(dbqueue_published: list[bus.Published]) -> Callable[..., None]:
    """`refute_published(event_type, **attributes)`: no such event was published."""

    def refute_published(event_type: str, /, **attributes: Any) -> None:
        matches, seen = _published(dbqueue_published, event_type, attributes)
        if matches:
            raise AssertionError(
                f"expected no event {_described(event_type, attributes)}, found {len(matches)}."
                f" Events published in this test: {seen}"
            )

    return refute_published
