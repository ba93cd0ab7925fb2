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


@pytest.mark.skip_locked  # a server whose connections can be killed
def test_enqueue_after_its_pooled_connection_was_killed(db):
    """The lean enqueue path keeps SQLAlchemy's pool honest: a connection killed under it is
    reported as DatabaseUnavailable at most once and replaced, never handed out again."""
    dbqueue.enqueue(jobs.noop)
    outsider = sa.create_engine(db.url, poolclass=sa.pool.NullPool)
    with outsider.connect() as conn:
        if db.kind == "postgresql":
            pooled_pid = db.scalar("SELECT pg_backend_pid()")  # the one connection in the pool
            killed = conn.execute(sa.text(f"SELECT pg_terminate_backend({pooled_pid})")).scalar()
        else:
            pooled_id = db.scalar("SELECT CONNECTION_ID()")
            conn.execute(sa.text(f"KILL CONNECTION {int(pooled_id)}"))
            killed = True
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


@pytest.mark.skip_locked  # SQLite's engine is dbqueue's own, with BEGIN IMMEDIATE
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


@dbqueue.handle_asynchronously(timeout=12.5, run_at=dt.timedelta(hours=2))
def later_report(name: str) -> str:
    """Enqueued only, never run: carries the decorator options the other tests do not."""
    return name


def stored(task_or_id) -> tuple:
    task = dbqueue.Task.get(task_or_id if isinstance(task_or_id, int) else task_or_id.id)
    return task.queue, task.priority, task.max_attempts


def test_module_functions_apply_the_decorator_options(db):
    """Every way of enqueueing a decorated function stores its options, not the defaults."""
    one = dbqueue.enqueue(jobs.send_mail, args=("a@example.com",))
    many = dbqueue.enqueue_many(jobs.send_mail, ["b@example.com", ("c@example.com",)])
    later = dbqueue.schedule(dt.timedelta(hours=1), jobs.send_mail, args=("d@example.com",))
    assert [stored(t) for t in [one, *many, later]] == [("mail", 5, 3)] * 4
    later.refresh()
    assert abs((later.run_at - later.created_at).total_seconds() - 3600) < 5
    assert one.refresh().handler == "tests.jobs:send_mail"
    sent = worker.Worker(db.settings, queues=["mail"], rescue_after=60).work_off()
    assert sent.succeeded == 3  # the scheduled one is not due
    assert one.refresh().result == "sent to a@example.com"


def test_module_functions_apply_timeout_and_run_at_of_the_decorator(db):
    one = dbqueue.enqueue(later_report, args=("q1",)).refresh()
    (many,) = dbqueue.enqueue_many(later_report, ["q2"])
    sooner = dbqueue.schedule(dt.timedelta(minutes=5), later_report, args=("q3",)).refresh()
    for task in (one, dbqueue.Task.get(many)):
        assert task.timeout == 12.5
        assert abs((task.run_at - task.created_at).total_seconds() - 7200) < 5
    assert sooner.timeout == 12.5  # schedule's `when` is an explicit run_at: it wins
    assert abs((sooner.run_at - sooner.created_at).total_seconds() - 300) < 5


def test_explicit_options_override_the_decorator(db):
    assert stored(dbqueue.enqueue(jobs.send_mail, args=("a",), queue="urgent")) == (
        "urgent",
        5,
        3,
    )
    # an explicit value equal to the built-in default still overrides the decorator's
    assert stored(dbqueue.enqueue(jobs.send_mail, args=("b",), priority=0)) == ("mail", 0, 3)
    (many,) = dbqueue.enqueue_many(jobs.send_mail, ["c"], max_attempts=25)
    assert stored(many) == ("mail", 5, 25)
    scheduled = dbqueue.schedule(dt.timedelta(hours=1), jobs.send_mail, ("d",), queue="default")
    assert stored(scheduled) == ("default", 5, 3)
    assert stored(jobs.send_mail.enqueue(("e",), priority=1)) == ("mail", 1, 3)
    assert [stored(i) for i in jobs.send_mail.map(["f"], queue="bulk")] == [("bulk", 5, 3)]
    assert stored(jobs.send_mail("g")) == ("mail", 5, 3)


def test_plain_function_gets_the_default_options(db):
    one = dbqueue.enqueue(jobs.echo, args=(1,)).refresh()
    (many,) = dbqueue.enqueue_many(jobs.add, [(1, 2)])
    later = dbqueue.schedule(dt.timedelta(hours=1), jobs.noop).refresh()
    for task in (one, dbqueue.Task.get(many), later):
        assert (task.queue, task.priority, task.max_attempts) == ("default", 0, 25)
        assert task.timeout is None and task.unique_key is None
    assert abs((one.run_at - one.created_at).total_seconds()) < 5


def test_module_functions_apply_the_decorator_unique_key(db):
    """unique_rollup is decorated with unique_key="nightly-rollup", on_conflict="replace"."""
    first = dbqueue.enqueue(jobs.unique_rollup, args=("monday",))
    assert first.refresh().unique_key == "nightly-rollup"
    (batched,) = dbqueue.enqueue_many(jobs.unique_rollup, ["tuesday"])
    (mapped,) = jobs.unique_rollup.map(["wednesday"])
    assert first.id == batched == mapped
    kept = dbqueue.enqueue(jobs.unique_rollup, args=("thursday",), on_conflict="keep")
    assert kept == first
    assert db.scalar("SELECT count(*) FROM tasks") == 1
    with pytest.raises(dbqueue.EnqueueError, match="on_conflict must be"):
        dbqueue.enqueue_many(jobs.unique_rollup, ["friday"], on_conflict="merge")
    assert db.scalar("SELECT count(*) FROM tasks") == 1
    assert work_off(db).succeeded == 1
    assert first.refresh().result == "wednesday"
