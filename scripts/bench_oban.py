"""The Python Oban port (PyPI `oban`, PostgreSQL, psycopg 3) beside dbqueue: enqueue one by one
and in batches of 1,000, the drain of no-op jobs, and the I/O-bound drain (bench_io.py).

oban needs Python >= 3.12. scripts/bench may run on an older Python (dbqueue supports 3.11),
so this file also runs on its own, under any interpreter with oban installed, and prints its
figures as JSON; scripts/bench calls it that way (see `oban_figures`), with the interpreter of
DBQUEUE_BENCH_OBAN_PYTHON or .venv-oban/ (made by `scripts/bench --install` when a Python
3.12+ is found). It imports bench_peers (psycopg) and oban only, never dbqueue.

Each worker process runs one Oban instance with one queue (`limit` jobs at once, jobs
dispatched as asyncio tasks, acknowledgements batched before each fetch; no leadership, so
no pruner or stager competes) and stops when no job is left. The rate is read from the jobs'
own clock, jobs / (last completed_at - first attempted_at), as dbqueue's is.

    .venv-oban/bin/python scripts/bench_oban.py --dsn postgresql://postgres@127.0.0.1/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg
from bench_peers import (
    DEFAULT_ADMIN_DSN,
    StartGate,
    _child_main,
    _error,
    drain_on_own_clock,
    throwaway_db,
    wait_until_done,
)

Figures = dict[str, Any]
QUEUE = "bench"
UNFINISHED = "SELECT count(*) FROM oban_jobs WHERE state IN ('available', 'executing')"
ROOT = Path(__file__).resolve().parent.parent
NEEDS = "oban needs Python >= 3.12"


def _workers() -> tuple[Any, Any]:
    from oban import worker

    @worker(queue=QUEUE)
    class Noop:
        async def process(self, job: Any) -> None:
            return None

    @worker(queue=QUEUE)
    class Wait:
        async def process(self, job: Any) -> None:
            await asyncio.sleep(float(job.args["s"]))

    return Noop, Wait


NOOP, WAIT = (None, None)
if sys.version_info >= (3, 12):
    try:
        NOOP, WAIT = _workers()  # module level: worker processes find them by name
    except ImportError:
        pass


async def _pool(dsn: str, size: int) -> Any:
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(dsn, min_size=1, max_size=size, open=False)
    await pool.open()
    return pool


async def _install(dsn: str) -> None:
    from oban.schema import install

    pool = await _pool(dsn, 2)
    try:
        await install(pool)
    finally:
        await pool.close()


def _job(seconds: float) -> Any:
    return WAIT.new({"s": seconds}) if seconds else NOOP.new({})


async def _enqueue(dsn: str, single_n: int, jobs: int, seconds: float) -> Figures:
    from oban import Oban

    pool = await _pool(dsn, 2)
    figures: Figures = {}
    try:
        async with Oban(pool=pool, leadership=False) as oban:
            if single_n:
                for _ in range(min(single_n, 50)):  # warm up
                    await oban.enqueue(_job(0))
                started = time.perf_counter()
                for _ in range(single_n):
                    await oban.enqueue(_job(0))
                figures["enqueue_single_per_s"] = single_n / (time.perf_counter() - started)
                async with pool.connection() as conn:
                    await conn.execute("DELETE FROM oban_jobs")
            left = jobs
            started = time.perf_counter()
            while left > 0:
                k = min(1000, left)
                await oban.enqueue_many([_job(seconds) for _ in range(k)])
                left -= k
            figures["enqueue_batch_per_s"] = jobs / (time.perf_counter() - started)
    finally:
        await pool.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE oban_jobs")
    return figures


def _drain_child(dsn: str, limit: int, gate: StartGate) -> None:
    async def body() -> None:
        from oban import Oban

        pool = await _pool(dsn, 4)
        try:
            await asyncio.get_running_loop().run_in_executor(None, gate.ready)
            async with Oban(pool=pool, queues={QUEUE: limit}, leadership=False):
                async with pool.connection() as conn:
                    await wait_until_done(conn, UNFINISHED)
        finally:
            await pool.close()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _child_main(body, gate)


def _drain(dsn: str, jobs: int, processes: int, limit: int) -> float:
    return drain_on_own_clock(
        functools.partial(_drain_child, dsn, limit),
        processes,
        dsn,
        UNFINISHED,
        "SELECT count(*), extract(epoch FROM max(completed_at) - min(attempted_at)) "
        "FROM oban_jobs WHERE state = 'completed'",
        jobs,
    )


def oban_scenarios(
    admin_dsn: str,
    jobs: int,
    single_n: int,
    io_jobs: int,
    processes: int = 2,
    limit: int = 100,
    io_seconds: float = 0.05,
) -> Figures:
    """Enqueue (one by one, batches), the no-op drain, then the I/O-bound drain (io_per_s)."""
    if NOOP is None:
        return {"skipped": f"{NEEDS} (this run: {sys.version.split()[0]}) and must be installed"}
    try:
        with throwaway_db(admin_dsn, "oban") as dsn:
            asyncio.run(_install(dsn))
            figures = asyncio.run(_enqueue(dsn, single_n, jobs, 0))
            figures["drain_per_s"] = _drain(dsn, jobs, processes, limit)
        with throwaway_db(admin_dsn, "obanio") as dsn:
            asyncio.run(_install(dsn))
            asyncio.run(_enqueue(dsn, 0, io_jobs, io_seconds))
            figures["io_per_s"] = _drain(dsn, io_jobs, processes, limit)
        figures["notes"] = f"{processes} processes x Oban, queue limit {limit}"
        return figures
    except Exception as exc:
        return _error(exc)


def interpreter() -> str | None:
    """A Python that has oban: this one, DBQUEUE_BENCH_OBAN_PYTHON, or .venv-oban/."""
    if NOOP is not None:
        return sys.executable
    for candidate in (os.environ.get("DBQUEUE_BENCH_OBAN_PYTHON"), ROOT / ".venv-oban/bin/python"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


def oban_figures(admin_dsn: str, jobs: int, single_n: int, io_jobs: int) -> Figures:
    """oban_scenarios here or, when this Python has no oban, in a Python that has."""
    python = interpreter()
    if python is None:
        return {
            "skipped": f"{NEEDS} (this run: {sys.version.split()[0]}); set "
            "DBQUEUE_BENCH_OBAN_PYTHON or run scripts/bench --install with a python3.12 on PATH"
        }
    if python == sys.executable:
        return oban_scenarios(admin_dsn, jobs, single_n, io_jobs)
    done = subprocess.run(
        [
            python,
            __file__,
            "--dsn",
            admin_dsn,
            "--jobs",
            str(jobs),
            "--single-n",
            str(single_n),
            "--io-jobs",
            str(io_jobs),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    try:
        figures: Figures = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{python} {Path(__file__).name} exited {done.returncode}: {tail}"}
    figures.setdefault("notes", "")
    figures["notes"] = f"{figures['notes']}; Python {_version(python)}"
    return figures


def _version(python: str) -> str:
    done = subprocess.run(
        [python, "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", default=os.environ.get("DBQUEUE_BENCH_DSN", DEFAULT_ADMIN_DSN))
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--single-n", type=int, default=2_000)
    parser.add_argument("--io-jobs", type=int, default=5_000)
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("oban").setLevel(logging.CRITICAL + 1)
    # by its module name, not __main__: Oban records each job's worker by module and class
    # name, and the worker processes import this file as bench_oban
    import bench_oban

    figures = bench_oban.oban_scenarios(args.dsn, args.jobs, args.single_n, args.io_jobs)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
