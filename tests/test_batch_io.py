"""Batch statements of the hot path: enqueue_many and a batch of outcomes, on both databases.

On PostgreSQL these go through array (unnest) statements; the ids, the per-task options and
the fencing must be exactly those of the one-row statements.
"""

from __future__ import annotations

import datetime as dt

import dbqueue
from dbqueue import store, worker
from dbqueue.schema import Status
from tests import jobs


def test_enqueue_many_ids_in_order_with_options(db):
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    ids = dbqueue.enqueue_many(jobs.add, [(i, i) for i in range(2_500)], priority=3, queue="q")
    assert ids == sorted(ids) and len(set(ids)) == 2_500
    rows = db.rows(
        "SELECT id, priority, queue, status, attempts, max_attempts FROM tasks ORDER BY id"
    )
    assert [r.id for r in rows] == ids
    assert {(r.priority, r.queue, r.status, r.attempts, r.max_attempts) for r in rows} == {
        (3, "q", "queued", 0, 25)
    }
    delayed = dbqueue.enqueue_many(jobs.noop, [(), ()], run_at=later, timeout=2.5)
    in_a_minute = dbqueue.enqueue_many(jobs.noop, [()], run_at=dt.timedelta(minutes=1))
    assert (
        db.scalar(
            f"SELECT count(*) FROM tasks WHERE id IN ({delayed[0]}, {delayed[1]}) "
            "AND timeout = 2.5 AND run_at > created_at"
        )
        == 2
    )
    (minute_id,) = in_a_minute
    assert db.scalar(f"SELECT count(*) FROM tasks WHERE id = {minute_id} AND run_at > created_at")
    assert worker.Worker(db.settings, queues=["q"]).work_off().succeeded == 2_500
    assert dbqueue.Task(ids[7]).result == 14
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'queued'") == 3


def test_batch_of_outcomes_is_fenced(db):
    dbqueue.enqueue_many(jobs.noop, [()] * 4)
    with db.engine.begin() as conn:
        rows = store.claim(conn, "w1", 4)
    stolen = rows[1]
    # the task was rescued and claimed again by another worker meanwhile
    with db.engine.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE tasks SET locked_by = 'w2', attempts = attempts + 1 WHERE id = {stolen.id}"
        )
    lost_before = store.LOST_WRITES.value
    outcomes = [
        store.Outcome(id=r.id, attempts=r.attempts, status=Status.SUCCEEDED, result=None)
        for r in rows
    ]
    with db.engine.begin() as conn:
        written = store.record(conn, "w1", outcomes)
    assert written == 3
    assert store.LOST_WRITES.value == lost_before + 1
    assert db.scalar(f"SELECT status FROM tasks WHERE id = {stolen.id}") == "running"
    assert db.scalar(f"SELECT locked_by FROM tasks WHERE id = {stolen.id}") == "w2"
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'succeeded'") == 3
    assert (
        db.scalar(
            "SELECT count(*) FROM tasks WHERE status = 'succeeded' "
            "AND finished_at IS NOT NULL AND locked_by IS NULL"
        )
        == 3
    )


def test_a_batch_mixing_none_and_real_results_stores_each(db):
    """None is stored as NULL (nothing to sign), a value as its signed pickle, in one batch."""
    nothing = dbqueue.enqueue_many(jobs.noop, [()] * 3)
    values = dbqueue.enqueue_many(jobs.add, [(i, 1) for i in range(3)])
    assert worker.Worker(db.settings).work_off().succeeded == 6
    assert (
        db.scalar(
            f"SELECT count(*) FROM tasks WHERE id IN ({', '.join(map(str, nothing))}) "
            "AND status = 'succeeded' AND result IS NULL AND error IS NULL"
        )
        == 3
    )
    assert [dbqueue.Task(i).result for i in nothing] == [None, None, None]
    assert [dbqueue.Task(i).result for i in values] == [1, 2, 3]
    assert all(dbqueue.Task(i).success for i in nothing + values)


def test_batch_arrays_carry_every_byte_value(db):
    """Payloads and results travel as bytea arrays (binary on psycopg): bytes an array literal
    would have to quote or escape (NUL, quotes, backslashes, braces, commas) arrive intact."""
    awkward = [bytes(range(256)), b'"\\{},', b"", b"\x00" * 10, bytes(range(255, -1, -1)) * 40]
    ids = dbqueue.enqueue_many(jobs.echo, [(value,) for value in awkward])
    ids += dbqueue.enqueue_many(jobs.echo, [(value, "mixed") for value in awkward], priority=1)
    nothing = dbqueue.enqueue_many(jobs.noop, [()] * 2)
    assert worker.Worker(db.settings).work_off().succeeded == len(awkward) * 2 + 2
    results = [dbqueue.Task(i).result for i in ids]
    assert [r["args"] for r in results[: len(awkward)]] == [(value,) for value in awkward]
    assert [r["args"] for r in results[len(awkward) :]] == [(v, "mixed") for v in awkward]
    assert [dbqueue.Task(i).result for i in nothing] == [None, None]
