"""`dbqueue work` recycling its worker processes (--max-tasks, --max-memory), with real
processes on both databases: a recycled child is replaced, loses nothing, and the supervisor
still stops cleanly on SIGTERM. (A crashed child's restart is in test_reliability.py.)"""

from __future__ import annotations

import collections
import signal

import pytest

import dbqueue
from tests import jobs

pytestmark = [pytest.mark.slow]


def _pids_by_task(db) -> dict[int, int]:
    return {
        r.id: dbqueue.Task(r.id).result
        for r in db.rows("SELECT id FROM tasks WHERE status = 'succeeded' ORDER BY id")
    }


def _work_until_done(db, tasks: int, *options: str) -> str:
    """`dbqueue work OPTIONS` until `tasks` tasks succeeded, then SIGTERM: it must exit 0."""
    proc = db.popen("work", "--import", "tests.jobs", "--sleep-delay", "0.2", *options)
    try:
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'succeeded'", tasks, timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    return err


def test_max_tasks_recycles_each_child_after_n_tasks(db):
    ids = dbqueue.enqueue_many(jobs.whoami, [(0.0,)] * 12)
    _work_until_done(db, 12, "--max-tasks", "4")
    per_pid = collections.Counter(_pids_by_task(db).values())
    print(f"RECYCLE db={db.kind} max_tasks=4 tasks_per_process={sorted(per_pid.values())}")
    assert len(per_pid) >= 3  # 12 tasks, at most 4 each: at least three processes ran them
    assert max(per_pid.values()) <= 4
    assert db.scalar("SELECT count(*) FROM tasks WHERE status <> 'succeeded'") == 0
    assert sorted(_pids_by_task(db)) == ids
    assert db.scalar("SELECT max(attempts) FROM tasks") == 1  # recycling re-ran nothing


def test_max_memory_recycles_a_child_over_the_limit_between_tasks(db):
    dbqueue.enqueue_many(jobs.whoami, [(0.0,)] * 4)
    # every Python process is over 1 MiB: each child recycles after its first batch
    err = _work_until_done(db, 4, "--max-memory", "1")
    pids = set(_pids_by_task(db).values())
    print(f"RECYCLE db={db.kind} max_memory=1 processes={len(pids)} for 4 tasks")
    assert len(pids) >= 2
    assert "recycling" in err
    assert db.scalar("SELECT count(*) FROM tasks WHERE status <> 'succeeded'") == 0
    assert db.scalar("SELECT max(attempts) FROM tasks") == 1


def test_crash_backoff_grows_with_recent_crashes_and_forgets_old_ones():
    """A crash loop backs off to 5 s; once crashes stop for a minute, a crash restarts fast
    again (the count used to grow for the supervisor's whole life)."""
    from dbqueue import supervisor

    boss = supervisor.Supervisor(supervisor.ChildSpec(database_url="sqlite://"))
    delays = [boss._backoff() for _ in range(8)]
    assert delays == sorted(delays) and delays[0] == pytest.approx(0.2) and delays[-1] == 5.0
    boss._crash_times = [t - supervisor.CRASH_WINDOW - 1 for t in boss._crash_times]
    assert boss._backoff() == pytest.approx(0.2)
