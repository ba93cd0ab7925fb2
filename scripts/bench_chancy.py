"""chancy (PyPI `chancy`, a PostgreSQL queue on psycopg 3) beside dbqueue: enqueue one by one
and in batches of 1,000, the drain of no-op jobs, and the I/O-bound drain (bench_io.py).

Its worker has no drain-and-exit mode: each process runs a `Worker` with one queue on the
asyncio executor (`concurrency` jobs fetched and run at once, eager polling: a finished job
wakes the next fetch) and stops when no job is left. Job outcomes reach the table in batches
once a second, so the drain rate is read from the jobs' own clock, jobs / (last completed_at -
first started_at), as dbqueue's is (not from the moment the last outcome was written)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import warnings
from typing import Any

import psycopg
from bench_peers import (
    StartGate,
    _child_main,
    _error,
    drain_on_own_clock,
    throwaway_db,
    wait_until_done,
)

Figures = dict[str, float | str]
QUEUE = "bench"
SKIP = "chancy not installed (pip install -e '.[bench]')"
UNFINISHED = "SELECT count(*) FROM chancy_jobs WHERE state NOT IN ('succeeded', 'failed')"


async def noop() -> None:
    return None


async def wait(seconds: float) -> None:
    await asyncio.sleep(seconds)


def _quiet() -> logging.Logger:
    log = logging.getLogger("bench.chancy")
    log.setLevel(logging.CRITICAL + 1)
    log.propagate = False
    return log


def _app(dsn: str, pool: int) -> Any:
    from chancy import Chancy

    # no default plugins: no leader election, pruner, metrics or workflows competing for the
    # two cores while jobs run (dbqueue's workoff runs none either)
    return Chancy(
        dsn,
        max_connection_pool_size=pool,
        no_default_plugins=True,
        log=_quiet(),
        notifications=False,
    )


def _job(seconds: float) -> Any:
    from chancy import Job

    if seconds:
        return Job.from_func(wait, queue=QUEUE).with_kwargs(seconds=seconds)
    return Job.from_func(noop, queue=QUEUE)


async def _install(dsn: str, concurrency: int) -> None:
    from chancy import Chancy, Queue

    async with _app(dsn, 2) as app:
        await app.migrate()
        # every Worker declares "default" (process pool executor) unless it exists; declared
        # here on the asyncio executor, idle, so no worker forks a pool for it
        await app.declare(Queue(name="default", executor=Chancy.Executor.Async, concurrency=1))
        await app.declare(
            Queue(
                name=QUEUE,
                concurrency=concurrency,
                executor=Chancy.Executor.Async,
                polling_interval=1,
                eager_polling=True,
            )
        )


async def _push_many(dsn: str, jobs: int, seconds: float) -> float:
    async with _app(dsn, 2) as app:
        started = time.perf_counter()
        async for _ in app.push_many([_job(seconds)] * jobs, batch_size=1000):
            pass
        return time.perf_counter() - started


async def _push_single(dsn: str, n: int) -> float:
    async with _app(dsn, 2) as app:
        for _ in range(min(n, 50)):  # warm up
            await app.push(_job(0))
        started = time.perf_counter()
        for _ in range(n):
            await app.push(_job(0))
        elapsed = time.perf_counter() - started
        async with app.pool.connection() as conn:
            await conn.execute("DELETE FROM chancy_jobs")
        return elapsed


def _drain_child(dsn: str, gate: StartGate) -> None:
    async def body() -> None:
        from chancy import Worker

        async with _app(dsn, 4) as app:
            await asyncio.get_running_loop().run_in_executor(None, gate.ready)
            async with Worker(app, register_signal_handlers=False) as worker:
                async with app.pool.connection() as conn:
                    await wait_until_done(conn, UNFINISHED)
                await worker.stop()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _child_main(body, gate)


def _drain(dsn: str, jobs: int, processes: int) -> float:
    return drain_on_own_clock(
        functools.partial(_drain_child, dsn),
        processes,
        dsn,
        UNFINISHED,
        "SELECT count(*), extract(epoch FROM max(completed_at) - min(started_at)) "
        "FROM chancy_jobs WHERE state = 'succeeded'",
        jobs,
    )


def chancy_scenarios(
    admin_dsn: str, jobs: int, single_n: int, processes: int = 2, concurrency: int = 100
) -> Figures:
    """Enqueue one by one, enqueue in batches of 1,000, drain `jobs` no-op jobs."""
    try:
        import chancy  # noqa: F401
    except ImportError:
        return {"skipped": SKIP}
    try:
        with throwaway_db(admin_dsn, "chancy") as dsn:
            asyncio.run(_install(dsn, concurrency))
            single = asyncio.run(_push_single(dsn, single_n))
            batch = asyncio.run(_push_many(dsn, jobs, 0))
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE chancy_jobs")
            return {
                "enqueue_single_per_s": single_n / single,
                "enqueue_batch_per_s": jobs / batch,
                "drain_per_s": _drain(dsn, jobs, processes),
                "notes": f"{processes} processes x Worker, asyncio executor, concurrency "
                f"{concurrency}, eager polling",
            }
    except Exception as exc:
        return _error(exc)


def chancy_io(admin_dsn: str, jobs: int, processes: int, at_once: int, seconds: float) -> Figures:
    """`jobs` jobs each awaiting `seconds`, `processes` workers x `at_once` at a time."""
    try:
        import chancy  # noqa: F401
    except ImportError:
        return {"skipped": SKIP}
    try:
        with throwaway_db(admin_dsn, "chancyio") as dsn:
            asyncio.run(_install(dsn, at_once))
            asyncio.run(_push_many(dsn, jobs, seconds))
            return {"io_per_s": _drain(dsn, jobs, processes)}
    except Exception as exc:
        return _error(exc)
