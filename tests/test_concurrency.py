"""Many worker processes over one table: every task runs exactly once (no crash involved)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import dbqueue
from tests import jobs

TASKS = 2000


def make_runs_table(db) -> None:
    with db.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE runs (label VARCHAR(50) NOT NULL, pid INTEGER)"))


@pytest.mark.slow
def test_four_worker_processes_run_every_task_exactly_once(db):
    make_runs_table(db)
    dbqueue.enqueue_many(jobs.record_run, [(db.url, f"t{i}") for i in range(TASKS)])
    result = db.cli("workoff", "--concurrency", "4", "--import", "tests.jobs", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{TASKS} succeeded" in result.stdout
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'succeeded'") == TASKS
    assert db.scalar("SELECT count(*) FROM runs") == TASKS
    assert db.scalar("SELECT count(DISTINCT label) FROM runs") == TASKS
    pids = db.scalar("SELECT count(DISTINCT pid) FROM runs")
    print(f"CONCURRENCY db={db.kind} tasks={TASKS} workers=4 pids_used={pids}")
    assert pids >= 2  # the work was really shared
