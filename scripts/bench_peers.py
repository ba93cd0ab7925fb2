"""Reference figures for the dbqueue benchmark: the raw-SQL limit and two peer queues.

``scripts/bench`` prints dbqueue's own figures as ratios against the ones measured
here, in the same run and on the same machine. Every measurement runs in its own
throwaway database (``bench_<name>_<random>``) created from ``admin_dsn`` and dropped
afterwards, also on error.

Functions (all return flat ``dict[str, float | str]``; rates are per second so the
job counts do not matter for comparisons):

* ``raw_limit``: hand-written claim/finish SQL drained by N OS processes.
* ``raw_single_insert`` / ``raw_batch_insert``: committed INSERT rates.
* ``pgqueuer_scenarios``: PgQueuer enqueue (single, batch), drain, idle latency.
* ``procrastinate_scenarios``: the same four figures for procrastinate.

A peer that is not installed yields ``{"skipped": ...}``; a measurement that fails or
stalls (no progress for ``stall_timeout`` seconds) yields ``{"error": ...}``.

Run alone::

    python scripts/bench_peers.py --dsn postgresql://postgres@127.0.0.1:5432/postgres \\
        --jobs 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import queue as queue_mod
import secrets
import statistics
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from multiprocessing.queues import Queue as MPQueue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

Figures = dict[str, float | str]

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
SKIP_PGQUEUER = "pgqueuer not installed (pip install -e '.[bench]')"
SKIP_PROCRASTINATE = "procrastinate not installed (pip install -e '.[bench]')"

STALL_TIMEOUT_S = 60.0  # a drain without progress for this long is aborted
STARTUP_TIMEOUT_S = 120.0  # worker processes must be connected and ready by then
LATENCY_WAIT_S = 10.0  # a single job that has not started after this is an error
CONNECT_TIMEOUT_S = 10
PAYLOAD = b'{"n": 0}'  # a small payload, like a typical task's arguments

_PEER_LOGGERS = ("pgqueuer", "procrastinate", "asyncpg", "psycopg.pool")


class BenchError(RuntimeError):
    """A measurement could not be completed; its message ends up in ``{"error": ...}``."""


# --------------------------------------------------------------------------- helpers


def _silence_peers() -> None:
    """Keep the peers' loggers and warnings out of the benchmark output."""
    for name in _PEER_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.CRITICAL + 1)
        logger.propagate = False
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _db_dsn(admin_dsn: str, dbname: str) -> str:
    """``admin_dsn`` pointing at ``dbname`` instead (libpq key=value form)."""
    return make_conninfo(admin_dsn, dbname=dbname, connect_timeout=CONNECT_TIMEOUT_S)


def _asyncpg_kwargs(dsn: str) -> dict[str, Any]:
    """asyncpg.connect() keyword arguments equivalent to a libpq DSN (URI or key=value)."""
    params = conninfo_to_dict(dsn)
    out: dict[str, Any] = {"timeout": CONNECT_TIMEOUT_S, "command_timeout": STALL_TIMEOUT_S}
    for src, dst in (
        ("host", "host"),
        ("port", "port"),
        ("user", "user"),
        ("password", "password"),
        ("dbname", "database"),
    ):
        value = params.get(src)
        if value is not None and value != "":
            out[dst] = int(value) if dst == "port" else value
    return out


@contextlib.contextmanager
def throwaway_db(admin_dsn: str, name: str) -> Iterator[str]:
    """Create ``bench_<name>_<random>``, yield its DSN, drop it afterwards (also on error)."""
    dbname = f"bench_{name}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    try:
        yield _db_dsn(admin_dsn, dbname)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            # FORCE: also gets rid of connections left behind by killed worker processes.
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )


def _percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _error(exc: BaseException) -> Figures:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return {"error": f"{type(exc).__name__}: {text}" if text else type(exc).__name__}


def _count(dsn: str, query: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
        return int(row[0]) if row else 0


def _ensure_importable() -> None:
    """Spawned children re-import this module by name; make sure its folder is on sys.path."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.append(here)


# ------------------------------------------------------------ multi-process driver


ChildTarget = Callable[..., None]


class StartGate:
    """Start signal shared by the parent and its drain processes.

    A child calls ``ready()`` once connected and prepared, which reports readiness and
    blocks until the parent opens the gate, so connection setup is not timed. The child
    then reports ``("ok", time.monotonic())`` or ``("error", message)`` via ``report``.
    """

    def __init__(self, go: Event, results: MPQueue[tuple[str, Any]]) -> None:
        self.go = go
        self.results = results

    def ready(self) -> None:
        self.results.put(("ready", os.getpid()))
        if not self.go.wait(timeout=STARTUP_TIMEOUT_S):
            raise BenchError("parent never opened the start gate")

    def report(self, status: str, value: Any) -> None:
        self.results.put((status, value))


def _run_drain(
    target: ChildTarget,
    child_args: list[tuple[Any, ...]],
    dsn: str,
    remaining_sql: str,
    stall_timeout: float,
    count: Callable[[str, str], int] | None = None,
) -> float:
    """Run one ``target`` process per entry of ``child_args`` and time the drain.

    Each child is called as ``target(*args, gate)`` (see ``StartGate``). The clock starts
    when every child is ready and the gate opens, and stops at the last child's finish
    stamp (CLOCK_MONOTONIC is system-wide on Linux, so stamps compare across processes).
    While waiting, ``remaining_sql`` is polled; no change for ``stall_timeout`` seconds
    aborts the drain. Returns the elapsed seconds.
    """
    _ensure_importable()
    ctx = mp.get_context("spawn")
    gate = StartGate(ctx.Event(), ctx.Queue())
    procs = [ctx.Process(target=target, args=(*args, gate), daemon=True) for args in child_args]
    ok = False
    for proc in procs:
        proc.start()
    try:
        ready = 0
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while ready < len(procs):
            msg = _next_message(gate, procs)
            if msg is None:
                if time.monotonic() > deadline:
                    raise BenchError("worker processes not ready in time")
                continue
            status, value = msg
            if status != "ready":
                raise BenchError(f"worker failed: {value}")
            ready += 1
        gate.go.set()
        started = time.monotonic()
        finished: list[float] = []
        last_remaining = -1
        last_progress = started
        next_poll = started + 1.0
        while len(finished) < len(procs):
            msg = _next_message(gate, procs)
            if msg is not None:
                status, value = msg
                if status != "ok":
                    raise BenchError(f"worker failed: {value}")
                finished.append(float(value))
                continue
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + 1.0
                remaining = (count or _count)(dsn, remaining_sql)
                if remaining != last_remaining:
                    last_remaining, last_progress = remaining, now
            if now - last_progress > stall_timeout:
                raise BenchError(
                    f"drain made no progress for {stall_timeout:.0f} s ({last_remaining} jobs left)"
                )
        elapsed = max(finished) - started
        left = (count or _count)(dsn, remaining_sql)
        if left:
            raise BenchError(f"workers stopped with {left} jobs left")
        ok = True
        return elapsed
    finally:
        for proc in procs:
            proc.join(timeout=10 if ok else 0.1)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        gate.results.close()


def _next_message(gate: StartGate, procs: list[Any]) -> tuple[str, Any] | None:
    """The next child message, or None after a short wait; raises if a child died silently."""
    try:
        return gate.results.get(timeout=0.2)
    except queue_mod.Empty:
        pass
    dead = [p for p in procs if p.exitcode not in (None, 0)]
    if dead:
        with contextlib.suppress(queue_mod.Empty):  # its last words may just be arriving
            return gate.results.get(timeout=1.0)
        raise BenchError(f"worker process died with exit code {dead[0].exitcode}")
    return None


def _child_main(body: Callable[[], Awaitable[None]] | Callable[[], None], gate: StartGate) -> None:
    """Shared child epilogue: report the finish stamp or the error, never hang the parent."""
    try:
        outcome = body()
        if asyncio.iscoroutine(outcome):
            asyncio.run(outcome)
        gate.report("ok", time.monotonic())
    except BaseException as exc:  # report everything, the parent decides
        gate.report("error", _error(exc)["error"])


def drain_on_own_clock(
    child: ChildTarget, processes: int, dsn: str, unfinished_sql: str, span_sql: str, jobs: int
) -> float:
    """For peers without a drain-and-exit mode (chancy, Oban): run `processes` copies of
    `child` (each stops when `unfinished_sql` counts 0, see ``wait_until_done``), then read
    the rate from the jobs' own clock: `span_sql` returns (jobs done, seconds from the first
    start to the last finish). Their outcomes reach the table in batches, so the moment the
    last one is written is later than the work."""
    _run_drain(child, [() for _ in range(processes)], dsn, unfinished_sql, STALL_TIMEOUT_S)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(span_sql).fetchone()
    done, span = (int(row[0]), float(row[1] or 0)) if row else (0, 0.0)
    if done != jobs or span <= 0:
        raise BenchError(f"{done} of {jobs} jobs done")
    return jobs / span


async def wait_until_done(conn: Any, unfinished_sql: str) -> None:
    """Poll (psycopg AsyncConnection) every 50 ms until `unfinished_sql` counts 0."""
    while True:
        row = await (await conn.execute(unfinished_sql)).fetchone()
        await conn.commit()
        if not row or not row[0]:
            return
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------- raw SQL


RAW_SCHEMA = """
CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    status text NOT NULL DEFAULT 'queued',
    payload bytea,
    locked_by text,
    finished_at timestamptz
);
CREATE INDEX jobs_queued_idx ON jobs (id) WHERE status = 'queued';
"""

RAW_CLAIM = """
WITH c AS MATERIALIZED (
    SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED
)
UPDATE jobs SET status = 'running', locked_by = %s FROM c WHERE jobs.id = c.id
RETURNING jobs.id
"""

RAW_FINISH = "UPDATE jobs SET status = 'done', finished_at = now() WHERE id = ANY(%s)"
RAW_INSERT = "INSERT INTO jobs (payload) VALUES (%s)"  # the raw single-row INSERT commit


def _raw_setup(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(RAW_SCHEMA)


def _raw_fill(dsn: str, n: int) -> None:
    with psycopg.connect(dsn) as conn:
        with conn.cursor() as cur, cur.copy("COPY jobs (payload) FROM STDIN") as copy:
            for _ in range(n):
                copy.write_row((PAYLOAD,))
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE jobs")


def _raw_drain_child(dsn: str, name: str, batch: int, gate: StartGate) -> None:
    def body() -> None:
        with psycopg.connect(dsn) as conn:
            conn.execute("SELECT 1")
            conn.commit()
            gate.ready()
            while True:
                ids = [row[0] for row in conn.execute(RAW_CLAIM, (batch, name))]
                conn.commit()
                if not ids:
                    return
                conn.execute(RAW_FINISH, (ids,))
                conn.commit()

    _child_main(body, gate)


def raw_limit(
    admin_dsn: str,
    jobs: int = 50_000,
    processes: int = 2,
    batch: int = 100,
    stall_timeout: float = STALL_TIMEOUT_S,
) -> Figures:
    """Raw-SQL drain ceiling: claim ``batch`` rows (tx 1), mark them done (tx 2), repeat.

    ``processes`` spawned OS processes, one connection each; the clock runs from the
    start gate opening (all connected) to the last process finding nothing to claim.
    """
    try:
        with throwaway_db(admin_dsn, "raw") as dsn:
            _raw_setup(dsn)
            _raw_fill(dsn, jobs)
            elapsed = _run_drain(
                _raw_drain_child,
                [(dsn, f"raw-{i}", batch) for i in range(processes)],
                dsn,
                "SELECT count(*) FROM jobs WHERE status <> 'done'",
                stall_timeout,
            )
            done = _count(dsn, "SELECT count(*) FROM jobs WHERE status = 'done'")
            if done != jobs:
                raise BenchError(f"{done} of {jobs} jobs done")
        return {"drain_per_s": jobs / elapsed, "jobs": float(jobs), "seconds": elapsed}
    except Exception as exc:
        return _error(exc)


def raw_single_insert(admin_dsn: str, n: int = 2000) -> Figures:
    """One-row INSERT, each committed on its own (autocommit: one round trip per row)."""
    try:
        with throwaway_db(admin_dsn, "rawins") as dsn:
            _raw_setup(dsn)
            with psycopg.connect(dsn, autocommit=True) as conn:
                for _ in range(min(n, 50)):  # warm up: server-side prepare, caches
                    conn.execute(RAW_INSERT, (PAYLOAD,), prepare=True)
                started = time.perf_counter()
                for _ in range(n):
                    conn.execute(RAW_INSERT, (PAYLOAD,), prepare=True)
                elapsed = time.perf_counter() - started
        return {"insert_per_s": n / elapsed}
    except Exception as exc:
        return _error(exc)


def raw_batch_insert(admin_dsn: str, n: int = 50_000, batch: int = 1000) -> Figures:
    """Committed batches of ``batch`` rows: COPY (``insert_per_s``) and executemany.

    ``executemany_per_s`` uses psycopg's pipelined executemany of a one-row INSERT.
    """
    try:
        with throwaway_db(admin_dsn, "rawbatch") as dsn:
            _raw_setup(dsn)
            rows = [(PAYLOAD,)] * batch
            batches = max(1, n // batch)
            with psycopg.connect(dsn) as conn:
                started = time.perf_counter()
                for _ in range(batches):
                    with conn.cursor() as cur, cur.copy("COPY jobs (payload) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
                    conn.commit()
                copy_s = time.perf_counter() - started
                started = time.perf_counter()
                for _ in range(batches):
                    with conn.cursor() as cur:
                        cur.executemany("INSERT INTO jobs (payload) VALUES (%s)", rows)
                    conn.commit()
                many_s = time.perf_counter() - started
        total = batches * batch
        return {"insert_per_s": total / copy_s, "executemany_per_s": total / many_s}
    except Exception as exc:
        return _error(exc)


# --------------------------------------------------------------------- PgQueuer


PGQ_ENTRYPOINT = "bench_noop"


async def _pgq_connect(dsn: str) -> Any:
    import asyncpg

    return await asyncpg.connect(**_asyncpg_kwargs(dsn))


def _pgq_drain_child(
    dsn: str, batch: int, gate: StartGate, sleep: float = 0.0, at_once: int | None = None
) -> None:
    """One PgQueuer worker process draining the queue; each job awaits `sleep` seconds (0: a
    no-op), at most `at_once` jobs in flight (PgQueuer's max_concurrent_tasks; None: no cap)."""

    async def body() -> None:
        from datetime import timedelta

        from pgqueuer import Job, Queries, QueueManager
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.types import QueueExecutionMode

        _silence_peers()
        conn = await _pgq_connect(dsn)
        try:
            qm = QueueManager(Queries(AsyncpgDriver(conn)))

            @qm.entrypoint(PGQ_ENTRYPOINT)
            async def noop(job: Job) -> None:
                if sleep:
                    await asyncio.sleep(sleep)

            await qm.verify_structure()
            await asyncio.get_running_loop().run_in_executor(None, lambda: gate.ready())
            await qm.run(
                batch_size=batch,
                mode=QueueExecutionMode.drain,
                dequeue_timeout=timedelta(seconds=0.1),
                max_concurrent_tasks=at_once,
                log_aggregation_interval=timedelta(0),
            )
        finally:
            await conn.close()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _child_main(body, gate)


async def _pgq_enqueue(dsn: str, single_n: int, jobs: int, enqueue_batch: int) -> Figures:
    from pgqueuer import Queries
    from pgqueuer.db import AsyncpgDriver

    conn = await _pgq_connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        await queries.install()
        for _ in range(min(single_n, 50)):  # warm up statement caches
            await queries.enqueue(PGQ_ENTRYPOINT, PAYLOAD)
        started = time.perf_counter()
        for _ in range(single_n):
            await queries.enqueue(PGQ_ENTRYPOINT, PAYLOAD)
        single_s = time.perf_counter() - started
        await queries.clear_queue()

        enqueued = 0
        started = time.perf_counter()
        while enqueued < jobs:
            k = min(enqueue_batch, jobs - enqueued)
            await queries.enqueue([PGQ_ENTRYPOINT] * k, [PAYLOAD] * k, [0] * k)
            enqueued += k
        batch_s = time.perf_counter() - started
        await conn.execute("VACUUM ANALYZE")
        return {"enqueue_single_per_s": single_n / single_s, "enqueue_batch_per_s": jobs / batch_s}
    finally:
        await conn.close()


async def _pgq_latency(dsn: str, n: int, warmup: int) -> list[float]:
    from pgqueuer import Job, Queries, QueueManager
    from pgqueuer.db import AsyncpgDriver

    worker_conn = await _pgq_connect(dsn)
    client_conn = await _pgq_connect(dsn)
    try:
        qm = QueueManager(Queries(AsyncpgDriver(worker_conn)))
        starts: dict[int, float] = {}
        started = asyncio.Event()

        @qm.entrypoint(PGQ_ENTRYPOINT)
        async def record(job: Job) -> None:
            starts[int(job.id)] = time.perf_counter()
            started.set()

        client = Queries(AsyncpgDriver(client_conn))
        worker = asyncio.create_task(qm.run())
        try:
            await asyncio.sleep(0.5)  # listener registered, worker idle
            if worker.done():
                worker.result()
            latencies: list[float] = []
            for i in range(warmup + n):
                started.clear()
                t0 = time.perf_counter()
                job_id = (await client.enqueue(PGQ_ENTRYPOINT, PAYLOAD))[0]
                await asyncio.wait_for(started.wait(), LATENCY_WAIT_S)
                if i >= warmup:
                    latencies.append((starts[int(job_id)] - t0) * 1000.0)
                await asyncio.sleep(0.02)  # let the worker finish and go idle again
            return latencies
        finally:
            qm.shutdown.set()
            try:
                await asyncio.wait_for(worker, 10)
            except Exception:
                worker.cancel()
                with contextlib.suppress(BaseException):
                    await worker
    finally:
        await worker_conn.close()
        await client_conn.close()


def pgqueuer_scenarios(
    admin_dsn: str,
    jobs: int = 50_000,
    processes: int = 2,
    batch: int = 100,
    single_n: int = 2000,
    enqueue_batch: int = 1000,
    latency_n: int = 200,
    stall_timeout: float = STALL_TIMEOUT_S,
) -> Figures:
    """PgQueuer: enqueue one by one and in batches, drain no-op jobs, idle latency.

    Drain: ``processes`` OS processes, each one QueueManager on one asyncpg connection
    (``run(batch_size=batch, mode=drain)``). PgQueuer's worker is a single asyncio loop,
    so it scales across cores with processes. Latency: a QueueManager running as an
    asyncio task in this process, jobs enqueued one at a time from a second
    connection; perf_counter before ``enqueue()`` to perf_counter in the job function.
    """
    try:
        import asyncpg  # noqa: F401
        import pgqueuer  # noqa: F401
    except ImportError:
        return {"skipped": SKIP_PGQUEUER}
    _silence_peers()
    try:
        with warnings.catch_warnings(), throwaway_db(admin_dsn, "pgqueuer") as dsn:
            warnings.simplefilter("ignore")
            from pgqueuer.domain.settings import db_settings

            table = db_settings().queue_table
            figures = asyncio.run(_pgq_enqueue(dsn, single_n, jobs, enqueue_batch))
            elapsed = _run_drain(
                _pgq_drain_child,
                [(dsn, batch) for _ in range(processes)],
                dsn,
                f"SELECT count(*) FROM {table}",
                stall_timeout,
            )
            figures["drain_per_s"] = jobs / elapsed
            latencies = sorted(asyncio.run(_pgq_latency(dsn, latency_n, warmup=10)))
            figures["latency_p50_ms"] = _percentile(latencies, 50)
            figures["latency_p99_ms"] = _percentile(latencies, 99)
            figures["notes"] = (
                f"drain: {processes} processes x 1 QueueManager (asyncpg), batch_size={batch}; "
                f"latency: in-process worker, perf_counter, n={latency_n}"
            )
        return figures
    except Exception as exc:
        return _error(exc)


# ---------------------------------------------------------------- procrastinate


PROC_TASK = "bench_noop"


def _proc_app(
    dsn: str, max_size: int, on_run: Callable[[int], None] | None = None, sleep: float = 0.0
) -> Any:
    """A procrastinate App with one async task ``bench_noop(i: int = 0)`` that awaits
    `sleep` seconds (0: returns at once)."""
    from procrastinate import App, PsycopgConnector

    app = App(connector=PsycopgConnector(conninfo=dsn, min_size=max_size, max_size=max_size))

    async def bench_noop(i: int = 0) -> None:
        if on_run is not None:
            on_run(i)
        if sleep:
            await asyncio.sleep(sleep)

    app.task(name=PROC_TASK)(bench_noop)
    return app


def _proc_drain_child(dsn: str, concurrency: int, gate: StartGate, sleep: float = 0.0) -> None:
    async def body() -> None:
        _silence_peers()
        app = _proc_app(dsn, max_size=min(concurrency + 2, 20), sleep=sleep)
        async with app.open_async():
            await app.check_connection_async()
            await asyncio.get_running_loop().run_in_executor(None, lambda: gate.ready())
            await app.run_worker_async(
                wait=False,
                concurrency=concurrency,
                install_signal_handlers=False,
                listen_notify=False,
            )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _child_main(body, gate)


async def _proc_enqueue(dsn: str, single_n: int, jobs: int, enqueue_batch: int) -> Figures:
    app = _proc_app(dsn, max_size=2)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        task = app.tasks[PROC_TASK]
        for _ in range(min(single_n, 50)):  # warm up
            await task.defer_async(i=0)
        started = time.perf_counter()
        for _ in range(single_n):
            await task.defer_async(i=0)
        single_s = time.perf_counter() - started
        await app.connector.execute_query_async("TRUNCATE procrastinate_jobs CASCADE")

        enqueued = 0
        started = time.perf_counter()
        while enqueued < jobs:
            k = min(enqueue_batch, jobs - enqueued)
            await task.batch_defer_async(*({"i": 0} for _ in range(k)))
            enqueued += k
        batch_s = time.perf_counter() - started
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return {"enqueue_single_per_s": single_n / single_s, "enqueue_batch_per_s": jobs / batch_s}


async def _proc_latency(dsn: str, n: int, warmup: int) -> list[float]:
    starts: dict[int, float] = {}
    started = asyncio.Event()

    def record(i: int) -> None:
        starts[i] = time.perf_counter()
        started.set()

    app = _proc_app(dsn, max_size=4, on_run=record)
    async with app.open_async():
        task = app.tasks[PROC_TASK]
        worker = asyncio.create_task(
            app.run_worker_async(
                wait=True, concurrency=1, install_signal_handlers=False, listen_notify=True
            )
        )
        try:
            await asyncio.sleep(0.5)  # listener registered, worker idle
            if worker.done():
                worker.result()
            latencies: list[float] = []
            for i in range(1, warmup + n + 1):
                started.clear()
                t0 = time.perf_counter()
                await task.defer_async(i=i)
                await asyncio.wait_for(started.wait(), LATENCY_WAIT_S)
                if i > warmup:
                    latencies.append((starts[i] - t0) * 1000.0)
                await asyncio.sleep(0.02)  # let the worker finish and go idle again
            return latencies
        finally:
            worker.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(worker, 10)


def procrastinate_scenarios(
    admin_dsn: str,
    jobs: int = 5_000,
    processes: int = 2,
    concurrency: int = 10,
    single_n: int = 2000,
    enqueue_batch: int = 1000,
    latency_n: int = 200,
    stall_timeout: float = STALL_TIMEOUT_S,
) -> Figures:
    """procrastinate: the same four figures as ``pgqueuer_scenarios``.

    Drain: ``processes`` OS processes, each ``run_worker_async(wait=False,
    concurrency=concurrency)`` (procrastinate fetches one job per query; concurrency
    lets job completion overlap the next fetch). Latency: an in-process worker task
    (concurrency 1, LISTEN/NOTIFY), perf_counter before ``defer_async()`` to
    perf_counter in the task.
    """
    try:
        import procrastinate  # noqa: F401
    except ImportError:
        return {"skipped": SKIP_PROCRASTINATE}
    _silence_peers()
    try:
        with warnings.catch_warnings(), throwaway_db(admin_dsn, "procrastinate") as dsn:
            warnings.simplefilter("ignore")
            figures = asyncio.run(_proc_enqueue(dsn, single_n, jobs, enqueue_batch))
            elapsed = _run_drain(
                _proc_drain_child,
                [(dsn, concurrency) for _ in range(processes)],
                dsn,
                "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')",
                stall_timeout,
            )
            figures["drain_per_s"] = jobs / elapsed
            latencies = sorted(asyncio.run(_proc_latency(dsn, latency_n, warmup=10)))
            figures["latency_p50_ms"] = _percentile(latencies, 50)
            figures["latency_p99_ms"] = _percentile(latencies, 99)
            figures["notes"] = (
                f"drain: {processes} processes x 1 worker (concurrency={concurrency}, "
                f"psycopg pool); latency: in-process worker, perf_counter, n={latency_n}"
            )
        return figures
    except Exception as exc:
        return _error(exc)


# ------------------------------------------------------------------------- driver


def _median_of(runs: list[Figures]) -> Figures:
    """Median of every numeric figure over ``runs``; a skip or an error wins."""
    for run in runs:
        if "skipped" in run or "error" in run:
            return run
    out: Figures = {}
    for key, value in runs[0].items():
        if isinstance(value, str):
            out[key] = value
        else:
            out[key] = statistics.median(float(r[key]) for r in runs)
    return out


def peer_figures(
    admin_dsn: str,
    jobs: int = 50_000,
    procrastinate_jobs: int | None = None,
    repeats: int = 1,
    only: tuple[str, ...] = ("raw", "pgqueuer", "procrastinate"),
) -> dict[str, Figures]:
    """Run every measurement ``repeats`` times; report the median of each figure."""
    proc_jobs = procrastinate_jobs if procrastinate_jobs is not None else max(500, jobs // 10)
    plan: list[tuple[str, str, Callable[[], Figures]]] = [
        ("raw", "raw_limit", lambda: raw_limit(admin_dsn, jobs=jobs)),
        ("raw", "raw_single_insert", lambda: raw_single_insert(admin_dsn)),
        ("raw", "raw_batch_insert", lambda: raw_batch_insert(admin_dsn, n=jobs)),
        ("pgqueuer", "pgqueuer", lambda: pgqueuer_scenarios(admin_dsn, jobs=jobs)),
        (
            "procrastinate",
            "procrastinate",
            lambda: procrastinate_scenarios(admin_dsn, jobs=proc_jobs),
        ),
    ]
    out: dict[str, Figures] = {}
    for group, key, run in plan:
        if group not in only:
            continue
        runs: list[Figures] = []
        for _ in range(max(1, repeats)):
            runs.append(run())
            if "skipped" in runs[-1] or "error" in runs[-1]:
                break
        out[key] = _median_of(runs)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--dsn",
        default=os.environ.get("DBQUEUE_BENCH_DSN", DEFAULT_ADMIN_DSN),
        help="admin DSN used to create and drop the throwaway databases",
    )
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per drain")
    parser.add_argument(
        "--procrastinate-jobs", type=int, default=None, help="default: max(500, jobs // 10)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="median over this many runs")
    parser.add_argument(
        "--only",
        default="raw,pgqueuer,procrastinate",
        help="comma-separated subset of raw,pgqueuer,procrastinate",
    )
    args = parser.parse_args(argv)
    _silence_peers()
    figures = peer_figures(
        args.dsn,
        jobs=args.jobs,
        procrastinate_jobs=args.procrastinate_jobs,
        repeats=args.repeats,
        only=tuple(x.strip() for x in args.only.split(",") if x.strip()),
    )
    print(json.dumps(figures, indent=2))
    return 1 if any("error" in f for f in figures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
