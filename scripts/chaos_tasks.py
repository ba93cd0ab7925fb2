"""The task the chaos run enqueues (`--import chaos_tasks`, scripts/ on PYTHONPATH).

Each run of a task writes a row in `chaos_runs` (which worker, which pid, which attempt the
row said, when it started and ended) through its own connection, so that the checker can
tell a duplicate run from a lost one and name the fault that caused it. The writes retry
through database restarts and terminated connections: the run log must not miss a run
because the fault it documents was happening.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid
from typing import Any

import sqlalchemy as sa

WRITE_PATIENCE = 120.0  # seconds a run-log write keeps retrying before the task raises

_engine: sa.Engine | None = None

START = sa.text("""
INSERT INTO chaos_runs (run_id, label, task_id, attempt, owner, worker, pid, started)
SELECT :run_id, e.label, t.id, t.attempts, t.locked_by, :worker, :pid, :started
FROM chaos_enqueued e JOIN tasks t ON t.id = e.task_id
WHERE e.label = :label
""")
END = sa.text("UPDATE chaos_runs SET ended = :ended WHERE run_id = :run_id")


def _write(sql: sa.TextClause, params: dict[str, Any]) -> int:
    """Run one autocommit statement, reconnecting until it succeeds; returns its rowcount.

    CHAOS_URL: the run log's database (PostgreSQL or MariaDB), reached as the workers are,
    so a fault on the workers' connections hits these too."""
    global _engine
    if _engine is None:
        _engine = sa.create_engine(
            os.environ["CHAOS_URL"],
            isolation_level="AUTOCOMMIT",
            pool_size=1,
            connect_args={"connect_timeout": 5},
        )
    deadline = time.monotonic() + WRITE_PATIENCE
    while True:
        try:
            with _engine.connect() as conn:
                return int(conn.execute(sql, params).rowcount)
        except sa.exc.DBAPIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run(label: str, seconds: float) -> dict[str, Any]:
    """Log this run's start, work for `seconds`, log its end; the result names the run, so
    the checker can see which run's outcome the row kept."""
    started = time.time()
    run_id = uuid.uuid4().hex
    worker = multiprocessing.current_process().name  # the supervisor names its children
    params = {
        "run_id": run_id,
        "label": label,
        "worker": worker,
        "pid": os.getpid(),
        "started": started,
    }
    if _write(START, params) != 1:
        raise RuntimeError(f"chaos task {label}: no ledger row (was it enqueued by scripts/chaos?)")
    time.sleep(seconds)
    _write(END, {"run_id": run_id, "ended": time.time()})
    return {"run_id": run_id, "worker": worker, "pid": os.getpid()}
