"""The Tasks API on dbqueue: enqueues in Django's transactions, priorities, results, context.

A second connection (dbqueue's own engine from DATABASES, as a worker process has) checks
what is committed; Django's connection is the one the enqueue wrote on.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
import sqlalchemy as sa


@pytest.fixture
def backend():
    from django.tasks import task_backends

    return task_backends["default"]


@pytest.fixture
def other_connection(backend):
    """A connection of its own, as a worker process would have: sees committed rows only.
    (A plain engine: dbqueue's own begins every SQLite transaction IMMEDIATE, waiting for
    the writer.)"""
    engine = sa.create_engine(backend.worker_settings().database_url, poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()


def committed(engine, sql="SELECT count(*) FROM tasks", **params):
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar()


def committed_row(engine, sql, **params):
    with engine.connect() as conn:
        return tuple(conn.execute(sa.text(sql), params).one())


def on_django_connection(sql):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


def server_connections():
    """Connections to the test database the server counts (None on SQLite, which has no
    server: there the visibility checks alone show the enqueue used Django's connection)."""
    from django.db import connection

    if connection.vendor == "postgresql":
        return on_django_connection(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        )
    if connection.vendor == "mysql":
        return on_django_connection(
            "SELECT count(*) FROM information_schema.processlist WHERE db = DATABASE()"
        )
    return None


def test_an_enqueue_in_atomic_is_written_on_djangos_connection_and_commits_with_it(
    other_connection,
):
    from django.db import transaction
    from shop.jobs import add

    before = server_connections()
    with transaction.atomic():
        result = add.enqueue(2, 3)
        assert server_connections() == before  # no connection of its own
        assert on_django_connection("SELECT count(*) FROM tasks") == 1  # same transaction
        assert committed(other_connection) == 0  # not committed yet: no connection of its own
    assert committed(other_connection) == 1
    row = committed_row(
        other_connection, "SELECT handler, queue, status FROM tasks WHERE id = :i", i=int(result.id)
    )
    assert row == ("shop.jobs:add", "default", "queued")


def test_a_rolled_back_block_leaves_no_task(other_connection):
    from django.db import transaction
    from shop.jobs import add

    with pytest.raises(RuntimeError), transaction.atomic():
        add.enqueue(1, 2)
        raise RuntimeError("the request failed")
    assert committed(other_connection) == 0


def test_a_savepoint_rolled_back_takes_only_its_own_tasks(backend, other_connection):
    from django.db import transaction
    from shop.jobs import add

    with transaction.atomic():
        kept = add.enqueue(1, 1)
        try:
            with transaction.atomic():  # a savepoint
                add.enqueue(2, 2)
                raise ValueError("inner block fails")
        except ValueError:
            pass
        also_kept = add.enqueue(3, 3)
    assert committed(other_connection) == 2
    assert [backend.get_result(r.id).args for r in (kept, also_kept)] == [[1, 1], [3, 3]]


def test_outside_atomic_the_enqueue_commits_at_once(other_connection):
    from shop.jobs import add

    add.enqueue(5, 5)
    assert committed(other_connection) == 1


def test_priorities_map_larger_first_onto_dbqueues_lower_first(backend, other_connection):
    from shop.jobs import add

    from dbqueue.django import testing

    low = add.using(priority=-100).enqueue(0, 1)
    middle = add.enqueue(0, 2)
    high = add.using(priority=100).enqueue(0, 3)
    stored = committed_row(other_connection, "SELECT min(priority), max(priority) FROM tasks")
    assert stored == (-100, 100)
    assert backend.get_result(high.id).task.priority == 100
    assert backend.get_result(low.id).task.priority == -100
    ran = testing.run_tasks()
    assert [r.id for r in ran] == [high.id, middle.id, low.id]
    assert [r.return_value for r in ran] == [3, 2, 1]


def test_results_say_what_happened(backend):
    from django.tasks import TaskResultStatus
    from shop.jobs import add, explode, explode_twice

    from dbqueue.django import testing

    ok = add.enqueue(20, 22)
    assert backend.get_result(ok.id).status == TaskResultStatus.READY
    bad = explode.enqueue("boom")
    again = explode_twice.enqueue("bang")
    testing.run_tasks()

    ok.refresh()  # Django's TaskResult.refresh reads the row again through the backend
    assert ok.status == TaskResultStatus.SUCCESSFUL
    ok = add.get_result(ok.id)
    assert ok.status == TaskResultStatus.SUCCESSFUL
    assert ok.return_value == 42
    assert ok.attempts == 1
    assert ok.errors == []
    assert ok.enqueued_at <= ok.started_at <= ok.finished_at

    bad = explode.get_result(bad.id)
    assert bad.status == TaskResultStatus.FAILED
    assert bad.is_finished and bad.attempts == 1
    [error] = bad.errors
    assert error.exception_class is LookupError
    assert "LookupError: boom" in error.traceback and "Traceback" in error.traceback
    with pytest.raises(ValueError, match="Task failed"):
        _ = bad.return_value

    again = explode_twice.get_result(again.id)  # one attempt left: back in the queue
    assert again.status == TaskResultStatus.READY
    assert again.attempts == 1 and again.errors[0].exception_class is LookupError


def test_a_context_task_gets_its_result_id_and_attempt():
    from shop.jobs import who_am_i

    from dbqueue.django import testing

    result = who_am_i.enqueue("x")
    testing.run_tasks()
    value = who_am_i.get_result(result.id).return_value
    assert value == {"id": result.id, "attempt": 1, "tag": "x", "args": ["x"]}


def test_async_tasks_and_the_async_api(backend):
    from shop.jobs import double_later

    from dbqueue.django import testing

    async def enqueue():
        return await double_later.aenqueue(21)

    result = asyncio.run(enqueue())
    testing.run_tasks()

    async def fetch():
        return await double_later.aget_result(result.id)

    assert asyncio.run(fetch()).return_value == 42


def test_run_after_defers_the_task(backend, other_connection):
    from django.tasks import TaskResultStatus
    from shop.jobs import add

    from dbqueue.django import testing

    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    result = add.using(run_after=later).enqueue(1, 1)
    assert testing.run_tasks() == []
    fetched = backend.get_result(result.id)
    assert fetched.status == TaskResultStatus.READY
    assert fetched.task.run_after == later
    ready = committed(
        other_connection,
        "SELECT count(*) FROM tasks WHERE run_at > :soon",
        soon=later - dt.timedelta(minutes=1),
    )
    assert ready == 1


def test_arguments_and_return_values_are_json_by_djangos_rule():
    from django.tasks import TaskResultStatus
    from shop.jobs import add, returns_set

    from dbqueue.django import testing

    with pytest.raises(TypeError):
        add.enqueue(dt.date(2026, 1, 1), 1)
    result = returns_set.enqueue()
    testing.run_tasks()
    failed = returns_set.get_result(result.id)
    assert failed.status == TaskResultStatus.FAILED  # not retried: it would return the same
    assert issubclass(failed.errors[0].exception_class, TypeError)
    assert "returned set, which is not JSON" in failed.errors[0].traceback


def test_what_dbqueue_cannot_do_is_an_invalid_task(backend):
    from django.tasks import task
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
    from shop.jobs import add

    with pytest.raises(InvalidTask, match="Queue 'elsewhere'"):
        add.using(queue_name="elsewhere")
    with pytest.raises(InvalidTask, match="priority"):
        add.using(priority=101)
    with pytest.raises(InvalidTask, match="max_attempts"):
        task(max_attempts=0)(add.func)
    with pytest.raises(TaskResultDoesNotExist):
        backend.get_result("12345678")
    with pytest.raises(TaskResultDoesNotExist):
        backend.get_result("not-a-number")
    assert backend.supports_defer and backend.supports_async_task
    assert backend.supports_get_result and backend.supports_priority


def test_inline_mode_runs_on_commit_and_never_after_a_rollback(backend):
    from django.db import transaction
    from django.tasks import TaskResultStatus
    from shop.jobs import add

    from dbqueue.django import testing

    with testing.inline():
        with transaction.atomic():
            result = add.enqueue(4, 4)
            assert backend.get_result(result.id).status == TaskResultStatus.READY
        with pytest.raises(RuntimeError), transaction.atomic():
            dropped = add.enqueue(9, 9)
            raise RuntimeError
    assert backend.get_result(result.id).return_value == 8
    with pytest.raises(Exception, match="no task"):
        backend.get_result(dropped.id)


def test_the_enqueued_signal_is_sent():
    from django.tasks.signals import task_enqueued
    from shop.jobs import add

    seen = []

    def receiver(sender, task_result, **kwargs):
        seen.append(task_result.id)

    task_enqueued.connect(receiver)
    try:
        result = add.enqueue(1, 2)
    finally:
        task_enqueued.disconnect(receiver)
    assert seen == [result.id]


def test_a_task_past_its_timeout_is_stopped_and_fails():
    from django.tasks import TaskResultStatus
    from shop.jobs import overstay

    from dbqueue.django import testing

    result = overstay.enqueue(30)
    [ran] = testing.run_tasks()
    assert ran.id == result.id
    assert ran.status == TaskResultStatus.FAILED
    assert ran.errors[0].exception_class_path == "dbqueue.errors.TaskTimeout"
    assert "timed out after 0.5s" in ran.errors[0].traceback
