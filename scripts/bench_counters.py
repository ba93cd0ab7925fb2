"""Counter-cache benchmark: concurrent writers inserting children of one hot parent (PostgreSQL).

Two ways of keeping a parent's count of children, measured in the same run:

* ``sync``: ``UPDATE posts SET comments_count = comments_count + 1`` in the writer's own
  transaction (Rails' ``counter_cache``). Every writer takes the parent row's lock and holds
  it until it commits, so the inserts of one hot parent run one at a time.
* ``delta``: ``async_counter_cache(Comment.post)``. The writer inserts a ``counter_deltas`` row
  and makes sure one flush task is queued; a real ``dbqueue work`` process applies the deltas.

Each writer is an OS process inserting one child per transaction through an ORM session.
``--work-ms`` is the rest of a request's work done inside the transaction after the insert
(the time the parent row stays locked in ``sync`` mode). The figures are inserts per second
for each mode and their ratio; for ``delta`` also how long the counter took to catch up after
the writers stopped, and a check that it then equals ``count(*)``.

Runs in a throwaway database created from ``--dsn`` and dropped afterwards. Not a test: the
numbers depend on the machine. ``scripts/bench`` calls ``main()``; alone::

    python scripts/bench_counters.py --writers 8 --seconds 5 --work-ms 0 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import signal
import subprocess
import sys
import time
from multiprocessing.queues import Queue as MPQueue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from dbqueue import async_counter_cache, config, database

DEFAULT_DSN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
HERE = Path(__file__).resolve().parent


class Base(orm.DeclarativeBase):
    pass


class Post(Base):
    __tablename__ = "posts"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    comments_count: orm.Mapped[int] = orm.mapped_column(default=0)


class Comment(Base):
    """Counted through counter_deltas."""

    __tablename__ = "comments"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    post_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("posts.id"))
    body: orm.Mapped[str] = orm.mapped_column(sa.String(100))
    post: orm.Mapped[Post] = orm.relationship()


class SyncPost(Base):
    __tablename__ = "sync_posts"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    comments_count: orm.Mapped[int] = orm.mapped_column(default=0)


class SyncComment(Base):
    """Counted by an UPDATE of the parent in the writer's transaction."""

    __tablename__ = "sync_comments"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    post_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("sync_posts.id"))
    body: orm.Mapped[str] = orm.mapped_column(sa.String(100))


async_counter_cache(Comment.post)


def _writer(
    url: str,
    mode: str,
    seconds: float,
    work_ms: float,
    ready: MPQueue[int],
    go: Event,
    out: MPQueue[int],
) -> None:
    """One writer process: insert children of post 1 until the time is up; report the count."""
    engine = config.create_engine(url)
    done = 0
    try:
        with engine.connect() as conn:  # connect before the start, not on the clock
            conn.rollback()
        ready.put(os.getpid())
        go.wait()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with orm.Session(engine) as session, session.begin():
                if mode == "sync":
                    session.add(SyncComment(post_id=1, body="x"))
                    session.flush()
                    session.execute(
                        sa.update(SyncPost)
                        .where(SyncPost.id == 1)
                        .values(comments_count=SyncPost.comments_count + 1)
                    )
                else:
                    session.add(Comment(post_id=1, body="x"))
                    session.flush()
                if work_ms:
                    time.sleep(work_ms / 1000)
            done += 1
    finally:
        engine.dispose()
        out.put(done)


def _run_writers(url: str, mode: str, writers: int, seconds: float, work_ms: float) -> float:
    """Inserts per second of `writers` processes together."""
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    ready: MPQueue[int] = ctx.Queue()
    out: MPQueue[int] = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(url, mode, seconds, work_ms, ready, go, out))
        for _ in range(writers)
    ]
    for p in procs:
        p.start()
    for _ in procs:  # every writer imported and connected: start the clock
        ready.get(timeout=120)
    started = time.monotonic()
    go.set()
    counts = [out.get(timeout=seconds + 120) for _ in procs]
    elapsed = time.monotonic() - started
    for p in procs:
        p.join(30)
    return sum(counts) / elapsed


def _scalar(engine: sa.Engine, sql: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql)).scalar()


def measure(url: str, writers: int, seconds: float, work_ms: float) -> dict[str, Any]:
    """Both modes at one `work_ms`, on a database that has the tables."""
    engine = config.create_engine(url)
    try:
        with engine.begin() as conn:
            for table in ("comments", "sync_comments", "counter_deltas", "tasks"):
                conn.execute(sa.text(f"DELETE FROM {table}"))
            conn.execute(sa.text("UPDATE posts SET comments_count = 0"))
            conn.execute(sa.text("UPDATE sync_posts SET comments_count = 0"))
        sync_rate = _run_writers(url, "sync", writers, seconds, work_ms)
        delta_rate = _run_writers(url, "delta", writers, seconds, work_ms)
        stopped = time.monotonic()
        total = _scalar(engine, "SELECT count(*) FROM comments")
        while time.monotonic() - stopped < 120:
            if _scalar(engine, "SELECT comments_count FROM posts WHERE id = 1") == total:
                break
            time.sleep(0.02)
        catch_up = time.monotonic() - stopped
        exact = _scalar(engine, "SELECT comments_count FROM posts WHERE id = 1") == total
        flushes = _scalar(
            engine, "SELECT count(*) FROM tasks WHERE handler = 'dbqueue.counters:flush'"
        )
        sync_exact = _scalar(engine, "SELECT comments_count FROM sync_posts") == _scalar(
            engine, "SELECT count(*) FROM sync_comments"
        )
    finally:
        engine.dispose()
    return {
        "writers": writers,
        "seconds": seconds,
        "work_ms": work_ms,
        "sync_inserts_per_s": round(sync_rate, 1),
        "delta_inserts_per_s": round(delta_rate, 1),
        "ratio_delta_over_sync": round(delta_rate / sync_rate, 2) if sync_rate else None,
        "delta_catch_up_s": round(catch_up, 3),
        "delta_flush_tasks": flushes,
        "delta_exact": exact,
        "sync_exact": sync_exact,
        "load_average_1m": round(os.getloadavg()[0], 1),  # other processes on the machine
    }


def _throwaway_database(admin_url: str) -> tuple[sa.Engine, str, str]:
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    name = f"bench_counters_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    return admin, name, url


def run(
    admin_url: str = DEFAULT_DSN,
    writers: int = 8,
    seconds: float = 5.0,
    work_ms: tuple[float, ...] = (0.0, 2.0),
) -> list[dict[str, Any]]:
    """Create a database, start a worker, measure each `work_ms`, drop the database."""
    os.environ.setdefault("DBQUEUE_SECRET_KEY", secrets.token_hex(32))
    admin, name, url = _throwaway_database(admin_url)
    worker = None
    try:
        settings = config.Settings(database_url=url)
        database.migrate(settings)
        engine = settings.get_engine()
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(Post).values(id=1, comments_count=0))
            conn.execute(sa.insert(SyncPost).values(id=1, comments_count=0))
        engine.dispose()
        env = dict(os.environ, DBQUEUE_DATABASE_URL=url)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        worker = subprocess.Popen(
            [sys.executable, "-m", "dbqueue", "--log-level", "WARNING", "work",
             "--queue", "counter_caches", "--import", "bench_counters", "--sleep-delay", "0.1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        return [measure(url, writers, seconds, ms) for ms in work_ms]
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            _, err = worker.communicate(timeout=60)
            if worker.returncode:
                print(f"worker exited {worker.returncode}: {err.strip()[-500:]}", file=sys.stderr)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def table(results: list[dict[str, Any]]) -> str:
    """The figures as a small text table."""
    lines = [
        f"{'work ms':>7}  {'sync ins/s':>10}  {'delta ins/s':>11}  {'ratio':>5}  "
        f"{'catch-up s':>10}  {'flushes':>7}  exact"
    ]
    for r in results:
        lines.append(
            f"{r['work_ms']:>7g}  {r['sync_inserts_per_s']:>10.0f}  "
            f"{r['delta_inserts_per_s']:>11.0f}  {r['ratio_delta_over_sync'] or 0:>5.2f}  "
            f"{r['delta_catch_up_s']:>10.2f}  {r['delta_flush_tasks']:>7}  "
            f"{'yes' if r['delta_exact'] and r['sync_exact'] else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", default=os.environ.get("DBQUEUE_BENCH_PG_URL", DEFAULT_DSN))
    parser.add_argument("--writers", type=int, default=8, help="writer processes")
    parser.add_argument("--seconds", type=float, default=5.0, help="per mode and work-ms")
    parser.add_argument(
        "--work-ms", type=float, nargs="+", default=[0.0, 2.0],
        help="work inside each writer transaction after the insert (one run per value)",
    )  # fmt: skip
    parser.add_argument("--json", default="bench-counters.json", help="where to write figures")
    args = parser.parse_args(argv)
    results = run(args.dsn, args.writers, args.seconds, tuple(args.work_ms))
    print(f"counter cache: {args.writers} writers, one parent, PostgreSQL, {args.seconds:g}s each")
    print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(table(results))
    Path(args.json).write_text(json.dumps({"counter_cache": results}, indent=2) + "\n")
    print(f"figures written to {args.json}")
    return 0 if all(r["delta_exact"] and r["sync_exact"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
