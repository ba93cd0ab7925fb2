"""Enqueue API: decorator, delay, enqueue, schedule, transactions, validation, inline."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
import sqlalchemy as sa
from sqlalchemy import orm

import dbqueue
from dbqueue import worker
from tests import jobs


def work_off(db) -> worker.Summary:
    return worker.Worker(db.settings, rescue_after=60).work_off()


def test_decorated_call_enqueues_and_now_runs_here(db):
    task = jobs.decorated_add(2, 3)
    assert task.status is dbqueue.Status.QUEUED
    assert task.handler == "tests.jobs:decorated_add"
    assert jobs.decorated_add.now(2, 3) == 5
    assert work_off(db).succeeded == 1
    assert task.refresh().result == 5 and task.success


def test_decorator_options_are_stored(db):
    task = jobs.send_mail("a@example.com").refresh()
    assert (task.queue, task.priority, task.max_attempts) == ("mail", 5, 3)


def test_enqueue_with_all_options(db):
    task = dbqueue.enqueue(
        jobs.echo,
        args=(1, "x"),
        kwargs={"k": [1, 2]},
        priority=-3,
        queue="reports",
        max_attempts=7,
        timeout=12.5,
        unique_key="report-1",
    ).refresh()
    assert (task.priority, task.queue, task.max_attempts, task.timeout) == (-3, "reports", 7, 12.5)
    assert task.unique_key == "report-1"
    work_off(db)
    assert task.refresh().result == {"args": (1, "x"), "kwargs": {"k": [1, 2]}}


def test_run_at_datetime_timedelta_and_callable(db):
    now = dt.datetime.now(dt.timezone.utc)
    absolute = dbqueue.enqueue(jobs.noop, run_at=now + dt.timedelta(hours=2)).refresh()
    relative = dbqueue.schedule(dt.timedelta(hours=1), jobs.noop).refresh()
    called = dbqueue.enqueue(jobs.noop, run_at=lambda: dt.timedelta(minutes=30)).refresh()
    assert abs((absolute.run_at - now).total_seconds() - 7200) < 5
    assert abs((relative.run_at - relative.created_at).total_seconds() - 3600) < 5
    assert abs((called.run_at - called.created_at).total_seconds() - 1800) < 5
    assert work_off(db).done == 0  # none is due


def test_naive_run_at_is_refused(db):
    with pytest.raises(dbqueue.EnqueueError, match="naive"):
        dbqueue.enqueue(jobs.noop, run_at=dt.datetime(2030, 1, 1))


def test_enqueue_joins_session_transaction_rollback_leaves_no_task(db):
    with orm.Session(db.engine) as session:
        dbqueue.enqueue(jobs.noop, session=session)
        session.rollback()
    with orm.Session(db.engine) as session:
        kept = dbqueue.enqueue(jobs.noop, session=session)
        session.commit()
    assert db.scalar("SELECT count(*) FROM tasks") == 1
    assert kept.refresh().status is dbqueue.Status.QUEUED


def test_enqueue_joins_connection_transaction(db):
    with db.engine.connect() as conn:
        conn.begin()
        dbqueue.enqueue(jobs.noop, connection=conn)
        conn.rollback()
    assert db.scalar("SELECT count(*) FROM tasks") == 0


def test_unpicklable_argument_is_named_and_nothing_is_stored(db):
    with pytest.raises(dbqueue.EnqueueError, match=r"argument 'callback' of tests.jobs:echo"):
        dbqueue.enqueue(jobs.echo, kwargs={"callback": threading.Lock()})
    with pytest.raises(dbqueue.EnqueueError, match=r"position 1"):
        dbqueue.enqueue(jobs.echo, args=(1, (x for x in [])))
    assert db.scalar("SELECT count(*) FROM tasks") == 0


def test_unimportable_callables_are_refused(db):
    def local():
        pass

    with pytest.raises(dbqueue.EnqueueError, match="lambda"):
        dbqueue.enqueue(lambda: None)
    with pytest.raises(dbqueue.EnqueueError, match="local function"):
        dbqueue.enqueue(local)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("priority", True, "priority"),
        ("priority", 2**40, "out of range"),
        ("queue", "", "queue"),
        ("queue", "q" * 101, "queue"),
        ("max_attempts", 0, "max_attempts"),
        ("timeout", -1, "timeout"),
    ],
)
def test_invalid_options_name_the_parameter(db, option, value, message):
    with pytest.raises(dbqueue.EnqueueError, match=message):
        dbqueue.enqueue(jobs.noop, **{option: value})


def test_payload_over_limit_is_refused(db):
    db.settings.max_payload_bytes = 1000
    with pytest.raises(dbqueue.EnqueueError, match=r"limit is 1\.0 KiB"):
        dbqueue.enqueue(jobs.echo, args=("x" * 5000,))


def test_delay_model_instance_is_reloaded_by_primary_key(db):
    jobs.Base.metadata.create_all(db.engine)
    with orm.Session(db.engine) as session:
        photo = jobs.Photo(id=7, title="cat")
        session.add(photo)
        session.commit()
        task = dbqueue.delay(photo, priority=3).upload("!")
    assert task.refresh().handler == "tests.jobs:Photo.upload"
    assert task.priority == 3
    work_off(db)
    assert task.refresh().result == "uploaded cat!"
    assert db.scalar("SELECT uploaded FROM photos WHERE id = 7") in (True, 1)


def test_delay_model_instance_deleted_before_run_fails_clearly(db):
    jobs.Base.metadata.create_all(db.engine)
    with orm.Session(db.engine) as session:
        photo = jobs.Photo(id=8, title="dog")
        session.add(photo)
        session.commit()
        task = dbqueue.delay(photo).upload()
        session.delete(photo)
        session.commit()
    work_off(db)
    task.refresh()
    assert task.status is dbqueue.Status.FAILED
    assert "Photo id=8 no longer exists" in task.error


def test_delay_plain_object_pickles_the_object(db):
    task = dbqueue.delay(jobs.Greeter("Ada")).greet("Hello")
    work_off(db)
    assert task.refresh().result == "Hello, Ada"


def test_enqueue_many_and_map_one_round_trip(db):
    ids = dbqueue.enqueue_many(jobs.add, [(1, 2), (3, 4), {"a": 5, "b": 6}], queue="math")
    assert len(ids) == 3 and ids == sorted(ids)
    more = jobs.decorated_add.map([(1, 1), (2, 2)])
    work_off(db)
    assert [dbqueue.Task.get(i).result for i in ids] == [3, 7, 11]
    assert [dbqueue.Task.get(i).result for i in more] == [2, 4]


def test_unique_key_keeps_or_replaces(db):
    first = dbqueue.enqueue(jobs.echo, args=(1,), unique_key="k")
    second = dbqueue.enqueue(jobs.echo, args=(2,), unique_key="k")
    assert first.id == second.id
    third = dbqueue.enqueue(jobs.echo, args=(3,), unique_key="k", on_conflict="replace")
    assert third.id == first.id
    work_off(db)
    assert first.refresh().result == {"args": (3,), "kwargs": {}}
    fresh = dbqueue.enqueue(jobs.echo, args=(4,), unique_key="k")  # the first one finished
    assert fresh.id != first.id


def test_inline_runs_at_enqueue_and_records_the_row(db):
    with dbqueue.inline():
        task = jobs.decorated_add(4, 5)
        failing = dbqueue.enqueue(jobs.raise_value_error, max_attempts=1)
    assert task.refresh().status is dbqueue.Status.SUCCEEDED and task.result == 9
    assert failing.refresh().status is dbqueue.Status.FAILED
    assert isinstance(failing.exception, ValueError)
    assert jobs.decorated_add(1, 1).refresh().status is dbqueue.Status.QUEUED


def test_inline_from_environment(db, monkeypatch):
    monkeypatch.setenv("DBQUEUE_INLINE", "1")
    settings = dbqueue.configure(database_url=db.url)
    assert settings.inline
    assert jobs.decorated_add(1, 2).refresh().result == 3


def test_inline_inside_a_session_with_a_model(db):
    jobs.Base.metadata.create_all(db.engine)
    with dbqueue.inline(), orm.Session(db.engine) as session:
        photo = jobs.Photo(id=9, title="owl")
        session.add(photo)
        session.flush()
        task = dbqueue.enqueue(photo.upload, session=session)
        session.commit()
    assert task.refresh().result == "uploaded owl"


def test_async_function_is_awaited(db):
    task = dbqueue.enqueue(jobs.async_add, args=(2, 2))
    work_off(db)
    assert task.refresh().result == 4


def test_unreachable_database_raises_database_unavailable(tmp_path):
    dbqueue.configure(database_url="postgresql+psycopg://nobody:secret@127.0.0.1:1/x")
    with pytest.raises(dbqueue.DatabaseUnavailable) as info:
        dbqueue.enqueue(jobs.noop)
    assert "secret" not in str(info.value) and "***" in str(info.value)


def test_unmigrated_database_says_run_migrate(tmp_path):
    dbqueue.configure(database_url=f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    with pytest.raises(dbqueue.SchemaError, match="dbqueue migrate"):
        dbqueue.enqueue(jobs.noop)
    assert sa  # keep import used


def test_decorator_unique_key_with_on_conflict(db):
    first = jobs.unique_rollup("monday")
    second = jobs.unique_rollup("tuesday")  # on_conflict="replace": same task, new arguments
    assert first == second
    assert db.scalar("SELECT count(*) FROM tasks") == 1
    kept = jobs.unique_rollup.enqueue(("wednesday",), on_conflict="keep")
    assert kept == first
    from dbqueue.worker import Worker

    assert Worker(db.settings).work_off().succeeded == 1
    assert first.refresh().result == "tuesday"


def test_own_enqueue_hands_its_connection_back_transactional(db):
    """A lone enqueue of our own commits on its own (autocommit on PostgreSQL); the pooled
    connection it used must go back to the pool in transactional mode, or the next caller's
    rollback would not roll back."""
    dbqueue.enqueue(jobs.noop)
    engine = db.settings.get_engine()
    with engine.connect() as conn:  # the connection the enqueue just returned
        dbqueue.enqueue(jobs.noop, connection=conn)
        conn.rollback()
    assert db.scalar("SELECT count(*) FROM tasks") == 1


@pytest.mark.postgresql_only
def test_enqueue_after_its_pooled_connection_was_killed(db):
    """The lean enqueue path keeps SQLAlchemy's pool honest: a connection killed under it is
    reported as DatabaseUnavailable at most once and replaced, never handed out again."""
    dbqueue.enqueue(jobs.noop)
    pooled_pid = db.scalar("SELECT pg_backend_pid()")  # the one connection in the pool
    outsider = sa.create_engine(db.url, poolclass=sa.pool.NullPool)
    with outsider.connect() as conn:
        killed = conn.execute(sa.text(f"SELECT pg_terminate_backend({pooled_pid})")).scalar()
    outsider.dispose()
    assert killed
    failures = 0
    for _ in range(3):
        try:
            dbqueue.enqueue(jobs.noop)
        except dbqueue.DatabaseUnavailable as exc:
            cause = exc.__cause__
            assert isinstance(cause, sa.exc.DBAPIError) and cause.connection_invalidated
            failures += 1
    assert failures <= 1
    assert db.scalar("SELECT count(*) FROM tasks") == 4 - failures


@pytest.mark.postgresql_only
def test_own_enqueue_leaves_an_autocommit_engine_autocommit(db):
    """An application Engine made with isolation_level="AUTOCOMMIT" hands out connections that
    commit each statement; the lean enqueue path must not turn one transactional behind its
    back (the next user's writes would then be rolled back when it goes back to the pool)."""
    engine = sa.create_engine(db.url, isolation_level="AUTOCOMMIT", pool_size=1)
    dbqueue.configure(engine=engine)
    try:
        dbqueue.enqueue(jobs.noop)
        with engine.connect() as conn:  # the connection the enqueue just returned
            dbqueue.enqueue(jobs.noop, connection=conn)
        assert db.scalar("SELECT count(*) FROM tasks") == 2
    finally:
        engine.dispose()
