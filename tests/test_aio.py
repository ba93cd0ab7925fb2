"""Async: `await enqueue_async(...)` in the caller's AsyncSession, and `async def` tasks."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

import dbqueue
from dbqueue import EnqueueError, Status, Task
from dbqueue.worker import Worker
from tests import jobs


def async_url(db) -> str:
    """The test database's URL for an async engine (aiosqlite, aiomysql; psycopg 3 is async
    already)."""
    url = sa.make_url(db.url)
    if db.kind == "sqlite":
        url = url.set(drivername="sqlite+aiosqlite")
    elif db.kind == "mariadb":
        url = url.set(drivername="mysql+aiomysql").update_query_dict({"charset": "utf8mb4"})
    return url.render_as_string(hide_password=False)


def run(db, body):
    """Run `body(async_engine)` in a fresh event loop, disposing of the engine afterwards."""

    async def main():
        engine = create_async_engine(async_url(db))
        try:
            return await body(engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def count_tasks(db) -> int:
    return db.scalar("SELECT count(*) FROM tasks")


def test_enqueue_async_commits_and_rolls_back_with_the_session(db):
    async def body(engine):
        sessions = async_sessionmaker(engine)
        async with sessions() as session, session.begin():
            task = await dbqueue.enqueue_async(jobs.add, (1, 2), session=session)
        async with sessions() as session:
            await session.begin()
            await dbqueue.enqueue_async(jobs.add, (3, 4), session=session)
            await session.rollback()
        return task

    task = run(db, body)
    assert isinstance(task, Task)
    assert count_tasks(db) == 1
    assert task.refresh().status is Status.QUEUED
    assert task.handler == "tests.jobs:add"


def test_enqueue_async_on_an_async_connection(db):
    async def body(engine):
        async with engine.connect() as conn:
            await dbqueue.enqueue_async(jobs.add, (1, 2), connection=conn)
            await conn.rollback()
        async with engine.begin() as conn:
            return await dbqueue.enqueue_async(jobs.add, (5, 6), connection=conn, queue="async")

    task = run(db, body)
    assert count_tasks(db) == 1
    assert task.refresh().queue == "async"


def test_enqueue_many_and_schedule_async(db):
    async def body(engine):
        async with AsyncSession(engine) as session, session.begin():
            ids = await dbqueue.enqueue_many_async(jobs.add, [(1, 2), (3, 4)], session=session)
            later = await dbqueue.schedule_async(dt.timedelta(hours=1), jobs.noop, session=session)
        return ids, later

    ids, later = run(db, body)
    assert len(ids) == 2
    assert count_tasks(db) == 3
    assert later.refresh().run_at > dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=59)
    assert Worker(db.settings).work_off().succeeded == 2
    assert later.refresh().status is Status.QUEUED


def test_without_a_session_it_commits_on_its_own_without_blocking_the_loop(db):
    async def body(engine):
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticking = asyncio.create_task(ticker())
        task = await dbqueue.enqueue_async(jobs.add, (1, 2), unique_key="k")
        again = await dbqueue.enqueue_async(jobs.add, (9, 9), unique_key="k", on_conflict="keep")
        ticking.cancel()
        return task, again, ticks

    task, again, ticks = run(db, body)
    assert task == again
    assert count_tasks(db) == 1
    assert ticks > 0  # the loop kept running while the sync enqueue ran in a thread


def test_a_sync_session_is_refused_with_a_clear_error(db):
    async def body(engine):
        with orm.Session(db.engine) as session:
            with pytest.raises(EnqueueError, match="AsyncSession"):
                await dbqueue.enqueue_async(jobs.add, (1, 2), session=session)
        with pytest.raises(EnqueueError, match="AsyncConnection"):
            await dbqueue.enqueue_async(jobs.add, (1, 2), connection=object())

    run(db, body)
    assert count_tasks(db) == 0


def test_bad_arguments_raise_before_anything_is_written(db):
    async def body(engine):
        async with AsyncSession(engine) as session, session.begin():
            with pytest.raises(EnqueueError, match="priority"):
                await dbqueue.enqueue_async(jobs.add, (1, 2), priority="high", session=session)

    run(db, body)
    assert count_tasks(db) == 0


def test_a_worker_awaits_async_tasks(db):
    task = dbqueue.enqueue(jobs.async_add, (2, 3))
    result = db.cli("workoff")
    assert result.returncode == 0, result.stderr
    assert task.refresh().status is Status.SUCCEEDED
    assert task.result == 5


def test_inline_mode_runs_an_async_task_enqueued_from_async_code(db):
    async def body(engine):
        with dbqueue.inline():
            async with AsyncSession(engine) as session, session.begin():
                return await dbqueue.enqueue_async(jobs.async_add, (20, 22), session=session)

    task = run(db, body)
    assert task.refresh().status is Status.SUCCEEDED, task.error
    assert task.result == 42


@pytest.mark.slow
def test_async_tasks_run_at_the_same_time_with_concurrency(db):
    with db.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE runs (label VARCHAR(100), pid INTEGER)"))
    tasks = [dbqueue.enqueue(jobs.async_rendezvous, (db.url, f"r{i}", 2, 30)) for i in range(2)]
    result = db.cli("workoff", "--concurrency", "2", "--async-concurrency", "1", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [t.refresh().result for t in tasks] == [2, 2]
    assert len({r.pid for r in db.rows("SELECT pid FROM runs")}) == 2


@pytest.mark.mysql_only
@pytest.mark.parametrize("driver", ["aiomysql", "asyncmy"])
def test_a_lock_conflict_in_the_callers_async_session_is_named(db, driver):
    """Through either async MySQL driver, a lock wait timeout inside the application's
    AsyncSession is dbqueue's LockConflict (asyncmy's errors were not recognised as MySQL's:
    a raw driver error, and a lost connection was not told from a conflict)."""
    url = sa.make_url(async_url(db)).set(drivername=f"mysql+{driver}")

    async def main():
        engine = create_async_engine(url)
        try:
            async with engine.connect() as holder, holder.begin():
                await dbqueue.enqueue_async(jobs.noop, unique_key="k", connection=holder)
                async with AsyncSession(engine) as session, session.begin():
                    await session.execute(sa.text("SET SESSION innodb_lock_wait_timeout = 1"))
                    with pytest.raises(dbqueue.LockConflict) as conflict:
                        await dbqueue.enqueue_async(jobs.noop, unique_key="k", session=session)
                    await session.rollback()
            return conflict.value
        finally:
            await engine.dispose()

    refused = asyncio.run(main())
    assert "met a lock wait timeout (1205)" in str(refused)
    assert count_tasks(db) == 1
