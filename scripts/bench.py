"""dbqueue's benchmark: throughput, latency and scale against the raw-SQL limit and the peers.

Every PostgreSQL scenario runs in its own throwaway database (created from ``--dsn`` and
dropped afterwards, see bench_peers.throwaway_db); SQLite in a temporary file. Worker figures
come from real ``dbqueue work`` / ``dbqueue workoff`` processes. Repeated scenarios report the
median. The table goes to stdout and to ``bench-results.md``, every figure to
``bench-results.json`` (both at the repository root).

Scenarios (the issue's point 1 and 7):

* raw limit: bench_peers.raw_limit (2 processes claiming 100 rows FOR UPDATE SKIP LOCKED,
  marking them done in a second transaction), raw single-row INSERT commits, raw batches;
* enqueue one by one (each its own commit) and ``enqueue_many`` in batches of 1,000;
* drain of ``--jobs`` no-op tasks with ``dbqueue workoff --concurrency 2``: the rate is
  tasks / (last finished_at - first started_at), both from the database clock, so process
  start-up is not counted (as the peers' drains start at a gate); the wall-clock rate
  including start-up is in the JSON;
* the same drain at the default log level (INFO: one line per task, text and JSON) beside
  the drain at WARNING, in each round (logging_drains; the ratio is the round's own);
* idle enqueue-to-start latency over ``--latency-n`` tasks with a running ``dbqueue work``:
  time.monotonic() before enqueue() to time.monotonic() at the task's start (sent by UDP);
* claim speed (claims of 100) with ``--finished-rows`` finished rows vs an empty table;
* worker RSS over ``--rss-tasks`` tasks (probe tasks report the worker's own RSS);
* SQLite: enqueue and drain;
* PgQueuer and procrastinate side by side when installed (``pip install -e '.[bench]'``);
* scripts/bench_counters.py and scripts/bench_bus.py tables when those files exist.

The machine's other load shows in the figures: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path[:0] = [str(SCRIPTS), str(ROOT)]

import bench_chancy  # noqa: E402
import bench_history  # noqa: E402
import bench_io  # noqa: E402
import bench_load  # noqa: E402
import bench_mariadb  # noqa: E402
import bench_oban  # noqa: E402
import bench_peers  # noqa: E402
import bench_tasks  # noqa: E402

import dbqueue  # noqa: E402
from dbqueue import config, serializer, task  # noqa: E402
from dbqueue.schema import tasks  # noqa: E402

enqueue_module = importlib.import_module("dbqueue.enqueue")  # the name `enqueue` is the function

# vacuum, scalar, workoff, worker_env, dbqueue_command and pg_settings are also read as
# bench.<name> by scripts/bench_queues.py and bench_limits.py
from bench_setup import (  # noqa: E402, F401
    SECRET,
    Figures,
    dbqueue_command,
    drain_rate,
    pg_settings,
    scalar,
    sqlite_settings,
    vacuum,
    worker_env,
    workoff,
)


def guarded(run: Callable[[], Figures]) -> Figures:
    """A scenario's figures, or {"error": ...}: one failure does not end the benchmark. The
    1-minute load average at its end goes with them (the machine is shared)."""
    try:
        figures = run()
    except Exception as exc:
        figures = bench_peers._error(exc)
    if "skipped" not in figures:
        figures["load_1m"] = os.getloadavg()[0]
    return figures


def median_of(runs: list[Figures]) -> Figures:
    return bench_peers._median_of(runs)


# -- dbqueue scenarios ---------------------------------------------------------------------------


def single_enqueues(settings: config.Settings, n: int, block: int = 100) -> Figures:
    """About `n` enqueue() calls (whole blocks), each its own commit. On PostgreSQL in blocks
    of `block`, each after a block of the raw single-row INSERT commit (bench_peers.RAW_INSERT
    into a table of the same database): an INSERT commit's time follows the disk's flush
    time, which drifts by half within seconds here, so only blocks run side by side make a
    steady ratio (the median of the blocks' own ratios)."""
    for _ in range(min(50, n)):  # warm up: imports, pool, prepared statements
        dbqueue.enqueue(bench_tasks.noop, settings=settings)
    raw: Any = None
    if settings.get_engine().dialect.name == "postgresql":
        dsn = settings.get_engine().url.set(drivername="postgresql")
        raw = psycopg.connect(dsn.render_as_string(hide_password=False), autocommit=True)
        raw.execute(bench_peers.RAW_SCHEMA)
        for _ in range(min(50, n)):
            raw.execute(bench_peers.RAW_INSERT, (bench_peers.PAYLOAD,), prepare=True)
    ours, theirs = [], []
    try:
        for _ in range(max(1, n // block)):
            if raw is not None:
                started = time.perf_counter()
                for _ in range(block):
                    raw.execute(bench_peers.RAW_INSERT, (bench_peers.PAYLOAD,), prepare=True)
                theirs.append(time.perf_counter() - started)
            started = time.perf_counter()
            for _ in range(block):
                dbqueue.enqueue(bench_tasks.noop, settings=settings)
            ours.append(time.perf_counter() - started)
    finally:
        if raw is not None:
            raw.close()
    figures = {"enqueue_single_per_s": block * len(ours) / sum(ours)}
    if theirs:
        figures["raw_single_per_s"] = block * len(theirs) / sum(theirs)
        figures["single_vs_raw"] = statistics.median(
            t / o for t, o in zip(theirs, ours, strict=True)
        )
    return figures


def enqueue_rates(settings: config.Settings, single_n: int, jobs: int, batch: int) -> Figures:
    """Single enqueues (each its own commit), then `jobs` tasks by enqueue_many(batch)."""
    figures = single_enqueues(settings, single_n)
    with settings.get_engine().begin() as conn:
        conn.execute(sa.delete(tasks))
    items = [()] * batch
    started = time.perf_counter()
    for _ in range(jobs // batch):
        dbqueue.enqueue_many(bench_tasks.noop, items, settings=settings)
    batch_s = time.perf_counter() - started
    figures["enqueue_batch_per_s"] = (jobs // batch * batch) / batch_s
    return figures


def enqueue_and_drain(
    settings: config.Settings, jobs: int, single_n: int, concurrency: int = 2
) -> Figures:
    figures = enqueue_rates(settings, single_n, jobs, 1000)
    figures.update(drain_rate(settings, jobs // 1000 * 1000, concurrency))
    return figures


LOG_DRAINS = (
    ("warning", "WARNING", "text"),
    ("info", "INFO", "text"),
    ("info_json", "INFO", "json"),
)


def logging_drains(settings: config.Settings, jobs: int, concurrency: int = 2) -> Figures:
    """What the default per-task INFO line costs (issue 21): the same drain of `jobs` no-op
    tasks at WARNING (no line), at INFO (the default, text) and at INFO as JSON, one after
    the other in this round; the ratios INFO / WARNING are this round's own. Each INFO drain
    must have logged one task line per task (else the figure would flatter a lost line)."""
    figures: Figures = {"jobs": jobs}
    for name, level, fmt in LOG_DRAINS:
        with settings.get_engine().begin() as conn:
            conn.execute(sa.delete(tasks))
        for _ in range(jobs // 1000):
            dbqueue.enqueue_many(bench_tasks.noop, [()] * 1000, settings=settings)
        stderr: list[str] = []
        drained = drain_rate(
            settings,
            jobs // 1000 * 1000,
            concurrency,
            log_level=level,
            log_format=fmt,
            stderr=stderr,
        )
        figures[f"drain_{name}_per_s"] = drained["drain_per_s"]
        lines = sum(line.count("task_finished") for line in stderr[0].splitlines())
        if level == "INFO" and lines != jobs // 1000 * 1000:
            raise RuntimeError(f"{lines} task lines logged at {level} ({fmt}) for {jobs} tasks")
    figures["info_vs_warning"] = figures["drain_info_per_s"] / figures["drain_warning_per_s"]
    figures["json_vs_warning"] = figures["drain_info_json_per_s"] / figures["drain_warning_per_s"]
    return figures


def _listener_ready(settings: config.Settings, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if scalar(
            settings,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'dbqueue-listener'",
        ):
            return
        time.sleep(0.05)
    raise RuntimeError("the worker's LISTEN connection did not appear")


def idle_latency(settings: config.Settings, n: int, warmup: int = 10) -> Figures:
    """Enqueue one task at a time to an idle `dbqueue work`; ms from enqueue() to its start."""
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(bench_peers.LATENCY_WAIT_S)
        port = sock.getsockname()[1]
        log = stack.enter_context(tempfile.TemporaryFile("w+"))
        proc = subprocess.Popen(
            dbqueue_command("work", "--import", "bench_tasks"),
            env=worker_env(settings),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            _listener_ready(settings)
            time.sleep(0.5)
            latencies = []
            for i in range(warmup + n):
                t0 = time.monotonic()
                dbqueue.enqueue(bench_tasks.stamp, args=(port,), settings=settings)
                (started,) = struct.unpack("!d", sock.recv(64))
                if i >= warmup:
                    latencies.append((started - t0) * 1000)
                time.sleep(0.02)  # the worker records the outcome and goes idle again
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        latencies.sort()
        return {
            "latency_p50_ms": bench_peers._percentile(latencies, 50),
            "latency_p99_ms": bench_peers._percentile(latencies, 99),
        }


def worker_rss(settings: config.Settings, total: int) -> Figures:
    """RSS of one worker process at points over `total` no-op tasks (probe tasks report it)."""
    points = sorted({max(2, total // 100), max(3, total // 10), total // 2, total})
    probes: list[tuple[int, int]] = []
    position = 0
    for point in points:
        while position < point - 1:
            k = min(1000, point - 1 - position)
            dbqueue.enqueue_many(bench_tasks.noop, [()] * k, settings=settings)
            position += k
        (probe,) = dbqueue.enqueue_many(bench_tasks.rss, [()], settings=settings)
        probes.append((point, probe))
        position += 1
    workoff(settings, 1)
    figures: Figures = {}
    for point, probe in probes:
        figures[f"rss_mb_at_{point}"] = float(task.Task(probe, settings=settings).result)
    first, last = probes[0][0], probes[-1][0]
    figures["rss_growth_mb"] = figures[f"rss_mb_at_{last}"] - figures[f"rss_mb_at_{first}"]
    return figures


def codec_costs(n: int = 20_000) -> Figures:
    """Microseconds per task spent pickling + signing at enqueue (enqueue.build, with its
    validation) and verifying + unpickling at the worker, for a small typical call."""
    settings = config.Settings(database_url="sqlite://", secret_key=SECRET)
    keyring = settings.keyring()
    handler = "bench_tasks:noop"
    body = (("func",), (42, "someone@example.com"), {"retry": True})
    started = time.perf_counter()
    for _ in range(n):
        enqueue_module.build(
            settings, bench_tasks.noop, (42, "someone@example.com"), {"retry": True}
        )
    build_us = (time.perf_counter() - started) / n * 1e6
    envelope = serializer.dumps(keyring, "payload", handler, body)
    started = time.perf_counter()
    for _ in range(n):
        serializer.dumps(keyring, "payload", handler, body)
    sign_us = (time.perf_counter() - started) / n * 1e6
    started = time.perf_counter()
    for _ in range(n):
        serializer.loads(keyring, "payload", handler, envelope)
    verify_us = (time.perf_counter() - started) / n * 1e6
    return {
        "build_us": build_us,
        "pickle_sign_us": sign_us,
        "verify_unpickle_us": verify_us,
        "payload_bytes": float(len(envelope)),
    }


# -- the run -------------------------------------------------------------------------------------

# I/O-bound scenario (issue 21): 2 processes x 100 tasks at once, each waiting 50 ms: 4,000/s
IO_PROCESSES, IO_AT_ONCE, IO_SECONDS = 2, 100, 0.05


def repeat(times: int, run: Callable[[], Figures]) -> Figures:
    runs = []
    for _ in range(max(1, times)):
        runs.append(guarded(run))
        if "error" in runs[-1] or "skipped" in runs[-1]:
            return runs[-1]
    return median_of(runs)


# Ratios the targets are judged on: (name, numerator scenario, key, denominator scenario, key);
# no denominator: the scenario measured the ratio itself.
RATIOS = (
    ("drain_vs_raw", "dbqueue", "drain_per_s", "raw_limit", "drain_per_s"),
    ("single_vs_raw", "dbqueue", "single_vs_raw", None, None),  # measured within the scenario
    ("many_vs_raw", "dbqueue", "enqueue_batch_per_s", "raw_batch_insert", "executemany_per_s"),
    ("many_vs_pgqueuer", "dbqueue", "enqueue_batch_per_s", "pgqueuer", "enqueue_batch_per_s"),
    ("drain_vs_pgqueuer", "dbqueue", "drain_per_s", "pgqueuer", "drain_per_s"),
    ("info_vs_warning", "dbqueue_logging", "info_vs_warning", None, None),
    ("io_async_vs_limit", "dbqueue_io_async", "io_vs_limit", None, None),
    ("io_threads_vs_limit", "dbqueue_io_threads", "io_vs_limit", None, None),
    ("io_async_vs_pgqueuer", "dbqueue_io_async", "io_per_s", "pgqueuer_io", "io_per_s"),
    ("io_threads_vs_pgqueuer", "dbqueue_io_threads", "io_per_s", "pgqueuer_io", "io_per_s"),
    ("drain_vs_chancy", "dbqueue", "drain_per_s", "chancy", "drain_per_s"),
    ("mariadb_drain_vs_raw", "mariadb", "drain_per_s", "mariadb_raw", "drain_per_s"),
    ("mariadb_single_vs_raw", "mariadb", "single_vs_raw", None, None),
    ("mariadb_many_vs_raw", "mariadb", "enqueue_batch_per_s", "mariadb_raw", "executemany_per_s"),
    ("drain_vs_oban", "dbqueue", "drain_per_s", "oban", "drain_per_s"),
    ("io_async_vs_oban", "dbqueue_io_async", "io_per_s", "oban", "io_per_s"),
    ("json_vs_warning", "dbqueue_logging", "json_vs_warning", None, None),
)


def interleaved(rounds: int, scenarios: dict[str, Callable[[], Figures]], step: Stepper) -> Any:
    """Each round runs every scenario once, in the same order; figures are medians over the
    rounds, and each ratio the median of the rounds' own ratios. The VM this runs on speeds
    up and slows down by a third within minutes: measured in blocks (every raw run, then
    every dbqueue run) the drift fell between numerator and denominator; within a round the
    two run a minute apart at most."""
    runs: dict[str, list[Figures]] = {name: [] for name in scenarios}
    for number in range(1, max(1, rounds) + 1):
        for name, scenario in scenarios.items():
            if runs[name] and ("skipped" in runs[name][-1] or "error" in runs[name][-1]):
                continue  # not installed, or broken: once is enough
            step(f"round {number}/{rounds}: {name}")
            runs[name].append(guarded(scenario))
    results: dict[str, Any] = {name: median_of(done) for name, done in runs.items()}
    ratios: dict[str, float] = {}
    for ratio, top, top_key, bottom, bottom_key in RATIOS:
        if any("error" in results.get(name, {}) for name in (top, bottom) if name):
            continue  # the table says "error" for it: no ratio from the rounds that worked
        if bottom is None:
            per_round = [v for a in runs.get(top, []) if (v := _num(a, top_key)) is not None]
        else:
            per_round = [
                _num(a, top_key) / b_value
                for a, b in zip(runs.get(top, []), runs.get(bottom, []), strict=False)
                if _num(a, top_key) is not None and (b_value := _num(b, bottom_key))
            ]
        if per_round:
            ratios[ratio] = statistics.median(per_round)  # type: ignore[arg-type]
    results["ratios"] = ratios
    results["rounds"] = runs
    return results


@contextlib.contextmanager
def _cwd(path: str) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def optional_benches(names: tuple[str, ...]) -> dict[str, Figures]:
    """Other helpers' benchmarks (scripts/bench_<name>.py), when present: main()'s figures and
    its printed table."""
    out: dict[str, Figures] = {}
    for name in names:
        if not (SCRIPTS / f"bench_{name}.py").is_file():
            continue
        printed = io.StringIO()
        try:
            module = importlib.import_module(f"bench_{name}")
            with tempfile.TemporaryDirectory() as tmp, _cwd(tmp):
                with contextlib.redirect_stdout(printed):
                    result = module.main([])
            out[name] = {"figures": result, "table": printed.getvalue()}
        except BaseException as exc:  # SystemExit from argparse included
            if isinstance(exc, KeyboardInterrupt):
                raise
            out[name] = {**bench_peers._error(exc), "table": printed.getvalue()}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    admin = args.dsn
    step = Stepper()
    results: dict[str, Any] = {"environment": environment(admin), "parameters": vars(args)}
    step("pickling and signing")
    results["codec"] = guarded(codec_costs)

    def pg_run(body: Callable[[config.Settings], Figures], name: str) -> Figures:
        with pg_settings(admin, name) as settings:
            return body(settings)

    scenarios: dict[str, Callable[[], Figures]] = {
        "raw_limit": lambda: bench_peers.raw_limit(admin, args.jobs),
        "raw_batch_insert": lambda: bench_peers.raw_batch_insert(admin, args.jobs),
        "dbqueue": lambda: pg_run(lambda s: enqueue_and_drain(s, args.jobs, args.single_n), "dbq"),
        "dbqueue_latency": lambda: pg_run(lambda s: idle_latency(s, args.latency_n), "dbqlat"),
        "dbqueue_logging": lambda: pg_run(lambda s: logging_drains(s, args.jobs), "dbqlog"),
    }
    if not args.no_mariadb:
        scenarios["mariadb_raw"] = lambda: bench_mariadb.guard_available(
            lambda: bench_mariadb.raw_limit(args.mariadb_jobs)
        )
        scenarios["mariadb"] = lambda: bench_mariadb.guard_available(
            lambda: bench_mariadb.dbqueue_mariadb(args.mariadb_jobs, args.single_n)
        )
    io = (args.io_jobs, IO_PROCESSES, IO_AT_ONCE, IO_SECONDS)
    for mode in ("async", "threads"):
        scenarios[f"dbqueue_io_{mode}"] = functools.partial(
            pg_run, lambda s, m=mode: bench_io.dbqueue_io(s, *io, m), f"dbqio{mode[0]}"
        )
    if not args.no_peers:
        scenarios["pgqueuer"] = lambda: bench_peers.pgqueuer_scenarios(
            admin, jobs=args.jobs, single_n=args.single_n, latency_n=args.latency_n
        )
        scenarios["procrastinate"] = lambda: bench_peers.procrastinate_scenarios(
            admin, jobs=args.procrastinate_jobs, single_n=args.single_n, latency_n=args.latency_n
        )
        scenarios["chancy"] = lambda: bench_chancy.chancy_scenarios(
            admin, jobs=args.peer_jobs, single_n=args.single_n
        )
        scenarios["oban"] = lambda: bench_oban.oban_figures(
            admin, args.peer_jobs, args.single_n, args.io_jobs
        )
        scenarios["pgqueuer_io"] = lambda: bench_io.pgqueuer_io(admin, *io)
        scenarios["procrastinate_io"] = lambda: bench_io.procrastinate_io(admin, *io)
        scenarios["chancy_io"] = lambda: bench_io.chancy_io(admin, *io)
    results.update(interleaved(args.repeats, scenarios, step))

    points = tuple(int(n) for n in args.workers.split(",") if n.strip())
    step(f"dbqueue drain with {', '.join(map(str, points))} worker processes")
    results["dbqueue_workers"] = guarded(
        lambda: pg_run(
            lambda s: bench_load.workers_curve(s, args.jobs, points, args.repeats), "dbqcurve"
        )
    )

    step(f"dbqueue claim with {args.finished_rows:,} finished rows vs none, then prune")

    def claims() -> Figures:
        with pg_settings(admin, "dbqclaim0") as empty, pg_settings(admin, "dbqclaim1") as full:
            return bench_history.history(
                empty,
                full,
                args.finished_rows,
                args.claim_queued,
                max(5, args.repeats),
                args.prune_seconds,
            )

    results["dbqueue_claim"] = guarded(claims)
    step(f"dbqueue worker RSS over {args.rss_tasks:,} tasks")
    results["dbqueue_rss"] = guarded(
        lambda: pg_run(lambda s: worker_rss(s, args.rss_tasks), "dbqrss")
    )
    step("dbqueue on SQLite")

    def sqlite_run() -> Figures:
        with sqlite_settings() as settings:
            return enqueue_and_drain(settings, args.sqlite_jobs, args.single_n // 2)

    results["dbqueue_sqlite"] = repeat(args.repeats, sqlite_run)
    if not args.no_extras:
        step("counters / bus / queues benchmarks")
        results["extras"] = optional_benches(("counters", "bus", "queues", "limits"))
    results["seconds"] = step.total()
    return results


class Stepper:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, what: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f}s] {what}", file=sys.stderr, flush=True)

    def total(self) -> float:
        return time.monotonic() - self.started


def _mariadb_version() -> str:
    try:
        return "MariaDB/MySQL " + bench_mariadb.version()
    except Exception as exc:
        return f"MariaDB/MySQL unreachable: {type(exc).__name__}"


def environment(admin: str) -> Figures:
    try:
        with psycopg.connect(admin, connect_timeout=10) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            server = str(row[0]) if row else "?"
    except psycopg.Error as exc:
        server = f"unreachable: {exc}"
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "postgresql": server,
        "mariadb": _mariadb_version(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "dbqueue": getattr(dbqueue, "__version__", "?"),
    }


# -- the table -----------------------------------------------------------------------------------


def _num(figures: Figures, key: str) -> float | None:
    value = figures.get(key) if isinstance(figures, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def _cell(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    return f"{value:,.0f}/s"


def _peer(figures: Figures, key: str, unit: str = "") -> str:
    if "skipped" in figures:
        return "not run"
    if "error" in figures:
        return "error"
    return _cell(_num(figures, key), unit)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


# the peers' columns: (results key of the main scenarios, of the I/O-bound one, header)
PEERS = (
    ("pgqueuer", "pgqueuer_io", "PgQueuer"),
    ("procrastinate", "procrastinate_io", "procrastinate"),
    ("chancy", "chancy_io", "chancy"),
    ("oban", "oban", "Oban (py)"),  # one scenario: it may run in another Python
)
COLUMNS = ["scenario (PostgreSQL)", "dbqueue"] + [p[2] for p in PEERS]
COLUMNS += ["raw SQL / limit", "dbqueue / raw", "target", ""]


def _row(*cells: str) -> str:
    cells = cells + ("",) * (len(COLUMNS) - len(cells))
    return "| " + " | ".join(cells) + " |"


def _peers(results: dict[str, Any], key: str, unit: str = "", io: bool = False) -> list[str]:
    out = []
    for main, io_key, _ in PEERS:
        figures = results.get(io_key if io else main, {"skipped": "not run"})
        out.append(_peer(figures, key, unit))
    return out


def _logging_row(results: dict[str, Any]) -> str:
    """The drain at the default INFO (one line per task) beside the drain at WARNING."""
    logged = results.get("dbqueue_logging", {})
    if "error" in logged:
        return _row("drain at INFO vs WARNING", f"error: {logged['error']}")
    ratios = results.get("ratios", {})
    info = ratios.get("info_vs_warning", _num(logged, "info_vs_warning"))
    json_ratio = ratios.get("json_vs_warning", _num(logged, "json_vs_warning"))
    return _row(
        f"drain {int(_num(logged, 'jobs') or 0):,} no-op tasks at INFO, a line per task "
        "(text; JSON)",
        f"{_cell(_num(logged, 'drain_info_per_s'))}; "
        f"{_cell(_num(logged, 'drain_info_json_per_s'))} "
        f"(WARNING: {_cell(_num(logged, 'drain_warning_per_s'))})",
        *[""] * len(PEERS),
        "",
        f"{_cell(info, 'x')}; {_cell(json_ratio, 'x')} of WARNING",
        ">= 0.85x WARNING",
        _verdict(None if info is None else info >= 0.85),
    )


def _io_rows(results: dict[str, Any]) -> list[str]:
    """I/O-bound: dbqueue async and threads beside the peers (async), against the limit."""
    ratios = results.get("ratios", {})
    params = results.get("parameters", {})
    jobs = int(params.get("io_jobs", 0))
    limit = bench_io.limit(IO_PROCESSES, IO_AT_ONCE, IO_SECONDS)
    rows = []
    for mode, what in (
        ("async", f"async def, --async-concurrency {IO_AT_ONCE}"),
        ("threads", f"time.sleep, --threads {IO_AT_ONCE}"),
    ):
        ours = results.get(f"dbqueue_io_{mode}", {})
        vs_limit = ratios.get(f"io_{mode}_vs_limit", _num(ours, "io_vs_limit"))
        vs_pgq = ratios.get(f"io_{mode}_vs_pgqueuer")
        if "skipped" in ours or "error" in ours:
            cell = ours.get("skipped") or f"error: {ours.get('error')}"
        else:
            cell = _cell(_num(ours, "io_per_s"))
        ok = None if vs_limit is None else vs_limit >= 0.6 and (vs_pgq is None or vs_pgq >= 1.0)
        rows.append(
            _row(
                f"I/O-bound: {jobs:,} tasks waiting {IO_SECONDS * 1000:.0f} ms, "
                f"{IO_PROCESSES} processes x {IO_AT_ONCE} at once ({what})",
                cell,
                *(_peers(results, "io_per_s", io=True) if mode == "async" else [""] * len(PEERS)),
                f"limit {limit:,.0f}/s",
                f"{_cell(vs_limit, 'x')} of limit; {_cell(vs_pgq, 'x')} PgQueuer",
                ">= 0.6x limit, >= 1.0x PgQueuer",
                _verdict(ok),
            )
        )
    return rows


def _workers_row(results: dict[str, Any]) -> str:
    curve = results.get("dbqueue_workers", {})
    if "error" in curve:
        return _row("drain with N worker processes", f"error: {curve['error']}")
    points = tuple(
        int(n) for n in str(results.get("parameters", {}).get("workers", "")).split(",") if n
    )
    top = _num(curve, "top_vs_best")
    return _row(
        f"drain {int(_num(curve, 'jobs') or 0):,} no-op tasks with N worker processes "
        f"({int(_num(curve, 'cpus') or 0)} CPUs, median of {int(_num(curve, 'rounds') or 1)} "
        "rounds)",
        bench_load.curve_line(curve, points),
        *[""] * len(PEERS),
        "",
        f"{max(points, default=0)} processes: {_cell(top, 'x')} of the best "
        f"({int(_num(curve, 'best_at') or 0)})",
        ">= 0.70x best",
        _verdict(None if top is None else top >= 0.7),
    )


def _mariadb_rows(results: dict[str, Any]) -> list[str]:
    """dbqueue on MariaDB/MySQL against the raw-SQL limit on the same server, same run."""
    ours = results.get("mariadb", {"skipped": "not run"})
    raw = results.get("mariadb_raw", {"skipped": "not run"})
    ratios = results.get("ratios", {})
    server = results.get("environment", {}).get("mariadb", "MariaDB")

    def cell(figures: Figures, key: str) -> str:
        return (
            _peer(figures, key)
            if "skipped" in figures or "error" in figures
            else (_cell(_num(figures, key)))
        )

    def verdict(name: str, bound: float | None) -> str:
        value = ratios.get(name)
        return "" if bound is None else _verdict(None if value is None else value >= bound)

    rows = [
        f"| scenario ({server}) | dbqueue | raw SQL | dbqueue / raw | target | |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for what, key, raw_figures, raw_key, ratio, bound in (
        (
            f"drain {int(_num(raw, 'jobs') or 0):,} no-op tasks, 2 processes",
            "drain_per_s",
            raw,
            "drain_per_s",
            "mariadb_drain_vs_raw",
            0.4,
        ),
        (
            "enqueue_many, batches of 1,000",
            "enqueue_batch_per_s",
            raw,
            "executemany_per_s",
            "mariadb_many_vs_raw",
            None,
        ),
        (
            "enqueue one by one, own commit",
            "enqueue_single_per_s",
            ours,
            "raw_single_per_s",
            "mariadb_single_vs_raw",
            0.5,
        ),
    ):
        rows.append(
            f"| {what} | {cell(ours, key)} | {cell(raw_figures, raw_key)} | "
            f"{_cell(ratios.get(ratio), 'x')} | "
            f"{'' if bound is None else f'>= {bound:.2f}x raw'} | {verdict(ratio, bound)} |"
        )
    return rows


def table(results: dict[str, Any]) -> str:
    raw = results.get("raw_limit", {})
    batch_raw = results.get("raw_batch_insert", {})
    dbq = results.get("dbqueue", {})
    lat = results.get("dbqueue_latency", {})
    claim = results.get("dbqueue_claim", {})
    rss = results.get("dbqueue_rss", {})
    lite = results.get("dbqueue_sqlite", {})
    pgq = results.get("pgqueuer", {"skipped": "not run"})

    ratios = results.get("ratios", {})

    def ratio(a: float | None, b: float | None, name: str = "") -> float | None:
        """The median of the rounds' own ratios when recorded, else the ratio of medians."""
        if name in ratios:
            return float(ratios[name])
        return a / b if a is not None and b else None

    def at_least(value: float | None, bound: float) -> str:
        return _verdict(None if value is None else value >= bound)

    drain = _num(dbq, "drain_per_s")
    raw_drain = _num(raw, "drain_per_s")
    many = _num(dbq, "enqueue_batch_per_s")
    pgq_many = _num(pgq, "enqueue_batch_per_s")
    one = _num(dbq, "enqueue_single_per_s")
    raw_one = _num(dbq, "raw_single_per_s")  # measured in blocks alongside (single_enqueues)
    p50 = _num(lat, "latency_p50_ms")
    full_vs_empty = _num(claim, "claim_full_vs_empty")
    drain_raw = ratio(drain, raw_drain, "drain_vs_raw")
    many_pgq = ratio(many, pgq_many, "many_vs_pgqueuer")
    one_raw = ratio(one, raw_one, "single_vs_raw")
    rows = [
        _row(*COLUMNS),
        _row(*["---"] * len(COLUMNS)),
        _row(
            f"drain {int(_num(raw, 'jobs') or 0):,} no-op tasks, 2 processes",
            _cell(drain),
            *_peers(results, "drain_per_s"),
            _cell(raw_drain),
            _cell(drain_raw, "x"),
            ">= 0.40x raw",
            at_least(drain_raw, 0.4),
        ),
        _row(
            "enqueue_many, batches of 1,000",
            _cell(many),
            *_peers(results, "enqueue_batch_per_s"),
            f"{_cell(_num(batch_raw, 'executemany_per_s'))} "
            f"(COPY {_cell(_num(batch_raw, 'insert_per_s'))})",
            _cell(ratio(many, _num(batch_raw, "executemany_per_s"), "many_vs_raw"), "x"),
            f">= 1.0x PgQueuer ({_cell(many_pgq, 'x')})",
            at_least(many_pgq, 1.0),
        ),
        _row(
            "enqueue one by one, own commit",
            _cell(one),
            *_peers(results, "enqueue_single_per_s"),
            _cell(raw_one),
            _cell(one_raw, "x"),
            ">= 0.5x raw",
            at_least(one_raw, 0.5),
        ),
        _row(
            "idle latency p50, enqueue to start",
            _cell(p50, "ms"),
            *_peers(results, "latency_p50_ms", "ms"),
            "",
            "",
            "<= 3 ms",
            _verdict(None if p50 is None else p50 <= 3.0),
        ),
        _row(
            "idle latency p99",
            _cell(_num(lat, "latency_p99_ms"), "ms"),
            *_peers(results, "latency_p99_ms", "ms"),
        ),
        *_io_rows(results),
        _logging_row(results),
        _workers_row(results),
        _row("claim (100 at a time), empty table", _cell(_num(claim, "claim_empty_per_s"))),
        _row(
            f"claim with {int(_num(claim, 'finished_rows') or 0):,} finished rows",
            _cell(_num(claim, "claim_full_per_s")),
            *[""] * len(PEERS),
            "",
            f"{_cell(full_vs_empty, 'x')} of empty",
            ">= 0.90x empty",
            at_least(full_vs_empty, 0.9),
        ),
        _row(
            f"dbqueue prune of those rows ({int(_num(claim, 'pruned_rows') or 0):,} deleted in "
            f"{_num(claim, 'prune_seconds') or 0:.0f} s"
            f"{'' if _num(claim, 'prune_complete') else ', stopped there'})",
            _cell(_num(claim, "prune_per_s")),
        ),
    ]
    rss_points = sorted(
        (int(k.rsplit("_", 1)[1]), v) for k, v in rss.items() if k.startswith("rss_mb_at_")
    )
    if rss_points:
        points = ", ".join(f"{n:,}: {v:.1f}" for n, v in rss_points)
        rows.append(
            _row(
                "worker RSS (MiB) after N tasks",
                points,
                *[""] * (len(PEERS) + 2),
                "flat",
                f"growth {rss.get('rss_growth_mb', 0):+.1f} MiB",
            )
        )
    elif "error" in rss:
        rows.append(_row("worker RSS", f"error: {rss['error']}"))
    codec = results.get("codec", {})
    if "build_us" in codec:
        rows.append(
            _row(
                "pickling + signing per task (enqueue / worker)",
                f"{codec['build_us']:.0f} µs / {codec['verify_unpickle_us']:.0f} µs "
                f"({codec['payload_bytes']:.0f}-byte payload)",
            )
        )
    rows += [
        "",
        "| scenario (SQLite file, WAL) | dbqueue |",
        "| --- | --- |",
        f"| drain {int(results.get('parameters', {}).get('sqlite_jobs', 0)):,} no-op tasks, "
        f"2 processes | {_cell(_num(lite, 'drain_per_s'))} |",
        f"| enqueue_many, batches of 1,000 | {_cell(_num(lite, 'enqueue_batch_per_s'))} |",
        f"| enqueue one by one, own commit | {_cell(_num(lite, 'enqueue_single_per_s'))} |",
    ]
    rows += ["", *_mariadb_rows(results)]
    notes = [
        f"- {name}: {figures['skipped']}"
        for name, figures in results.items()
        if isinstance(figures, dict) and "skipped" in figures
    ]
    if notes:
        rows += ["", "Not run:", *notes]
    errors = [
        f"- {name}: {figures['error']}"
        for name, figures in results.items()
        if isinstance(figures, dict) and "error" in figures
    ]
    if errors:
        rows += ["", "Errors:", *errors]
    return "\n".join(rows)


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    load = ", ".join(f"{x:.1f}" for x in env["load_average_at_start"])
    parts = [
        "# dbqueue benchmark",
        "",
        f"{env['when']}; PostgreSQL {env['postgresql']} on loopback; Python {env['python']}; "
        f"{env['cpus']} CPUs, load average at start {load}; medians of "
        f"{results['parameters']['repeats']} interleaved rounds (ratios: medians of each "
        f"round's own); {results['seconds']:.0f} s in all. "
        "Rates are tasks per second. Produced by `scripts/bench`.",
        "",
        table(results),
    ]
    params = results["parameters"]
    parts += [
        "",
        f"Drain sizes: dbqueue, PgQueuer and the raw limit {params['jobs']:,} tasks, "
        f"procrastinate {params['procrastinate_jobs']:,}, chancy and Oban {params['peer_jobs']:,} "
        "(the slower peers; rates are per second). Peers: PgQueuer 2 processes x 1 "
        "QueueManager, batch 100; procrastinate 2 workers, concurrency 10; chancy 2 workers, "
        "asyncio executor, concurrency 100; Oban 2 instances, queue limit 100.",
    ]
    loads = [
        f"{name} {figures['load_1m']:.1f}"
        for name, figures in results.items()
        if isinstance(figures, dict) and isinstance(figures.get("load_1m"), float)
    ]
    if loads:
        parts += ["", "Load average (1 min) at the end of each scenario: " + ", ".join(loads)]
    for name, extra in results.get("extras", {}).items():
        parts += ["", f"## {name}", "", "```", extra.get("table", "").rstrip(), "```"]
        if "error" in extra:
            parts.append(f"error: {extra['error']}")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--dsn",
        default=os.environ.get("DBQUEUE_BENCH_DSN", bench_peers.DEFAULT_ADMIN_DSN),
        help="admin DSN: throwaway databases are created and dropped through it",
    )
    parser.add_argument("--jobs", type=int, default=50_000, help="tasks per drain")
    parser.add_argument("--single-n", type=int, default=2_000, help="single enqueues")
    parser.add_argument("--latency-n", type=int, default=200)
    parser.add_argument("--finished-rows", type=int, default=1_000_000)
    parser.add_argument(
        "--scale",
        action="store_true",
        help="history at scale: claim and prune with 10,000,000 finished rows (adds minutes)",
    )
    parser.add_argument(
        "--prune-seconds", type=float, default=120, help="stop dbqueue prune after this long"
    )
    parser.add_argument("--io-jobs", type=int, default=5_000, help="tasks per I/O-bound drain")
    parser.add_argument("--mariadb-jobs", type=int, default=20_000, help="tasks per MariaDB drain")
    parser.add_argument("--no-mariadb", action="store_true", help="skip the MariaDB/MySQL rows")
    parser.add_argument(
        "--workers", default=",".join(map(str, bench_load.POINTS)), help="processes per drain"
    )
    parser.add_argument("--claim-queued", type=int, default=10_000)
    parser.add_argument("--rss-tasks", type=int, default=100_000)
    parser.add_argument("--sqlite-jobs", type=int, default=20_000)
    parser.add_argument("--procrastinate-jobs", type=int, default=2_000)
    parser.add_argument(
        "--peer-jobs", type=int, default=10_000, help="chancy's and Oban's drains (slower peers)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="median over this many runs")
    parser.add_argument(
        "--no-peers", action="store_true", help="skip PgQueuer, procrastinate, chancy"
    )
    parser.add_argument("--no-extras", action="store_true", help="skip counters/bus benches")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, one run: a smoke test of the bench"
    )
    parser.add_argument("--out", default=str(ROOT / "bench-results"), help="path without suffix")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.single_n, args.latency_n = 5_000, 300, 30
        args.finished_rows, args.claim_queued, args.rss_tasks = 50_000, 2_000, 5_000
        args.sqlite_jobs, args.procrastinate_jobs, args.repeats = 2_000, 1_000, 1
        args.io_jobs, args.workers, args.mariadb_jobs = 2_000, "1,4", 2_000
        args.peer_jobs = 2_000
    if args.scale:
        args.finished_rows, args.prune_seconds = 10_000_000, max(args.prune_seconds, 600)
    bench_peers._silence_peers()
    results = run(args)
    text = markdown(results)
    print(text)
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"written: {args.out}.md, {args.out}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
