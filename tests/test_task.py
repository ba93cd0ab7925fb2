"""Task: a handle on one row, from any process."""

from __future__ import annotations

import pytest

import dbqueue
from dbqueue import worker
from tests import jobs


def test_get_refresh_and_attributes(db):
    task = dbqueue.enqueue(jobs.add, args=(1, 2), queue="q1", priority=4)
    same = dbqueue.Task.get(task.id)
    assert same == task
    assert (same.queue, same.priority, same.attempts, same.status) == ("q1", 4, 0, "queued")
    assert same.created_at.tzinfo is not None and same.result is None
    worker.Worker(db.settings).work_off()
    same.refresh()
    assert same.success and same.result == 3 and same.attempts == 1
    assert same.started_at <= same.finished_at


def test_get_unknown_id(db):
    with pytest.raises(dbqueue.TaskNotFound):
        dbqueue.Task.get(999999)


def test_wait_times_out_then_returns_when_finished(db):
    task = dbqueue.enqueue(jobs.add, args=(1, 1))
    with pytest.raises(dbqueue.TaskTimeout):
        task.wait(timeout=0.2)
    proc = db.popen("workoff", "--import", "tests.jobs")
    assert task.wait(timeout=30).result == 2
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_exception_and_error_text(db):
    task = dbqueue.enqueue(jobs.raise_value_error, args=("bad input",), max_attempts=1)
    worker.Worker(db.settings).work_off()
    task.refresh()
    assert task.status is dbqueue.Status.FAILED and not task.success
    assert isinstance(task.exception, ValueError) and str(task.exception) == "bad input"
    assert "Traceback" in task.error and "ValueError: bad input" in task.error
    assert "jobs.py" in task.error


def test_ids_are_never_reused_after_delete_or_rollback(db):
    """A stored task id must not come to name another task (SQLite reuses rowids unless told).

    A handle from an enqueue that rolled back names no task; on SQLite its id can be given to
    the next task, as the README says."""
    from sqlalchemy import orm

    first = dbqueue.enqueue(jobs.noop)
    with db.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM tasks")
    with orm.Session(db.engine) as session:
        rolled_back = dbqueue.enqueue(jobs.noop, session=session)
        session.rollback()
    after = dbqueue.enqueue(jobs.noop)
    assert after.id > first.id
    if db.kind == "postgresql":  # SQLite rolls its sequence back with the insert
        assert after.id != rolled_back.id
