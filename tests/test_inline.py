"""Inline mode runs a task when a worker could first see it: after the enqueuing transaction
commits, never inside one, never after a rollback; its row recorded as a worker would."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy import orm

import dbqueue
from dbqueue import bus
from tests import inline_jobs, jobs


@pytest.fixture
def runs(db):
    with db.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE runs (label VARCHAR(100), pid INTEGER)"))
    with dbqueue.inline():
        yield db


def labels(db) -> list[str]:
    """The committed rows of `runs`, read on a plain engine (dbqueue's would BEGIN IMMEDIATE,
    and wait for a caller's open transaction on SQLite)."""
    engine = sa.create_engine(db.url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT label FROM runs ORDER BY label"))
            return [row.label for row in rows]
    finally:
        engine.dispose()


def test_own_transaction_a_task_writing_through_its_own_engine_succeeds(runs):
    db = runs
    task = dbqueue.enqueue(jobs.record_run, args=(db.url, "own"))
    assert task.refresh().status is dbqueue.Status.SUCCEEDED, task.error
    (ids,) = [dbqueue.enqueue_many(jobs.record_run, [(db.url, "m1"), (db.url, "m2")])]
    assert [dbqueue.Task.get(i).success for i in ids] == [True, True]
    assert labels(db) == ["m1", "m2", "own"]
    row = db.rows("SELECT status, attempts, locked_by, started_at, finished_at FROM tasks")[0]
    assert (row.status, row.attempts, row.locked_by) == ("succeeded", 1, None)
    assert row.started_at is not None and row.finished_at is not None
    assert db.scalar("SELECT count(*) FROM workers") == 0  # the inline run signed out


def test_session_commit_runs_the_task_after_the_commit(runs):
    db = runs
    with orm.Session(db.engine) as session:
        session.execute(sa.text("INSERT INTO runs (label) VALUES ('mine')"))
        counted = dbqueue.enqueue(inline_jobs.count_runs, args=(db.url,), session=session)
        written = dbqueue.enqueue(jobs.record_run, args=(db.url, "task"), session=session)
        assert labels(db) == []  # nothing ran inside the transaction
        session.commit()
    assert counted.refresh().result == 1  # it saw the caller's committed row
    assert written.refresh().success, written.error
    assert labels(db) == ["mine", "task"]


def test_session_rollback_never_runs_the_task(runs):
    db = runs
    with orm.Session(db.engine) as session:
        dbqueue.enqueue(jobs.record_run, args=(db.url, "rolled back"), session=session)
        session.rollback()
        kept = dbqueue.enqueue(jobs.record_run, args=(db.url, "kept"), session=session)
        session.commit()
    assert labels(db) == ["kept"]
    assert kept.refresh().success
    assert db.scalar("SELECT count(*) FROM tasks") == 1


def test_a_transaction_closed_without_commit_forgets_its_tasks(runs):
    """Its ids are forgotten: SQLite gives them to the next tasks, which must not be run by a
    later commit of the same Session (or of the same pooled connection)."""
    db = runs
    session = orm.Session(db.engine)
    dbqueue.enqueue(jobs.record_run, args=(db.url, "closed session"), session=session)
    session.close()
    with db.engine.connect() as conn:
        dbqueue.enqueue(jobs.record_run, args=(db.url, "closed connection"), connection=conn)
    with dbqueue.inline(False):
        later = [
            dbqueue.enqueue(jobs.record_run, args=(db.url, "later"), run_at=dt.timedelta(hours=1))
            for _ in range(2)
        ]
    dbqueue.enqueue(jobs.record_run, args=(db.url, "session"), session=session)
    session.commit()
    session.close()
    with db.engine.connect() as conn:
        dbqueue.enqueue(jobs.record_run, args=(db.url, "connection"), connection=conn)
        conn.commit()
    assert labels(db) == ["connection", "session"]
    assert [task.refresh().status for task in later] == [dbqueue.Status.QUEUED] * 2


def test_savepoint_rolled_back_leaves_its_task_unrun(runs):
    db = runs
    with orm.Session(db.engine) as session:
        with session.begin_nested() as savepoint:
            dbqueue.enqueue(jobs.record_run, args=(db.url, "savepoint"), session=session)
            savepoint.rollback()
        dbqueue.enqueue(jobs.record_run, args=(db.url, "outer"), session=session)
        session.commit()
    assert labels(db) == ["outer"]


def test_connection_commit_and_rollback(runs):
    db = runs
    with db.engine.connect() as conn:
        conn.execute(sa.text("INSERT INTO runs (label) VALUES ('mine')"))
        counted = dbqueue.enqueue(inline_jobs.count_runs, args=(db.url,), connection=conn)
        assert labels(db) == []
        conn.commit()
        assert counted.refresh().result == 1
        dbqueue.enqueue(jobs.record_run, args=(db.url, "rolled back"), connection=conn)
        conn.rollback()
    with db.engine.begin() as conn:
        dbqueue.enqueue(jobs.record_run, args=(db.url, "begin block"), connection=conn)
    assert labels(db) == ["begin block", "mine"]


@pytest.mark.parametrize("inner_in_session", [False, True], ids=["own", "session"])
def test_a_task_that_enqueues_runs_the_inner_task_too(runs, inner_in_session):
    db = runs
    with orm.Session(db.engine) as session:
        outer = dbqueue.enqueue(
            inline_jobs.record_then_enqueue,
            args=(db.url, "outer", inner_in_session),
            session=session,
        )
        session.commit()
    assert outer.refresh().success, outer.error
    expected = ["outer", "outer/inner"] + (["outer/s"] if inner_in_session else [])
    assert labels(db) == expected
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'succeeded'") == 2


def test_failures_are_recorded_as_a_worker_would(runs):
    retried = dbqueue.enqueue(jobs.raise_value_error, args=("again",), max_attempts=2)
    failed = dbqueue.enqueue(jobs.raise_value_error, max_attempts=1)
    assert retried.refresh().status is dbqueue.Status.QUEUED and retried.attempts == 1
    assert retried.run_at > retried.created_at and "again" in retried.error
    assert failed.refresh().status is dbqueue.Status.FAILED
    assert isinstance(failed.exception, ValueError)


@pytest.fixture
def bus_app(monkeypatch):
    monkeypatch.setattr(bus, "_state", bus._State(app_key="app_inline"))
    bus.subscribe("user_created")(inline_jobs.record_bus_event)


def test_bus_inline_handler_writing_through_its_own_engine(db, bus_app):
    with db.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE runs (label VARCHAR(100), pid INTEGER)"))
    with bus.inline():
        (first,) = bus.publish("user_created", {"url": db.url, "label": "own"})
        with orm.Session(db.engine) as session:
            bus.publish("user_created", {"url": db.url, "label": "rolled back"}, session=session)
            session.rollback()
            (second,) = bus.publish(
                "user_created", {"url": db.url, "label": "session"}, session=session
            )
            assert labels(db) == ["own"]
            session.commit()
    assert labels(db) == ["own", "session"]
    assert dbqueue.Task.get(first).success and dbqueue.Task.get(second).success
