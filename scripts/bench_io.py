"""I/O-bound tasks (issue 21, point 4): `jobs` tasks that each wait `seconds` (an HTTP call, a
mail), run by `processes` worker processes with `at_once` tasks in flight in each. Nothing is
CPU-bound, so the limit is processes x at_once / seconds (2 x 100 / 0.05 s = 4,000/s); what a
queue loses against it is its own overhead per task and the gaps between its batches.

dbqueue runs it twice: `async def` tasks awaiting asyncio.sleep with `--async-concurrency`
(one event loop per worker process), and blocking time.sleep tasks with `--threads`. The peers
run the async version at the same concurrency: PgQueuer (max_concurrent_tasks per process),
procrastinate (concurrency per worker) and chancy (asyncio executor, concurrency per queue).
Every rate is read from the database clock where the queue records one (dbqueue: first
started_at to last finished_at; PgQueuer: its log table's first pick to last success;
chancy: its jobs' started_at / completed_at); procrastinate's from the start gate to the last
worker's exit."""

from __future__ import annotations

import asyncio
import functools
import subprocess
import warnings

import bench_peers
import bench_tasks
import psycopg
import sqlalchemy as sa
from bench_peers import STALL_TIMEOUT_S, _error, _run_drain, throwaway_db
from bench_setup import ROOT, Figures, dbqueue_command, drain_rate, worker_env

import dbqueue
from dbqueue import config
from dbqueue.schema import tasks

ASYNC_OPTION = "--async-concurrency"


def limit(processes: int, at_once: int, seconds: float) -> float:
    return processes * at_once / seconds


def has_async_concurrency(settings: config.Settings) -> bool:
    """Whether this dbqueue's workoff takes --async-concurrency (issue 21, point 3)."""
    shown = subprocess.run(
        dbqueue_command("workoff", "--help"),
        env=worker_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return ASYNC_OPTION in shown.stdout


def dbqueue_io(
    settings: config.Settings, jobs: int, processes: int, at_once: int, seconds: float, mode: str
) -> Figures:
    """mode "async": async def tasks with --async-concurrency; "threads": time.sleep tasks
    with --threads. Rate from the database clock; the ratio to the limit beside it."""
    if mode == "async":
        if not has_async_concurrency(settings):
            return {"skipped": f"dbqueue workoff has no {ASYNC_OPTION} here (issue 21, point 3)"}
        func, option = bench_tasks.wait_async, ASYNC_OPTION
    else:
        func, option = bench_tasks.wait_blocking, "--threads"
    with settings.get_engine().begin() as conn:
        conn.execute(sa.delete(tasks))
    left = jobs
    while left > 0:
        k = min(1000, left)
        dbqueue.enqueue_many(func, [(seconds,)] * k, settings=settings)
        left -= k
    figures = drain_rate(settings, jobs, processes, option, str(at_once))
    rate = figures["drain_per_s"]
    return {
        "io_per_s": rate,
        "io_vs_limit": rate / limit(processes, at_once, seconds),
        "io_wall_per_s": figures["drain_wall_per_s"],
    }


# -- peers -------------------------------------------------------------------------------------


async def _pgq_fill(dsn: str, jobs: int) -> None:
    from pgqueuer import Queries
    from pgqueuer.db import AsyncpgDriver

    conn = await bench_peers._pgq_connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        await queries.install()
        left = jobs
        while left > 0:
            k = min(1000, left)
            await queries.enqueue(
                [bench_peers.PGQ_ENTRYPOINT] * k, [bench_peers.PAYLOAD] * k, [0] * k
            )
            left -= k
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


def pgqueuer_io(admin: str, jobs: int, processes: int, at_once: int, seconds: float) -> Figures:
    """PgQueuer: `processes` QueueManagers, max_concurrent_tasks=at_once (batch at_once / 2,
    the largest PgQueuer allows with that cap), each job awaiting `seconds`."""
    try:
        import pgqueuer  # noqa: F401
    except ImportError:
        return {"skipped": bench_peers.SKIP_PGQUEUER}
    bench_peers._silence_peers()
    try:
        with warnings.catch_warnings(), throwaway_db(admin, "pgqio") as dsn:
            warnings.simplefilter("ignore")
            from pgqueuer.domain.settings import db_settings

            names = db_settings()
            asyncio.run(_pgq_fill(dsn, jobs))
            elapsed = _run_drain(
                functools.partial(bench_peers._pgq_drain_child, sleep=seconds, at_once=at_once),
                [(dsn, max(1, at_once // 2)) for _ in range(processes)],
                dsn,
                f"SELECT count(*) FROM {names.queue_table}",
                STALL_TIMEOUT_S,
            )
            with psycopg.connect(dsn) as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'successful'), extract(epoch FROM "
                    "max(created) FILTER (WHERE status = 'successful') - "
                    f"min(created) FILTER (WHERE status = 'picked')) FROM {names.queue_table_log}"
                ).fetchone()
        done, span = (int(row[0]), float(row[1] or 0)) if row else (0, 0.0)
        figures: Figures = {"io_gate_per_s": jobs / elapsed}
        figures["io_per_s"] = jobs / span if done == jobs and span > 0 else jobs / elapsed
        figures["io_vs_limit"] = float(figures["io_per_s"]) / limit(processes, at_once, seconds)
        return figures
    except Exception as exc:
        return _error(exc)


async def _proc_fill(dsn: str, jobs: int) -> None:
    app = bench_peers._proc_app(dsn, max_size=2)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        task = app.tasks[bench_peers.PROC_TASK]
        left = jobs
        while left > 0:
            k = min(1000, left)
            await task.batch_defer_async(*({"i": 0} for _ in range(k)))
            left -= k
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def procrastinate_io(
    admin: str, jobs: int, processes: int, at_once: int, seconds: float
) -> Figures:
    """procrastinate: `processes` workers with concurrency=at_once, each job awaiting
    `seconds`; from the start gate to the last worker's exit (it has no drain clock)."""
    try:
        import procrastinate  # noqa: F401
    except ImportError:
        return {"skipped": bench_peers.SKIP_PROCRASTINATE}
    bench_peers._silence_peers()
    try:
        with warnings.catch_warnings(), throwaway_db(admin, "procio") as dsn:
            warnings.simplefilter("ignore")
            asyncio.run(_proc_fill(dsn, jobs))
            elapsed = _run_drain(
                functools.partial(bench_peers._proc_drain_child, sleep=seconds),
                [(dsn, at_once) for _ in range(processes)],
                dsn,
                "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')",
                STALL_TIMEOUT_S,
            )
        rate = jobs / elapsed
        return {"io_per_s": rate, "io_vs_limit": rate / limit(processes, at_once, seconds)}
    except Exception as exc:
        return _error(exc)


def chancy_io(admin: str, jobs: int, processes: int, at_once: int, seconds: float) -> Figures:
    import bench_chancy

    figures: Figures = bench_chancy.chancy_io(admin, jobs, processes, at_once, seconds)
    if isinstance(figures.get("io_per_s"), float):
        figures["io_vs_limit"] = float(figures["io_per_s"]) / limit(processes, at_once, seconds)
    return figures
