"""Many workers: the drain rate of `dbqueue workoff --concurrency N` for N worker processes on
one machine (issue 21, point 4). Claimers contend for the same rows (FOR UPDATE SKIP LOCKED
skips the locked ones); past the number of cores, more processes add contention and context
switches but no CPU, so the curve should flatten, not collapse."""

from __future__ import annotations

import os

import bench_tasks
import sqlalchemy as sa
from bench_setup import Figures, drain_rate

import dbqueue
from dbqueue import config
from dbqueue.schema import tasks

POINTS = (1, 2, 4, 8, 16, 32)


def workers_curve(settings: config.Settings, jobs: int, points: tuple[int, ...]) -> Figures:
    """For each N in `points`: queue `jobs` no-op tasks, drain them with N processes (the rate
    from the database clock, first start to last finish). `top_vs_best` is the rate at the
    largest N over the best rate of the curve (the issue's target: >= 0.7)."""
    jobs = max(1000, jobs // 1000 * 1000)
    figures: Figures = {"jobs": float(jobs), "cpus": float(os.cpu_count() or 0)}
    for n in points:
        with settings.get_engine().begin() as conn:
            conn.execute(sa.delete(tasks))
        for _ in range(jobs // 1000):
            dbqueue.enqueue_many(bench_tasks.noop, [()] * 1000, settings=settings)
        figures[f"drain_{n}_per_s"] = drain_rate(settings, jobs, n)["drain_per_s"]
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
