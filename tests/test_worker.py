"""Worker outcomes: success, retry with backoff, failure, bad tasks never kill the loop."""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

import pytest
import sqlalchemy as sa

import dbqueue
from dbqueue import database, identity, retry, store, worker
from tests import jobs


def work_off(db, **kwargs) -> worker.Summary:
    return worker.Worker(db.settings, **kwargs).work_off()


def test_priority_then_run_at_then_id(db):
    low = dbqueue.enqueue(jobs.noop, priority=10)
    high = dbqueue.enqueue(jobs.noop, priority=-5)
    mid_a = dbqueue.enqueue(jobs.noop, priority=0)
    mid_b = dbqueue.enqueue(jobs.noop, priority=0)
    with db.engine.begin() as conn:
        rows = store.claim(conn, "w", 10)
    assert [r.id for r in rows] == [high.id, mid_a.id, mid_b.id, low.id]


def test_claim_respects_queues_and_limit(db):
    dbqueue.enqueue_many(jobs.noop, [()] * 5, queue="a")
    dbqueue.enqueue_many(jobs.noop, [()] * 5, queue="b")
    with db.engine.begin() as conn:
        rows = store.claim(conn, "w", 3, ["b"])
    assert len(rows) == 3 and {r.queue for r in rows} == {"b"}
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'running'") == 3


def test_retry_uses_backoff_then_fails(db):
    task = jobs.always_fails()
    assert work_off(db).retried == 1
    task.refresh()
    assert task.status is dbqueue.Status.QUEUED and task.attempts == 1
    delay = (task.run_at - task.finished_at).total_seconds() if task.finished_at else None
    assert delay is None
    waited = (task.run_at - task.started_at).total_seconds()
    assert retry.backoff(1) - 1 <= waited <= retry.backoff(1) + 1
    db.engine.dispose()
    with db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE tasks SET run_at = created_at"))
    assert work_off(db).failed == 1
    task.refresh()
    assert task.status is dbqueue.Status.FAILED and task.attempts == 2
    assert "RuntimeError: always fails" in task.error


def test_backoff_formula():
    assert [retry.backoff(n) for n in (1, 2, 3)] == [6, 21, 86]
    assert retry.should_retry(24, 25) and not retry.should_retry(25, 25)


def test_missing_callable_fails_readably_and_worker_goes_on(db):
    task = dbqueue.enqueue(jobs.noop, max_attempts=1)
    with db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE tasks SET handler = 'tests.jobs:gone'"))
    # the payload signature covers the handler, so re-sign as a deploy that renamed it would
    from dbqueue import serializer

    payload = serializer.dumps(
        db.settings.keyring(), "payload", "tests.jobs:gone", (("func",), (), {})
    )
    with db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE tasks SET payload = :p"), {"p": payload})
    ok = dbqueue.enqueue(jobs.add, args=(1, 1))
    summary = work_off(db)
    assert (summary.failed, summary.succeeded) == (1, 1)
    assert "cannot import handler 'tests.jobs:gone'" in task.refresh().error
    assert ok.refresh().result == 2


def test_result_that_does_not_pickle_keeps_success_with_note(db):
    task = dbqueue.enqueue(jobs.return_lock)
    work_off(db)
    task.refresh()
    assert task.status is dbqueue.Status.SUCCEEDED
    assert "result could not be stored" in task.error
    with pytest.raises(dbqueue.ResultNotStored):
        _ = task.result


def test_exception_that_does_not_unpickle_is_recorded_as_text(db):
    task = dbqueue.enqueue(jobs.raise_unpicklable, max_attempts=1)
    work_off(db)
    task.refresh()
    assert task.status is dbqueue.Status.FAILED
    assert task.exception is None
    assert "Unpicklable: odd" in task.error and "could not be stored" in task.error


def test_batch_claims_grow_for_fast_tasks(db):
    dbqueue.enqueue_many(jobs.noop, [()] * 300)
    w = worker.Worker(db.settings)
    summary = w.work_off()
    assert summary.succeeded == 300
    assert w.batch_size() > 1


def _record_claim_limits(w: worker.Worker) -> list[int]:
    """The limit of each claim `w` makes from now on (a real claim, only watched)."""
    limits: list[int] = []
    claim = w.claim

    def counted(limit: int) -> list[Any]:
        limits.append(limit)
        return claim(limit)

    w.claim = counted  # type: ignore[method-assign]
    return limits


def test_batch_claims_reach_full_size_in_few_claims(db):
    """A new worker's first claim is one task; the next ones grow by BATCH_GROWTH up to the
    batch window. Blending the first measurement into the pessimistic 1-second guess took
    about 20 claims of a task or two first: 32 processes draining a burst made 640 of them."""
    dbqueue.enqueue_many(jobs.noop, [()] * 300)
    w = worker.Worker(db.settings)
    limits = _record_claim_limits(w)
    assert w.work_off().succeeded == 300
    print("CLAIMLIMITS", limits)
    assert limits[:3] == [1, worker.BATCH_GROWTH, worker.BATCH_GROWTH**2]
    assert len(limits) <= 8


def test_claims_of_large_payloads_hold_about_batch_bytes(db, monkeypatch):
    """Claims are bounded by payload bytes as well as by seconds: a worker taking 500 fast
    tasks of a megabyte each would hold 500 MB. Here the bound is 20 KB and each payload
    about 2 KB: after the first claims measure them, a claim asks for about ten."""
    monkeypatch.setattr(worker, "BATCH_BYTES", 20_000)
    dbqueue.enqueue_many(jobs.echo, [("x" * 2_000,)] * 60)
    w = worker.Worker(db.settings)
    limits = _record_claim_limits(w)
    assert w.work_off().succeeded == 60
    print("CLAIMLIMITS", limits)
    assert limits[:2] == [1, worker.BATCH_GROWTH]
    assert all(limit <= 10 for limit in limits[2:]), limits
    assert len(limits) >= 7  # 60 tasks at ten at most per claim after 1 + 8


def test_slow_tasks_are_claimed_one_at_a_time(db):
    """The bounded growth does not outrun the measurement: tasks longer than the batch
    window stay one per claim, so other workers can take the rest."""
    dbqueue.enqueue_many(jobs.sleep, [(0.06,)] * 4)
    w = worker.Worker(db.settings)
    limits = _record_claim_limits(w)
    assert w.work_off().succeeded == 4
    assert limits[:4] == [1, 1, 1, 1]


def test_worker_registers_and_unregisters(db):
    w = worker.Worker(db.settings)
    w.start()
    assert db.scalar("SELECT count(*) FROM workers") == 1
    w.shutdown()
    assert db.scalar("SELECT count(*) FROM workers") == 0


def test_fenced_write_from_a_worker_that_lost_ownership_is_dropped(db):
    task = dbqueue.enqueue(jobs.noop)
    with db.engine.begin() as conn:
        (row,) = store.claim(conn, "worker-a", 1)
        store.rescue(conn, ["worker-a"], "presumed dead")
        (_again,) = store.claim(conn, "worker-b", 1)
    late = store.Outcome(id=row.id, attempts=row.attempts, status=dbqueue.Status.SUCCEEDED)
    with db.engine.begin() as conn:
        assert store.record(conn, "worker-a", [late]) == 0
    task.refresh()
    assert task.status is dbqueue.Status.RUNNING and task.locked_by == "worker-b"
    assert task.attempts == 2


@pytest.mark.postgresql_only
def test_claim_on_a_killed_connection_is_retried_on_a_new_one(db):
    """The claim goes to psycopg's cursor directly (store._claim_on_driver), so it must do
    what SQLAlchemy would: report the dead connection as a disconnect, invalidate it so the
    pool never hands it out again, and let the worker claim on a fresh one, losing nothing."""
    ids = [dbqueue.enqueue(jobs.add, args=(i, 1)).id for i in range(3)]
    w = worker.Worker(db.settings, listen=False, max_batch=1)
    assert w.run_batch() == 1
    assert w._conn is not None
    first_pid = w._conn.connection.driver_connection.info.backend_pid
    assert db.scalar(f"SELECT pg_terminate_backend({first_pid})")
    with pytest.raises(sa.exc.DBAPIError) as raised:
        w.run_batch()
    assert raised.value.connection_invalidated
    assert database.is_disconnect(raised.value)
    assert w._conn is None  # dropped, not kept for the next claim
    try:
        assert w.run_batch() == 1 and w.run_batch() == 1 and w.run_batch() == 0
    finally:
        w._close_conn()
    assert [dbqueue.Task(i).result for i in ids] == [1, 2, 3]


def test_claim_on_a_plain_connection_commits_with_it(db):
    """store.claim on a connection whose transaction has not begun (SQLAlchemy's autobegin):
    the caller's commit() makes the claim stick, as with any statement, even though on
    PostgreSQL the claim goes to psycopg's cursor directly."""
    task = dbqueue.enqueue(jobs.noop)
    with db.engine.connect() as conn:
        (row,) = store.claim(conn, "plain-connection", 1)
        conn.commit()
    assert row.id == task.id
    assert db.scalar(f"SELECT status FROM tasks WHERE id = {task.id}") == "running"
    assert db.scalar(f"SELECT locked_by FROM tasks WHERE id = {task.id}") == "plain-connection"


def test_a_worker_starting_after_a_crash_rescues_before_its_first_claim(db):
    """A worker of this host whose process is gone holds a task: the next worker to start
    queues it again before claiming anything, so it runs first, in its place in the queue
    (the rescue waited for the first heartbeat, after the newer task was claimed; `workoff`
    could exit before that, leaving the task running under the dead worker)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    crashed = dbqueue.enqueue(jobs.noop)
    with db.engine.begin() as conn:
        store.register_worker(
            conn, "crashed:1:aa", socket.gethostname(), gone.pid, None, identity.host_id()
        )
        (claimed,) = store.claim(conn, "crashed:1:aa", 1)
    newer = dbqueue.enqueue(jobs.noop)
    summary = worker.Worker(db.settings).work_off()
    assert claimed.id == crashed.id and summary.succeeded == 2
    crashed.refresh()
    newer.refresh()
    assert crashed.status == newer.status == "succeeded"
    assert crashed.started_at <= newer.started_at
    assert (crashed.attempts, newer.attempts) == (2, 1)  # the dead worker's run, then this one
