"""Queues isolated at scale (issue 16): one queue's backlog must not slow another queue's workers.

PostgreSQL, each database a throwaway one (bench.pg_settings). Scenarios:

* drain: ``dbqueue workoff -q mail -c 2`` over ``--jobs`` no-op tasks of queue ``mail``, in a
  database with nothing else, one with ``--backlog`` tasks queued in queue ``bulk`` at a higher
  priority (-10), and one with them at the same priority (0). Passes alternate between the
  three, so the machine's drift falls on all alike; the ratio is the median of each round's
  own ratio. Rate = tasks / (last finished_at - first started_at), the database clock.
* idle claim: the claim of a worker for an empty queue (``mail``, then ``mail, sms, push``)
  beside the backlog: the database's time (EXPLAIN ANALYZE: planning + execution) and the
  round trip of store.claim, medians of ``--samples``.
* readers: ``--backlog`` finished rows added to the backlog database (so 1,000,000 finished and
  1,000,000 queued by default); then ready_count, seconds_until_next (the idle worker's sleep),
  what ``dbqueue status`` reads (stats.counts) and the whole command, the dashboard's overview
  and task list, and two /metrics scrapes: the slowest of 3 each.
* migration 0005 on that table: the index dropped, then built again by ``dbqueue migrate``
  (CREATE INDEX CONCURRENTLY) while a thread enqueues one task at a time: the build's seconds
  and the slowest enqueue during it.

The backlog is written by one INSERT ... SELECT generate_series, not through the API. Alone::

    python scripts/bench_queues.py [--backlog 1000000] [--jobs 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
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
from dbqueue import config, database, stats, store  # noqa: E402
from dbqueue.engines import postgresql as pg_engine  # noqa: E402
from dbqueue.schema import tasks  # noqa: E402

Figures = dict[str, Any]

FILL_QUEUED = """
INSERT INTO tasks (queue, priority, run_at, status, handler, payload, attempts, max_attempts,
                   created_at)
SELECT 'bulk', {priority} + mod(g, 3), now() - interval '1 hour', 'queued', 'bench_tasks:noop',
       '\\x00'::bytea, 0, 25, now()
FROM generate_series(1, {n}) AS g
"""

FILL_FINISHED = """
INSERT INTO tasks (queue, priority, run_at, status, handler, payload, attempts, max_attempts,
                   created_at, started_at, finished_at)
SELECT CASE WHEN mod(g, 10) = 0 THEN 'mail' ELSE 'default' END, 0, now() - interval '1 day',
       CASE WHEN mod(g, 50) = 0 THEN 'failed' ELSE 'succeeded' END, 'bench_tasks:noop',
       '\\x00'::bytea, 1, 25, now() - interval '1 day', now() - interval '1 day',
       now() - interval '1 day' + interval '5 ms'
FROM generate_series(1, {n}) AS g
"""


def execute(settings: config.Settings, sql: str, autocommit: bool = False) -> None:
    engine = settings.get_engine()
    if autocommit:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(sql)
        return
    with engine.begin() as conn:
        conn.exec_driver_sql(sql)


def settle(settings: config.Settings) -> None:
    """VACUUM ANALYZE and CHECKPOINT: nothing of a fill left to run during a measurement."""
    execute(settings, "VACUUM ANALYZE tasks", autocommit=True)
    execute(settings, "CHECKPOINT", autocommit=True)


def drain_pass(settings: config.Settings, jobs: int) -> float:
    """Tasks/s of `dbqueue workoff -q mail -c 2` over `jobs` fresh tasks of queue mail."""
    dbqueue.enqueue_many(bench_tasks.noop, [()] * jobs, queue="mail", settings=settings)
    bench.vacuum(settings)
    bench.workoff(settings, 2, "--queue", "mail")
    with settings.get_engine().begin() as conn:
        first, last, done = conn.execute(
            sa.select(
                sa.func.min(tasks.c.started_at), sa.func.max(tasks.c.finished_at), sa.func.count()
            ).where(tasks.c.queue == "mail", tasks.c.status == "succeeded")
        ).one()
        conn.execute(sa.delete(tasks).where(tasks.c.queue == "mail"))
    if done != jobs:
        raise RuntimeError(f"{done} of {jobs} mail tasks succeeded")
    return float(jobs / (last - first).total_seconds())


def drains(dbs: dict[str, config.Settings], jobs: int, rounds: int) -> Figures:
    rates: dict[str, list[float]] = {name: [] for name in dbs}
    drain_pass(dbs["none"], jobs // 5)  # warm the page cache and the code path
    names = list(dbs)
    for round_ in range(rounds):  # each round starts with the next database
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            rates[name].append(drain_pass(dbs[name], jobs))
    figures: Figures = {f"drain_{n}_per_s": statistics.median(r) for n, r in rates.items()}
    for name in ("higher", "equal"):
        ratios = [b / a for a, b in zip(rates["none"], rates[name], strict=True)]
        figures[f"drain_{name}_vs_none"] = statistics.median(ratios)
    figures["rounds"] = rates
    return figures


def idle_claims(settings: config.Settings, samples: int) -> Figures:
    """The claim for empty queues beside the backlog: database time and round trip (ms)."""
    figures: Figures = {}
    engine = settings.get_engine()
    for label, queues in (("one", ("mail",)), ("three", ("mail", "sms", "push"))):
        statement = pg_engine.ENGINE.claim_statement(queues)
        values = {"claim_limit": 100, "claim_worker": "bench-idle"}
        sql, params = pg_engine.driver_params(statement, engine.dialect, values)
        db_ms: list[float] = []
        trip_ms: list[float] = []
        with engine.connect() as conn:
            driver: Any = conn.connection.driver_connection
            for _ in range(samples):
                with driver.cursor() as cursor:
                    cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params)
                    plan = cursor.fetchone()[0][0]
                driver.rollback()
                db_ms.append(plan["Planning Time"] + plan["Execution Time"])
            auto = conn.execution_options(isolation_level="AUTOCOMMIT")
            for _ in range(samples):
                started = time.perf_counter()
                rows = store.claim(auto, "bench-idle", 100, list(queues))
                trip_ms.append((time.perf_counter() - started) * 1000)
                if rows:
                    raise RuntimeError(f"the idle claim found {len(rows)} tasks")
        figures[f"idle_claim_{label}_db_ms"] = statistics.median(db_ms)
        figures[f"idle_claim_{label}_trip_ms"] = statistics.median(trip_ms)
    return figures


def slowest(run: Callable[[], object], times: int = 3) -> float:
    """The slowest of `times` runs, in ms."""
    spent = []
    for _ in range(times):
        started = time.perf_counter()
        run()
        spent.append((time.perf_counter() - started) * 1000)
    return max(spent)


def readers(settings: config.Settings) -> Figures:
    from starlette.testclient import TestClient

    from dbqueue.web import create_app

    engine = settings.get_engine()

    def on_conn(read: Callable[[sa.Connection], object]) -> Callable[[], object]:
        def run() -> object:
            with engine.connect() as conn:
                return read(conn)

        return run

    figures: Figures = {
        "ready_count_all_ms": slowest(on_conn(store.ready_count)),
        "ready_count_bulk_ms": slowest(on_conn(lambda c: store.ready_count(c, ["bulk"]))),
        "ready_count_mail_ms": slowest(on_conn(lambda c: store.ready_count(c, ["mail"]))),
        "next_run_all_ms": slowest(on_conn(store.seconds_until_next)),
        "next_run_bulk_ms": slowest(on_conn(lambda c: store.seconds_until_next(c, ["bulk"]))),
        "next_run_mail_ms": slowest(on_conn(lambda c: store.seconds_until_next(c, ["mail"]))),
        "status_counts_ms": slowest(on_conn(stats.counts)),
    }
    env = {**bench.worker_env(settings), "PYTHONWARNINGS": "ignore"}
    command = bench.dbqueue_command("status")
    figures["status_command_ms"] = slowest(
        lambda: subprocess.run(command, env=env, check=True, capture_output=True, timeout=60)
    )
    with TestClient(create_app(settings)) as client:

        def page(path: str) -> Callable[[], object]:
            def get() -> object:
                reply = client.get(path)
                if reply.status_code != 200:
                    raise RuntimeError(f"GET {path}: {reply.status_code}")
                return reply

            return get

        figures["metrics_first_scrape_ms"] = slowest(page("/metrics"), times=1)
        figures["metrics_scrape_ms"] = slowest(page("/metrics"))
        figures["overview_page_ms"] = slowest(page("/"))
        figures["tasks_page_ms"] = slowest(page("/tasks"))
        figures["tasks_queued_page_ms"] = slowest(page("/tasks?status=queued"))
    with engine.connect() as conn:
        figures["estimated"] = any(c.estimated for c in stats.counts(conn))
    return figures


def rebuild_index(settings: config.Settings) -> None:
    """Run migration 0005's upgrade() as alembic would, on an autocommit-capable connection
    (a downgrade to 0004 would also undo the later revisions, which the code needs)."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    path = database.migrations_dir() / "versions" / "0005_queue_claimable_index.py"
    spec = importlib.util.spec_from_file_location("migration_0005", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with settings.get_engine().connect() as conn:
        with Operations.context(MigrationContext.configure(conn)):
            module.upgrade()
        conn.commit()


def migration(settings: config.Settings) -> Figures:
    """Drop ix_tasks_queue_claimable, then build it again with migration 0005's own code
    (CREATE INDEX CONCURRENTLY) while a thread enqueues one task at a time."""
    rows = bench.scalar(settings, "SELECT count(*) FROM tasks")
    queued = bench.scalar(settings, "SELECT count(*) FROM tasks WHERE status = 'queued'")
    execute(settings, "DROP INDEX ix_tasks_queue_claimable", autocommit=True)
    settle(settings)
    latencies: list[float] = []
    stop = threading.Event()

    def enqueue_loop() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            dbqueue.enqueue(bench_tasks.noop, queue="during", settings=settings)
            latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(0.01)

    thread = threading.Thread(target=enqueue_loop, daemon=True)
    thread.start()
    time.sleep(0.5)
    before = len(latencies)
    started = time.perf_counter()
    rebuild_index(settings)
    build = time.perf_counter() - started
    during = latencies[before:]
    stop.set()
    thread.join(10)
    valid = bench.scalar(
        settings,
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = 'ix_tasks_queue_claimable'",
    )
    return {
        "migration_rows": float(rows),
        "migration_queued_rows": float(queued),
        "migration_seconds": build,
        "migration_index_valid": bool(valid),
        "enqueues_during": float(len(during)),
        "enqueue_max_ms_during": max(during, default=0.0),
        "enqueue_median_ms_during": statistics.median(during) if during else 0.0,
    }


def run(dsn: str, backlog: int, jobs: int, rounds: int, samples: int) -> Figures:
    results: Figures = {"backlog": backlog, "jobs": jobs}
    with (
        bench.pg_settings(dsn, "qnone") as none,
        bench.pg_settings(dsn, "qhigh") as higher,
        bench.pg_settings(dsn, "qequal") as equal,
    ):
        for settings, priority in ((higher, -10), (equal, 0)):
            execute(settings, FILL_QUEUED.format(n=backlog, priority=priority))
            settle(settings)
        results.update(drains({"none": none, "higher": higher, "equal": equal}, jobs, rounds))
        results.update(idle_claims(higher, samples))
        execute(higher, FILL_FINISHED.format(n=backlog))
        settle(higher)
        results.update(readers(higher))
        results.update(migration(higher))
    return results


def table(r: Figures) -> str:
    n = f"{r['backlog']:,}"
    high, equal = r["drain_higher_vs_none"], r["drain_equal_vs_none"]
    lines = [
        f"queues isolated: {r['jobs']:,} tasks of queue mail drained by `workoff -q mail -c 2`",
        f"{'scenario':<58} {'figure':>12}  target",
        f"{'drain, nothing else queued':<58} {r['drain_none_per_s']:>10,.0f}/s",
        f"{f'drain beside {n} queued at a higher priority':<58} "
        f"{r['drain_higher_per_s']:>10,.0f}/s  {high:.2f}x >= 0.90x",
        f"{f'drain beside {n} queued at the same priority':<58} "
        f"{r['drain_equal_per_s']:>10,.0f}/s  {equal:.2f}x >= 0.90x",
    ]
    for label, what in (("one", "mail"), ("three", "mail, sms, push")):
        lines.append(
            f"{f'idle claim for {what}, database time':<58} "
            f"{r[f'idle_claim_{label}_db_ms']:>9.3f} ms  < 1 ms"
        )
        trip = r[f"idle_claim_{label}_trip_ms"]
        lines.append(f"{f'idle claim for {what}, round trip':<58} {trip:>9.3f} ms")
    lines.append(f"on {n} finished + {n} queued rows (slowest of 3)        target < 1,000 ms")
    for key, what in (
        ("ready_count_all", "ready_count, every queue"),
        ("ready_count_bulk", f"ready_count, the queue of {n}"),
        ("ready_count_mail", "ready_count, an empty queue"),
        ("next_run_all", "seconds_until_next, every queue"),
        ("next_run_bulk", f"seconds_until_next, the queue of {n}"),
        ("next_run_mail", "seconds_until_next, an empty queue"),
        ("status_counts", "counts of `dbqueue status`"),
        ("status_command", "`dbqueue status`, whole process"),
        ("overview_page", "dashboard overview page"),
        ("tasks_page", "dashboard task list"),
        ("tasks_queued_page", "dashboard task list, queued"),
        ("metrics_first_scrape", "/metrics, first scrape"),
        ("metrics_scrape", "/metrics, next scrapes"),
    ):
        lines.append(f"{what:<58} {r[f'{key}_ms']:>9.1f} ms")
    lines.append(f"finished counts estimated: {'yes' if r['estimated'] else 'no'}")
    lines.append(
        f"migration 0005 on {r['migration_rows']:,.0f} rows ({r['migration_queued_rows']:,.0f} "
        f"queued): {r['migration_seconds']:.1f} s, CONCURRENTLY; "
        f"{r['enqueues_during']:,.0f} enqueues meanwhile, slowest "
        f"{r['enqueue_max_ms_during']:.0f} ms (median {r['enqueue_median_ms_during']:.1f} ms)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--dsn",
        default=os.environ.get("DBQUEUE_BENCH_DSN", bench.bench_peers.DEFAULT_ADMIN_DSN),
        help="admin DSN: throwaway databases are created and dropped through it",
    )
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--json", default="bench-queues.json", help="where to write figures")
    args = parser.parse_args(argv)
    results = run(args.dsn, args.backlog, args.jobs, args.rounds, args.samples)
    print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(table(results))
    Path(args.json).write_text(json.dumps({"queues": results}, indent=2) + "\n")
    print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
