"""Hooks (dbqueue.hooks): the order they run in, what they see, and that a raising hook never
loses a task or its outcome, in-process and in a real worker process, on both databases."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import dbqueue
from dbqueue import hooks, worker
from tests import jobs


@pytest.fixture(autouse=True)
def _no_hooks_left() -> Iterator[None]:
    hooks.clear()
    yield
    hooks.clear()


def work_off(db) -> worker.Summary:
    return worker.Worker(db.settings).work_off()


def test_hooks_run_in_order_around_a_successful_task(db):
    seen: list[object] = []

    @hooks.before_task
    def before(task):
        seen.append(("before", task.handler, task.args, task.attempts, task.queue))

    @hooks.around_task
    def outer(task, call_next):
        seen.append("outer in")
        result = call_next()
        seen.append("outer out")
        return result

    @hooks.around_task
    def inner(task, call_next):
        seen.append("inner in")
        result = call_next()
        seen.append("inner out")
        return result

    @hooks.on_success
    def success(task, result):
        seen.append(("success", task.id, result))

    @hooks.after_task
    def after(task, outcome):
        seen.append(("after", outcome.status, outcome.result))

    task = dbqueue.enqueue(jobs.add, args=(2, 3), queue="maths")
    assert work_off(db).succeeded == 1
    assert seen == [
        ("before", "tests.jobs:add", (2, 3), 1, "maths"),
        "outer in",
        "inner in",
        "inner out",
        "outer out",
        ("success", task.id, 5),
        ("after", "succeeded", 5),
    ]
    assert task.refresh().result == 5


def test_retry_then_failure_hooks_see_the_exception(db):
    seen: list[tuple[str, int, str]] = []
    hooks.on_retry(lambda task, exc: seen.append(("retry", task.id, type(exc).__name__)))
    hooks.on_failure(lambda task, exc: seen.append(("failure", task.id, type(exc).__name__)))
    hooks.after_task(lambda task, outcome: seen.append(("after", task.id, outcome.status)))
    retried = dbqueue.enqueue(jobs.raise_value_error, max_attempts=3)
    failed = dbqueue.enqueue(jobs.raise_value_error, max_attempts=1)
    work_off(db)
    assert sorted(seen) == sorted(
        [
            ("retry", retried.id, "ValueError"),
            ("after", retried.id, "retrying"),
            ("failure", failed.id, "ValueError"),
            ("after", failed.id, "failed"),
        ]
    )


def test_a_raising_hook_is_logged_by_name_and_loses_nothing(db, caplog):
    @hooks.on_success
    def broken_reporter(task, result):
        raise RuntimeError("reporting service down")

    @hooks.after_task
    def broken_metrics(task, outcome):
        raise KeyError("gauge")

    task = dbqueue.enqueue(jobs.add, args=(1, 1))
    with caplog.at_level(logging.ERROR, logger="dbqueue.hooks"):
        assert work_off(db).succeeded == 1
    assert task.refresh().status is dbqueue.Status.SUCCEEDED and task.result == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("on_success hook" in m and "broken_reporter" in m for m in messages), messages
    assert any("after_task hook" in m and "broken_metrics" in m for m in messages), messages


def test_a_raising_before_task_fails_the_run_as_if_the_task_raised(db):
    ran: list[int] = []
    retried: list[str] = []

    @hooks.before_task
    def require_tenant(task):
        if "tenant" not in task.meta:
            raise PermissionError("no tenant in meta")

    hooks.on_retry(lambda task, exc: retried.append(str(exc)))
    task = dbqueue.enqueue(jobs.record_start, args=("unused", "x", 0), max_attempts=2)
    hooks.before_task(lambda task: ran.append(task.id))  # after the raising one: not reached
    assert work_off(db).retried == 1
    task.refresh()
    assert task.status is dbqueue.Status.QUEUED and task.attempts == 1
    assert "PermissionError: no tenant in meta" in (task.error or "")
    assert retried == ["no tenant in meta"] and ran == []


def test_a_raising_around_task_fails_the_run_and_can_replace_the_result(db):
    @hooks.around_task
    def doubled(task, call_next):
        return call_next() * 2

    @hooks.around_task
    def refuse_big(task, call_next):
        if task.args[0] > 100:
            raise ValueError("too big for this tenant")
        return call_next()

    small = dbqueue.enqueue(jobs.add, args=(2, 3))
    big = dbqueue.enqueue(jobs.add, args=(200, 3), max_attempts=1)
    work_off(db)
    assert small.refresh().result == 10
    big.refresh()
    assert big.status is dbqueue.Status.FAILED
    assert "ValueError: too big for this tenant" in (big.error or "")


def test_hooks_registered_by_an_imported_module_run_in_the_worker_process(db):
    with db.engine.begin() as conn:
        conn.execute(
            sa.text("CREATE TABLE hook_events (event VARCHAR(50), task_id INTEGER, detail TEXT)")
        )
    ok = dbqueue.enqueue(jobs.add, args=(20, 22))
    bad = dbqueue.enqueue(jobs.raise_value_error, max_attempts=1)
    done = subprocess.run(
        [sys.executable, "-m", "dbqueue", "workoff", "--import", "tests.hook_app"],
        env={**db.env, "HOOK_EVENTS_URL": db.url},
        cwd=db.tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr[-3000:]  # workoff: 1 when a task failed
    events = [(r.event, r.task_id, r.detail) for r in db.rows("SELECT * FROM hook_events")]
    by_task = {
        task_id: [event for event, t, _ in events if t == task_id] for task_id in (ok.id, bad.id)
    }
    assert by_task[ok.id] == ["before_task", "on_success", "after_task"]
    assert by_task[bad.id] == ["before_task", "on_failure", "after_task"]
    assert ("on_success", ok.id, "42") in events
    assert [e for e, _, _ in events if e.startswith("worker_")] == [
        "worker_started",
        "worker_stopping",
    ]


def test_no_hooks_means_the_fast_path(db):
    """Without hooks the executor builds no view (hooks.active stays False)."""
    assert hooks.active is False
    hooks.on_success(print)
    assert hooks.active is True
    hooks.unregister(print)
    assert hooks.active is False


def test_a_hook_that_is_not_callable_fails_at_registration():
    with pytest.raises(TypeError, match="decorates a function"):
        hooks.on_success("not a function")  # type: ignore[type-var]


def test_per_function_hooks_run_after_the_process_wide_ones_for_that_function_only(db):
    jobs.HOOK_CALLS.clear()
    hooks.on_success(lambda task, result: jobs.HOOK_CALLS.append(("global", task.id, result)))
    good, bad = jobs.hooked(21), jobs.hooked(-1)
    other = dbqueue.enqueue(jobs.add, args=(1, 1))
    work_off(db)
    assert jobs.HOOK_CALLS == [
        ("global", good.id, 42),
        ("own_success", good.id, 42),
        ("own_failure", bad.id, "ValueError"),
        ("global", other.id, 2),
    ]


def test_a_per_function_hook_that_is_not_callable_fails_at_decoration():
    with pytest.raises(TypeError, match="on_success= must be a function"):
        dbqueue.handle_asynchronously(on_success="notify_team")


def test_hooks_run_in_inline_mode_too(db):
    seen: list[tuple[str, object]] = []
    hooks.on_enqueue(lambda task: seen.append(("enqueue", task.id)))
    hooks.before_task(lambda task: seen.append(("before", task.handler)))
    hooks.on_success(lambda task, result: seen.append(("success", result)))
    with dbqueue.inline():
        task = dbqueue.enqueue(jobs.add, args=(4, 5))
    assert seen == [("enqueue", None), ("before", "tests.jobs:add"), ("success", 9)]
    assert task.refresh().status is dbqueue.Status.SUCCEEDED
