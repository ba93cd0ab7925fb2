"""LISTEN/NOTIFY wake-ups: prompt pickup, recovery after the listener is killed, rate limit.

The worker runs with a 30 s --sleep-delay, so a task picked up within seconds of its enqueue
was found through a notification, not a poll (R8). R19: a burst of enqueues sends at most one
NOTIFY per queue per limiter interval, counted by a LISTENer of our own.
"""

from __future__ import annotations

import signal
import threading
import time

import psycopg
import pytest

import dbqueue
from dbqueue import listener
from dbqueue.engines import postgresql as pg_engine
from tests import jobs

pytestmark = pytest.mark.postgresql_only

LONG_POLL = "30"  # seconds: far longer than any wait below, so polling cannot explain a pickup
PROMPT = 5.0  # seconds within which a notified worker must have run the task

LISTENER_PIDS = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name = 'dbqueue-listener' ORDER BY pid"
)


def _listener_pids(db) -> list[int]:
    return [r[0] for r in db.rows(LISTENER_PIDS)]


def _wait_listener(db, other_than: int | None = None, timeout: float = 60) -> tuple[int, float]:
    """The pid of the worker's LISTEN backend, and the seconds it took to appear (a worker
    starting on a loaded machine takes seconds; the reconnect test bounds its own time)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        pids = [p for p in _listener_pids(db) if p != other_than]
        if pids:
            return pids[0], time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"no LISTEN connection (other than {other_than}) within {timeout}s")


def _done(db, task_id: int) -> None:
    db.wait_for(f"SELECT status FROM tasks WHERE id = {task_id}", "succeeded", timeout=PROMPT)


def _stop(proc) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return out, err


def _start_idle_worker(db):
    proc = db.popen("work", "--import", "tests.jobs", "--sleep-delay", LONG_POLL)
    try:
        _wait_listener(db)
        db.wait_for("SELECT count(*) FROM workers", 1)
        # warm-up task: the worker has done its first claim and is now asleep for 30 s
        _done(db, dbqueue.enqueue(jobs.noop).id)
        time.sleep(0.3)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc


def test_enqueue_wakes_an_idle_worker_through_notify(db):
    proc = _start_idle_worker(db)
    try:
        for _ in range(3):
            task = dbqueue.enqueue(jobs.add, args=(2, 3))
            _done(db, task.id)
            assert task.result == 5
            time.sleep(0.2)
    finally:
        _, err = _stop(proc)
    assert "Traceback" not in err


def test_listener_killed_is_reestablished_and_wakes_again(db):
    proc = _start_idle_worker(db)
    try:
        (old_pid,) = _listener_pids(db)
        killed = db.scalar(f"SELECT pg_terminate_backend({old_pid})")
        assert killed is True
        new_pid, took = _wait_listener(db, other_than=old_pid)
        assert new_pid != old_pid
        assert took <= 5.0, f"listener came back after {took:.1f}s"
        time.sleep(0.3)
        task = dbqueue.enqueue(jobs.add, args=(20, 22))
        _done(db, task.id)
        assert task.result == 42
    finally:
        _, err = _stop(proc)
    lost = [line for line in err.splitlines() if "LISTEN connection lost" in line]
    assert len(lost) == 1, err
    assert "WARNING" in lost[0]
    assert "Traceback" not in err


def test_listener_thread_reconnects_in_process(db):
    """The same recovery seen from inside: wakeup is set again after the backend dies."""
    wakeup = threading.Event()
    thread = listener.Listener(db.engine, wakeup, ["mail"])
    thread.start()
    try:
        assert thread.connected.wait(10)
        first = thread.backend_pid
        wakeup.clear()
        dbqueue.enqueue(jobs.noop, queue="other")
        assert not wakeup.wait(0.5), "a NOTIFY for another queue woke the worker"
        dbqueue.enqueue(jobs.noop, queue="mail")
        assert wakeup.wait(PROMPT)
        db.scalar(f"SELECT pg_terminate_backend({first})")
        deadline = time.monotonic() + 5
        while thread.backend_pid in (None, first) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert thread.backend_pid not in (None, first)
        assert thread.losses == 1
        time.sleep(0.2)
        wakeup.clear()
        time.sleep(pg_engine.NOTIFY_MIN_INTERVAL)
        dbqueue.enqueue(jobs.noop, queue="mail")
        assert wakeup.wait(PROMPT)
    finally:
        thread.stop()
    assert not thread.is_alive()


def test_notify_is_rate_limited_per_queue(db, monkeypatch):
    """R19: 10,000 tasks enqueued in a burst send at most one NOTIFY per queue per interval.

    The interval is raised to 0.2 s so that the burst outpaces it even on a loaded machine.
    """
    interval = 0.2
    monkeypatch.setattr(pg_engine, "NOTIFY_MIN_INTERVAL", interval)
    monkeypatch.setattr(pg_engine, "limiter", pg_engine.NotifyLimiter())
    params = listener.connect_params(db.engine)
    calls = {"a": 0, "b": 0}
    with psycopg.connect(**params) as conn:
        conn.execute(f"LISTEN {pg_engine.NOTIFY_CHANNEL}")
        started = time.monotonic()
        for i in range(500):
            queue = "a" if i % 2 else "b"
            calls[queue] += 1
            if i % 25:
                dbqueue.enqueue_many(jobs.noop, [()] * 20, queue=queue)
            else:  # some single enqueues too, each its own transaction
                for _ in range(20):
                    dbqueue.enqueue(jobs.noop, queue=queue)
                calls[queue] += 19
        elapsed = time.monotonic() - started
        received: dict[str, int] = {}
        for notify in conn.notifies(timeout=1.0):
            received[notify.payload] = received.get(notify.payload, 0) + 1
    assert db.scalar("SELECT count(*) FROM tasks") == 10_000
    allowed = elapsed / interval + 1
    print(f"NOTIFYLIMIT tasks=10000 transactions={calls} seconds={elapsed:.2f} sent={received}")
    assert set(received) == {"a", "b"}
    for queue, count in received.items():
        assert count <= allowed, f"queue {queue}: {count} NOTIFYs in {elapsed:.2f}s"
        assert count < calls[queue] / 5, f"queue {queue}: {count} NOTIFYs for {calls[queue]}"


def test_an_idle_listener_sleeps_until_a_notification_and_stops_at_once(db, monkeypatch):
    """The thread reads the connection only when a notification arrives: it polled
    `notifies(timeout=0.25)` before, four reads a second per idle worker, each about 0.7 ms
    of CPU (32 idle workers spent a tenth of the machine's CPU on it). stop() wakes it."""
    reads: list[float] = []
    real_notifies = psycopg.Connection.notifies

    def counted(self, *args, **kwargs):
        reads.append(time.monotonic())
        return real_notifies(self, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "notifies", counted)
    wakeup = threading.Event()
    thread = listener.Listener(db.engine, wakeup, ["mail"])
    thread.start()
    try:
        assert thread.connected.wait(10)
        time.sleep(1.5)
        assert reads == [], f"the idle listener read its connection {len(reads)} times"
        wakeup.clear()
        dbqueue.enqueue(jobs.noop, queue="mail")
        assert wakeup.wait(PROMPT)
        assert len(reads) >= 1
    finally:
        thread.stop(timeout=5)  # shorter than LIVENESS_CHECK: only the stop pair can wake it
        stopped = not thread.is_alive()
    assert stopped
