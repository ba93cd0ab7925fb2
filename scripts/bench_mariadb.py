"""MariaDB / MySQL rows of the benchmark (issue 19, point 5): the raw-SQL limit on the same
server, measured in the same run, and dbqueue's drain, enqueue_many and single enqueue as
ratios to it (targets as on PostgreSQL: drain >= 0.40x raw, single enqueue >= 0.5x raw).

The raw limit is what a hand-written queue on InnoDB can do: 2 processes, each claiming 100
rows `SELECT ... FOR UPDATE SKIP LOCKED` + `UPDATE ... WHERE id IN (...)` in one transaction
(MariaDB has no UPDATE ... RETURNING), then marking them done in a second, at READ COMMITTED
as dbqueue's own transactions run; a table with an index on (status, id) (InnoDB has no
partial index). Single inserts: one-row INSERT commits (autocommit) on the same server, in
blocks alternating with dbqueue's enqueue() blocks; batches: executemany of 1,000 rows.

The server is DBQUEUE_BENCH_MYSQL_URL (SQLAlchemy form), else root@127.0.0.1:3306; each
scenario makes its own database and drops it. Driver: mysqlclient (`dbqueue[mysql]`)."""

from __future__ import annotations

import contextlib
import os
import secrets
import statistics
import time
from collections.abc import Iterator
from typing import Any

import bench_tasks
import sqlalchemy as sa
from bench_peers import StartGate, _child_main, _error, _run_drain
from bench_setup import SECRET, Figures, drain_rate

import dbqueue
from dbqueue import config, database
from dbqueue.schema import tasks

DEFAULT_URL = "mysql+mysqldb://root@127.0.0.1:3306"
PAYLOAD = b'{"n": 0}'

RAW_SCHEMA = """
CREATE TABLE jobs (
    id BIGINT AUTO_INCREMENT PRIMARY KEY,
    status VARCHAR(16) NOT NULL DEFAULT 'queued',
    payload LONGBLOB,
    locked_by VARCHAR(64),
    finished_at DATETIME(6),
    KEY jobs_status_id (status, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
"""
RAW_SELECT = (
    "SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
)
RAW_INSERT = "INSERT INTO jobs (payload) VALUES (%s)"


def server_url() -> sa.URL:
    return sa.make_url(os.environ.get("DBQUEUE_BENCH_MYSQL_URL", DEFAULT_URL))


def _connect(database_name: str | None = None, autocommit: bool = False) -> Any:
    import MySQLdb

    url = server_url()
    kwargs: dict[str, Any] = {
        "host": url.host or "127.0.0.1",
        "port": url.port or 3306,
        "user": url.username or "root",
        "passwd": url.password or "",
        "charset": "utf8mb4",
    }
    if database_name:
        kwargs["db"] = database_name
    conn = MySQLdb.connect(**kwargs)
    conn.autocommit(autocommit)
    return conn


def available() -> str | None:
    """None when MariaDB/MySQL answers and its driver is installed, else why not."""
    try:
        import MySQLdb  # noqa: F401
    except ImportError:
        return "mysqlclient not installed (pip install -e '.[mysql]')"
    try:
        conn = _connect()
    except Exception as exc:
        return f"no MariaDB/MySQL at {server_url().render_as_string()}: {exc}"
    conn.close()
    return None


def version() -> str:
    conn = _connect()
    try:
        cur = conn.cursor()
        cur.execute("SELECT VERSION()")
        return str(cur.fetchone()[0])
    finally:
        conn.close()


@contextlib.contextmanager
def throwaway_db(name: str) -> Iterator[str]:
    """Create database bench_<name>_<random>, yield its name, drop it afterwards."""
    database_name = f"bench_{name}_{secrets.token_hex(4)}"
    conn = _connect(autocommit=True)
    try:
        conn.cursor().execute(f"CREATE DATABASE `{database_name}` CHARACTER SET utf8mb4")
    finally:
        conn.close()
    try:
        yield database_name
    finally:
        conn = _connect(autocommit=True)
        try:
            conn.cursor().execute(f"DROP DATABASE IF EXISTS `{database_name}`")
        finally:
            conn.close()


def _count(database_name: str, query: str) -> int:
    conn = _connect(database_name, autocommit=True)
    try:
        cur = conn.cursor()
        cur.execute(query)
        return int(cur.fetchone()[0])
    finally:
        conn.close()


# -- the raw limit -------------------------------------------------------------------------------


def _raw_child(database_name: str, name: str, batch: int, gate: StartGate) -> None:
    def body() -> None:
        conn = _connect(database_name)
        try:
            cur = conn.cursor()
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            conn.commit()
            gate.ready()
            while True:
                cur.execute(RAW_SELECT, (batch,))
                ids = [row[0] for row in cur.fetchall()]
                if not ids:
                    conn.commit()
                    return
                marks = ", ".join(["%s"] * len(ids))
                cur.execute(
                    f"UPDATE jobs SET status = 'running', locked_by = %s WHERE id IN ({marks})",
                    (name, *ids),
                )
                conn.commit()
                cur.execute(
                    f"UPDATE jobs SET status = 'done', finished_at = NOW(6) WHERE id IN ({marks})",
                    ids,
                )
                conn.commit()
        finally:
            conn.close()

    _child_main(body, gate)


def _raw_fill(database_name: str, n: int) -> float:
    """Insert `n` rows in committed executemany batches of 1,000; returns rows per second."""
    conn = _connect(database_name)
    try:
        cur = conn.cursor()
        rows = [(PAYLOAD,)] * 1000
        started = time.perf_counter()
        for _ in range(n // 1000):
            cur.executemany(RAW_INSERT, rows)
            conn.commit()
        elapsed = time.perf_counter() - started
        cur.execute("ANALYZE TABLE jobs")
        cur.fetchall()
        return (n // 1000 * 1000) / elapsed
    finally:
        conn.close()


def raw_limit(jobs: int, processes: int = 2, batch: int = 100) -> Figures:
    """The raw drain (see the module's docstring) and the raw batch insert rate."""
    jobs = max(1000, jobs // 1000 * 1000)
    with throwaway_db("raw") as name:
        conn = _connect(name, autocommit=True)
        try:
            conn.cursor().execute(RAW_SCHEMA)
        finally:
            conn.close()
        insert_rate = _raw_fill(name, jobs)
        elapsed = _run_drain(
            _raw_child,
            [(name, f"raw-{i}", batch) for i in range(processes)],
            name,
            "SELECT count(*) FROM jobs WHERE status <> 'done'",
            60.0,
            count=_count,
        )
        done = _count(name, "SELECT count(*) FROM jobs WHERE status = 'done'")
    if done != jobs:
        raise RuntimeError(f"{done} of {jobs} raw jobs done")
    return {"drain_per_s": jobs / elapsed, "executemany_per_s": insert_rate, "jobs": float(jobs)}


# -- dbqueue -------------------------------------------------------------------------------------


@contextlib.contextmanager
def mariadb_settings(name: str) -> Iterator[config.Settings]:
    """A migrated throwaway database on the MariaDB/MySQL server, dropped afterwards."""
    with throwaway_db(name) as database_name:
        url = server_url().set(database=database_name)
        settings = config.Settings(
            database_url=url.render_as_string(hide_password=False), secret_key=SECRET
        )
        try:
            database.migrate(settings)
            yield settings
        finally:
            settings.get_engine().dispose()


def single_enqueues(
    settings: config.Settings, database_name: str, n: int, block: int = 100
) -> Figures:
    """enqueue() calls, each its own commit, in blocks alternating with blocks of the raw
    one-row INSERT commit on the same server (a commit's time follows the disk's flush time,
    which drifts: only blocks side by side make a steady ratio)."""
    raw = _connect(database_name, autocommit=True)
    try:
        cur = raw.cursor()
        cur.execute(RAW_SCHEMA)
        for _ in range(min(50, n)):  # warm up both
            cur.execute(RAW_INSERT, (PAYLOAD,))
            dbqueue.enqueue(bench_tasks.noop, settings=settings)
        ours, theirs = [], []
        for _ in range(max(1, n // block)):
            started = time.perf_counter()
            for _ in range(block):
                cur.execute(RAW_INSERT, (PAYLOAD,))
            theirs.append(time.perf_counter() - started)
            started = time.perf_counter()
            for _ in range(block):
                dbqueue.enqueue(bench_tasks.noop, settings=settings)
            ours.append(time.perf_counter() - started)
    finally:
        raw.close()
    return {
        "enqueue_single_per_s": block * len(ours) / sum(ours),
        "raw_single_per_s": block * len(theirs) / sum(theirs),
        "single_vs_raw": statistics.median(t / o for t, o in zip(theirs, ours, strict=True)),
    }


def dbqueue_mariadb(jobs: int, single_n: int, concurrency: int = 2) -> Figures:
    """Single enqueues (beside raw), enqueue_many of `jobs` in batches of 1,000, the drain."""
    jobs = max(1000, jobs // 1000 * 1000)
    with mariadb_settings("dbq") as settings:
        database_name = str(settings.get_engine().url.database)
        figures = single_enqueues(settings, database_name, single_n)
        with settings.get_engine().begin() as conn:
            conn.execute(sa.delete(tasks))
        started = time.perf_counter()
        for _ in range(jobs // 1000):
            dbqueue.enqueue_many(bench_tasks.noop, [()] * 1000, settings=settings)
        figures["enqueue_batch_per_s"] = jobs / (time.perf_counter() - started)
        figures.update(drain_rate(settings, jobs, concurrency))
        figures["jobs"] = float(jobs)
    return figures


def guard_available(run: Any) -> Figures:
    reason = available()
    if reason:
        return {"skipped": reason}
    try:
        figures: Figures = run()
        return figures
    except Exception as exc:
        return _error(exc)
