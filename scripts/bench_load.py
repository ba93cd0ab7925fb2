"""Many workers: the drain rate of `dbqueue work --concurrency N` for N worker processes on
one machine (issue 21, point 4). Claimers contend for the same rows (FOR UPDATE SKIP LOCKED
skips the locked ones); past the number of cores, more processes add contention and context
switches but no CPU, so the curve should flatten, not collapse.

The N processes are started first and left idle until every one has its LISTEN connection;
then the tasks are enqueued in one transaction, so all of them see the work at once and what
is measured is N claimers contending, not N Python interpreters starting up on 2 cores (with
`workoff`, 32 processes spend longer importing than draining 50,000 no-op tasks)."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import time

import bench_tasks
import sqlalchemy as sa
from bench_setup import ROOT, Figures, dbqueue_command, scalar, vacuum, worker_env

import dbqueue
from dbqueue import config
from dbqueue.schema import tasks

POINTS = (1, 2, 4, 8, 16, 32)
READY_TIMEOUT_S = 300.0
DRAIN_TIMEOUT_S = 600.0


def _wait_for(settings: config.Settings, sql: str, target: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while int(scalar(settings, sql)) < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {target}: {sql}")
        time.sleep(0.2)


def drain_with_workers(settings: config.Settings, jobs: int, processes: int) -> float:
    """Start `dbqueue work -c processes`, wait until all listen, enqueue `jobs` no-op tasks in
    one transaction, wait until all succeeded; tasks per second on the database clock."""
    with settings.get_engine().begin() as conn:
        conn.execute(sa.delete(tasks))
    vacuum(settings)
    proc = subprocess.Popen(
        dbqueue_command(
            "work",
            "--concurrency",
            str(processes),
            "--import",
            "bench_tasks",
            "--sleep-delay",
            "0.2",
        ),
        env=worker_env(settings),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(
            settings,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'dbqueue-listener'",
            processes,
            READY_TIMEOUT_S,
        )
        with settings.get_engine().begin() as conn:
            for _ in range(jobs // 1000):
                dbqueue.enqueue_many(
                    bench_tasks.noop, [()] * 1000, connection=conn, settings=settings
                )
        _wait_for(
            settings,
            "SELECT count(*) FROM tasks WHERE status = 'succeeded'",
            jobs,
            DRAIN_TIMEOUT_S,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with settings.get_engine().connect() as conn:
        first, last = conn.execute(
            sa.select(sa.func.min(tasks.c.started_at), sa.func.max(tasks.c.finished_at))
        ).one()
    return jobs / (last - first).total_seconds()


def workers_curve(
    settings: config.Settings, jobs: int, points: tuple[int, ...], rounds: int = 1
) -> Figures:
    """For each N in `points`, the drain rate of `jobs` no-op tasks by N processes
    (drain_with_workers): `rounds` rounds over every point in turn, the median per point (a
    drain of 50,000 no-ops lasts about 1.5 s here, and one drain's rate moved by a third from
    one round to the next on this VM: only interleaved rounds give a steady curve).
    `top_vs_best` is the median rate at the largest N over the best median of the curve (the
    issue's target: >= 0.7)."""
    jobs = max(1000, jobs // 1000 * 1000)
    figures: Figures = {
        "jobs": float(jobs),
        "cpus": float(os.cpu_count() or 0),
        "rounds": float(rounds),
    }
    measured: dict[int, list[float]] = {n: [] for n in points}
    for _ in range(max(1, rounds)):
        for n in points:
            measured[n].append(drain_with_workers(settings, jobs, n))
            with contextlib.suppress(OSError):
                figures[f"load_at_{n}"] = os.getloadavg()[0]
    for n in points:
        figures[f"drain_{n}_per_s"] = statistics.median(measured[n])
        figures[f"drain_{n}_spread"] = max(measured[n]) / min(measured[n])
    rates = [figures[f"drain_{n}_per_s"] for n in points]
    figures["best_per_s"] = max(rates)
    figures["best_at"] = float(points[rates.index(max(rates))])
    figures["top_vs_best"] = rates[-1] / max(rates)
    return figures


def curve_line(figures: Figures, points: tuple[int, ...]) -> str:
    """`1: 9,800/s, 2: 15,200/s, ...` for the table."""
    return ", ".join(
        f"{n}: {figures[f'drain_{n}_per_s']:,.0f}/s"
        for n in points
        if isinstance(figures.get(f"drain_{n}_per_s"), float)
    )
