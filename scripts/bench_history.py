"""Scale of history: how fast dbqueue claims with millions of finished rows in its table, and
how fast `dbqueue prune` deletes them (issue 21, point 4).

The full database is filled with `generate_series` in blocks of a million rows (each its own
commit), as a busy application's table would look after weeks without pruning; `--scale` in
scripts/bench makes that 10,000,000 rows."""

from __future__ import annotations

import signal
import statistics
import subprocess
import time

import bench_tasks
import sqlalchemy as sa
from bench_setup import ROOT, Figures, dbqueue_command, scalar, vacuum, worker_env

import dbqueue
from dbqueue import config, store
from dbqueue.schema import tasks

FILL_BLOCK = 1_000_000

FILL_FINISHED = """
INSERT INTO tasks (queue, priority, run_at, status, handler, payload, attempts, max_attempts,
                   created_at, started_at, finished_at)
SELECT 'default', 0, now() - interval '1 day', 'succeeded', 'bench_tasks:noop', '\\x00'::bytea,
       1, 25, now() - interval '1 day', now() - interval '1 day', now() - interval '1 day'
FROM generate_series(1, {n})
"""


def _claim_pass(settings: config.Settings, queued: int, limit: int) -> float:
    """Seconds spent in claim transactions taking `queued` fresh tasks, `limit` at a time."""
    dbqueue.enqueue_many(bench_tasks.noop, [()] * queued, settings=settings)
    vacuum(settings)
    engine = settings.get_engine()
    spent = 0.0
    while True:
        started = time.perf_counter()
        with engine.begin() as conn:
            rows = store.claim(conn, "bench-claim", limit)
        spent += time.perf_counter() - started
        if not rows:
            break
    with engine.begin() as conn:
        conn.execute(sa.delete(tasks).where(tasks.c.status == "running"))
    return spent


def claim_speed(
    empty_db: config.Settings, full_db: config.Settings, finished: int, queued: int, passes: int
) -> Figures:
    """Claimed rows/s in a database with no other rows and in one holding `finished` finished
    rows, measured in alternating passes so that the machine's drift falls on both alike.

    The full database is filled, vacuumed and checkpointed before any pass, so no autovacuum
    or checkpoint of the fill runs during them; one untimed pass warms each connection first
    (the first claims on a connection are neither prepared nor cached)."""
    fill_seconds = fill_finished(full_db, finished)
    with full_db.get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.exec_driver_sql("CHECKPOINT")
    _claim_pass(empty_db, queued, limit=100)
    _claim_pass(full_db, queued, limit=100)
    empty, full = [], []
    for _ in range(passes):
        empty.append(queued / _claim_pass(empty_db, queued, limit=100))
        full.append(queued / _claim_pass(full_db, queued, limit=100))
    figures = {
        "claim_empty_per_s": statistics.median(empty),
        "claim_full_per_s": statistics.median(full),
        "finished_rows": float(finished),
        "passes": float(passes),
        "fill_seconds": fill_seconds,
    }
    ratios = [f / e for f, e in zip(full, empty, strict=True)]
    figures["claim_full_vs_empty"] = statistics.median(ratios)
    return figures


def fill_finished(settings: config.Settings, finished: int) -> float:
    """Insert `finished` succeeded rows, a day old, in blocks; vacuum. Returns the seconds."""
    started = time.monotonic()
    left = int(finished)
    while left > 0:
        block = min(FILL_BLOCK, left)
        with settings.get_engine().begin() as conn:
            conn.execute(sa.text(FILL_FINISHED.format(n=block)))
        left -= block
    vacuum(settings)
    return time.monotonic() - started


def prune_rate(settings: config.Settings, seconds: float) -> Figures:
    """`dbqueue prune --older-than 1h` on the filled table, as a user runs it (its own process,
    batches of 5,000, each its own transaction): rows deleted per second of its wall clock.
    Stopped after `seconds` if not done (each batch commits, so what it deleted stays)."""
    before = int(scalar(settings, "SELECT count(*) FROM tasks"))
    started = time.monotonic()
    proc = subprocess.Popen(
        dbqueue_command("prune", "--older-than", "1h"),
        env=worker_env(settings),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    finished = True
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        finished = False
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    elapsed = time.monotonic() - started
    if finished and proc.returncode != 0:
        raise RuntimeError(f"dbqueue prune exited {proc.returncode}")
    deleted = before - int(scalar(settings, "SELECT count(*) FROM tasks"))
    return {
        "prune_per_s": deleted / elapsed,
        "pruned_rows": float(deleted),
        "prune_seconds": elapsed,
        "prune_complete": float(finished),
    }


def history(
    empty_db: config.Settings,
    full_db: config.Settings,
    finished: int,
    queued: int,
    passes: int,
    prune_seconds: float,
) -> Figures:
    """Claim speed with `finished` rows vs none, then the prune rate on those rows."""
    figures = claim_speed(empty_db, full_db, finished, queued, passes)
    figures.update(prune_rate(full_db, prune_seconds))
    return figures
