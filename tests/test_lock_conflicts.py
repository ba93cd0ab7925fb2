"""Lock conflicts the database resolves by undoing the work (PostgreSQL: deadlock 40P01,
lock_timeout 55P03, serialization failure 40001; MySQL/MariaDB: deadlock 1213, lock wait
timeout 1205): dbqueue's own transactions run again, the application's get a LockConflict
that says to run theirs again, and nothing blames an outage.

PostgreSQL's were taken for outages before (psycopg raises them as OperationalError): the
worker logged "database unavailable" and an enqueue of dbqueue's own was not run again.
Needs row locks held across connections: PostgreSQL and MariaDB."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa

import dbqueue
from dbqueue import database, engines, errors, store
from dbqueue.worker import Worker
from tests import jobs

pytestmark = pytest.mark.skip_locked


def _deadlock(db) -> sa.exc.DBAPIError:
    """A real deadlock: two transactions each lock one row, then want the other's."""
    first, second = (dbqueue.enqueue(jobs.noop).id for _ in range(2))
    caught: list[BaseException] = []
    barrier = threading.Barrier(2)

    def take(mine: int, theirs: int) -> None:
        try:
            with db.engine.begin() as conn:
                conn.execute(sa.text("UPDATE tasks SET priority = 1 WHERE id = :i"), {"i": mine})
                barrier.wait(10)
                conn.execute(sa.text("UPDATE tasks SET priority = 2 WHERE id = :i"), {"i": theirs})
        except sa.exc.DBAPIError as exc:
            caught.append(exc)

    threads = [
        threading.Thread(target=take, args=(first, second)),
        threading.Thread(target=take, args=(second, first)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(caught) == 1, caught
    exc = caught[0]
    assert isinstance(exc, sa.exc.DBAPIError)
    return exc


def test_a_deadlock_is_transient_and_the_worker_runs_the_transaction_again(db, caplog):
    deadlock = _deadlock(db)
    assert database.is_transient(deadlock) and not database.is_disconnect(deadlock)
    assert engines.of(db.engine).is_transient(deadlock)
    worker = Worker(db.settings, ["none"])
    attempts: list[int] = []

    def claim_once_deadlocked() -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            raise deadlock
        with worker.begin() as conn:
            return store.claim(conn, worker.name, 1, ["none"])

    caplog.set_level("WARNING", logger="dbqueue.worker")
    assert worker._with_db_retry(claim_once_deadlocked, "claim") == []
    assert len(attempts) == 2
    assert "running the claim again" in caplog.text
    assert "lock conflict" in caplog.text
    assert "database unavailable" not in caplog.text


def test_dbqueues_own_transaction_runs_again_after_a_deadlock(db, caplog):
    """database.retried (an enqueue of dbqueue's own): the deadlocked transaction is run
    again and its work stored once."""
    deadlock = _deadlock(db)
    runs: list[int] = []

    def enqueue_once_deadlocked() -> int:
        runs.append(1)
        if len(runs) == 1:
            raise deadlock
        return dbqueue.enqueue(jobs.noop, queue="after").id

    caplog.set_level("WARNING", logger="dbqueue.database")
    task_id = database.retried(db.settings, enqueue_once_deadlocked)
    assert len(runs) == 2
    assert db.scalar("SELECT count(*) FROM tasks WHERE queue = 'after'") == 1
    assert db.scalar("SELECT queue FROM tasks WHERE id = :i", i=task_id) == "after"
    assert "running the transaction again (attempt 2 of 5)" in caplog.text


def _short_lock_wait(conn: sa.Connection) -> None:
    """This transaction gives up a lock wait after about a second."""
    if database.is_mysql(conn):
        conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
    else:
        conn.exec_driver_sql("SET LOCAL lock_timeout = '1s'")


def test_a_lock_conflict_in_the_callers_transaction_says_to_run_it_again(db):
    """The application's transaction waits on a unique key another transaction holds and
    gives up: a LockConflict naming what happened, never DatabaseUnavailable."""
    with db.engine.connect() as holder, holder.begin():
        dbqueue.enqueue(jobs.noop, unique_key="k", connection=holder)
        with db.engine.connect() as conn, conn.begin():
            _short_lock_wait(conn)
            with pytest.raises(errors.LockConflict) as conflict:
                dbqueue.enqueue_many(jobs.noop, [1], unique_key="k", connection=conn)
    message = str(conflict.value)
    assert "enqueue inside the caller's transaction met a lock wait timeout" in message
    assert "roll the transaction back and run all of it again" in message
    assert isinstance(conflict.value.__cause__, sa.exc.OperationalError)
