"""Concurrency limits (issue 18): what the claim costs with and without them.

PostgreSQL, a throwaway database (bench.pg_settings). Each pass enqueues ``--tasks`` no-op
tasks and claims them all, ``--batch`` at a time, each claim in its own transaction as a
worker's; the figure is the median milliseconds per claim over ``--rounds`` passes, the
scenarios alternating within each round so the machine's drift falls on all alike:

* before: the claim as it was before limits (no filter on concurrency_key): the baseline;
* unlimited: today's claim of tasks without a key (what every worker makes while no task
  with a key waits in its queues and none of its queues has a cap);
* limited, free tasks: the limited claim (advisory lock, slot counts) over the same tasks;
* limited, keyed tasks: the limited claim over tasks of ``--tasks`` distinct keys, limit 1;
* blocked ahead: ``--blocked`` queued tasks of one saturated key placed ahead in claim order
  (priority -10), then the unlimited and the limited claim of free tasks behind them.

Alone::

    python scripts/bench_limits.py [--tasks 2000] [--batch 10] [--blocked 10000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import bench  # noqa: E402
import bench_tasks  # noqa: E402

import dbqueue  # noqa: E402
from dbqueue import config, limits, store  # noqa: E402
from dbqueue.engines import base  # noqa: E402
from dbqueue.engines import postgresql as pg_engine  # noqa: E402
from dbqueue.schema import tasks  # noqa: E402

Figures = dict[str, Any]


def claim_all(settings: config.Settings, batch: int, limited: bool) -> float:
    """Milliseconds per claim to take every ready task (the blocked ones stay)."""
    engine = settings.get_engine()
    spent: list[float] = []
    while True:
        started = time.perf_counter()
        with engine.begin() as conn:
            rows = store.claim(conn, "bench-limits", batch, limited=limited)
        spent.append(time.perf_counter() - started)
        if not rows:
            break
        if limited:  # finish them: a key's slot is free again for the next claim
            with engine.begin() as conn:
                conn.execute(
                    sa.update(tasks)
                    .where(tasks.c.id.in_([r.id for r in rows]))
                    .values(status="succeeded", locked_by=None)
                )
    return 1000 * statistics.median(spent)


def enqueue_free(settings: config.Settings, n: int) -> None:
    dbqueue.enqueue_many(bench_tasks.noop, [()] * n, settings=settings)
    bench.vacuum(settings)


def enqueue_keyed(settings: config.Settings, n: int) -> None:
    for start in range(0, n, 500):
        for i in range(start, min(n, start + 500)):
            dbqueue.enqueue(
                bench_tasks.noop, concurrency_key=f"key{i}", max_concurrency=1, settings=settings
            )
    bench.vacuum(settings)


def clear(settings: config.Settings, blocked: bool = False) -> None:
    with settings.get_engine().begin() as conn:
        stmt = sa.delete(tasks)
        if blocked:  # keep the saturated key's running and queued rows
            stmt = stmt.where(sa.or_(tasks.c.concurrency_key.is_(None)))
        conn.execute(stmt)


def before_limits() -> Any:
    """The unlimited claim as it was before limits: its key filter made always true."""
    original = limits.free_of_limits
    limits.free_of_limits = lambda: sa.true()  # type: ignore[assignment]
    _clear_claim_statements()
    return original


def restore(original: Any) -> None:
    limits.free_of_limits = original
    _clear_claim_statements()


def _clear_claim_statements() -> None:
    base.Engine.claim_statement.cache_clear()
    pg_engine.PostgreSQL.claim_statement.cache_clear()


def block(settings: config.Settings, n: int) -> None:
    """`n` queued tasks of key `saturated` (limit 1) ahead of everything, one running."""
    ids = []
    for _ in range(n // 1000 or 1):
        ids += dbqueue.enqueue_many(
            bench_tasks.noop, [()] * min(n, 1000), priority=-10, settings=settings
        )
    with settings.get_engine().begin() as conn:
        conn.execute(
            sa.update(tasks)
            .where(tasks.c.id.in_(ids))
            .values(concurrency_key="saturated", max_concurrency=1)
        )
        conn.execute(
            sa.update(tasks)
            .where(tasks.c.id == ids[0])
            .values(status="running", locked_by="bench-elsewhere")
        )
    bench.vacuum(settings)


def run(dsn: str, n: int, batch: int, blocked: int, rounds: int) -> Figures:
    results: Figures = {"tasks": n, "batch": batch, "blocked": blocked}
    scenarios: dict[str, Callable[[config.Settings], float]] = {}

    def before(s: config.Settings) -> float:
        enqueue_free(s, n)
        original = before_limits()
        try:
            return claim_all(s, batch, limited=False)
        finally:
            restore(original)

    def measure(fill: Callable[[config.Settings, int], None], limited: bool) -> Any:
        def scenario(s: config.Settings) -> float:
            fill(s, n)
            return claim_all(s, batch, limited)

        return scenario

    scenarios["before"] = before
    scenarios["unlimited"] = measure(enqueue_free, False)
    scenarios["limited_free"] = measure(enqueue_free, True)
    scenarios["limited_keyed"] = measure(enqueue_keyed, True)
    samples: dict[str, list[float]] = {name: [] for name in scenarios}
    samples["blocked_unlimited"] = []
    samples["blocked_limited"] = []
    with bench.pg_settings(dsn, "limits") as plain, bench.pg_settings(dsn, "limblk") as ahead:
        block(ahead, blocked)
        for scenario in scenarios.values():  # warm the statements and the cache
            scenario(plain)
            clear(plain)
        for _ in range(rounds):
            for name, scenario in scenarios.items():
                samples[name].append(scenario(plain))
                clear(plain)
            for limited in (False, True):
                enqueue_free(ahead, n)
                key = "blocked_limited" if limited else "blocked_unlimited"
                samples[key].append(claim_all(ahead, batch, limited))
                clear(ahead, blocked=True)
    for name, values in samples.items():
        results[f"{name}_ms"] = statistics.median(values)
    results["unlimited_vs_before"] = statistics.median(
        [u / b for u, b in zip(samples["unlimited"], samples["before"], strict=True)]
    )
    results["samples"] = samples
    return results


def table(r: Figures) -> str:
    n, blocked = f"{r['tasks']:,}", f"{r['blocked']:,}"
    rows = [
        ("before", f"claim before limits ({n} tasks, no key filter)"),
        ("unlimited", "unlimited claim (tasks without a key)"),
        ("limited_free", "limited claim, tasks without a key"),
        ("limited_keyed", f"limited claim, {n} keys of limit 1"),
        ("blocked_unlimited", f"unlimited claim behind {blocked} blocked tasks"),
        ("blocked_limited", f"limited claim behind {blocked} blocked tasks"),
    ]
    lines = [
        f"concurrency limits: ms per claim of up to {r['batch']} tasks (median)",
        *(f"{what:<52} {r[f'{key}_ms']:>8.3f} ms" for key, what in rows),
        f"unlimited / before: {r['unlimited_vs_before']:.2f}x",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--dsn",
        default=os.environ.get("DBQUEUE_BENCH_DSN", bench.bench_peers.DEFAULT_ADMIN_DSN),
        help="admin DSN: throwaway databases are created and dropped through it",
    )
    parser.add_argument("--tasks", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--blocked", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default="bench-limits.json", help="where to write figures")
    args = parser.parse_args(argv)
    results = run(args.dsn, args.tasks, args.batch, args.blocked, args.rounds)
    print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(table(results))
    Path(args.json).write_text(json.dumps({"limits": results}, indent=2) + "\n")
    print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
