"""Database outages under real workers: a throwaway PostgreSQL cluster or MariaDB server,
owned by the test, restarted and stopped (reliability.md R6, R7). Not SQLite: a file has no
server to lose."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import dbqueue
from dbqueue import config, database
from tests import jobs
from tests.conftest import ROOT, SECRET, Background, owned_server
from tests.mariadbcluster import Cluster as MariaDBCluster
from tests.pgcluster import Cluster

pytestmark = [pytest.mark.slow]


@pytest.fixture
def cluster(
    monkeypatch: pytest.MonkeyPatch, server_kind: str
) -> Iterator[Cluster | MariaDBCluster]:
    monkeypatch.setenv("DBQUEUE_SECRET_KEY", SECRET)
    server = owned_server(server_kind)
    server.start()
    try:
        yield server
    finally:
        server.destroy()


def env_for(url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DBQUEUE_DATABASE_URL=url, DBQUEUE_SECRET_KEY=SECRET, PYTHONPATH=str(ROOT))
    return env


def start_worker(url: str, *args: str) -> Background:
    return Background(
        [sys.executable, "-m", "dbqueue", "work", "--import", "tests.jobs", *args],
        env=env_for(url),
    )


def backend_id(conn: sa.Connection) -> str:
    """What tells this server session from any other: a new value after a reconnect.

    PostgreSQL: the backend's pid. MariaDB numbers connections from 1 again after a restart,
    so CONNECTION_ID() may repeat: a session variable set once per session tells instead."""
    if conn.dialect.name == "postgresql":
        return str(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
    conn.execute(sa.text("SET @dbqueue_session = COALESCE(@dbqueue_session, UUID())"))
    return str(conn.execute(sa.text("SELECT @dbqueue_session")).scalar_one())


def count(engine: sa.Engine, sql: str) -> int:
    for _ in range(100):
        try:
            with engine.connect() as conn:
                return int(conn.execute(sa.text(sql)).scalar_one())
        except sa.exc.OperationalError:
            time.sleep(0.2)
    raise AssertionError("database did not come back")


def wait_count(engine: sa.Engine, sql: str, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = count(engine, sql)
        if value >= expected:
            return
        time.sleep(0.1)
    raise AssertionError(f"{sql}: {value} < {expected} after {timeout}s")


def test_server_restarts_under_a_running_worker_lose_nothing(cluster):
    settings = dbqueue.configure(database_url=cluster.url)
    database.migrate(settings)
    total = 600
    dbqueue.enqueue_many(jobs.sleep, [(0.005,)] * total)
    worker = start_worker(cluster.url, "--sleep-delay", "0.2")
    engine = settings.get_engine()
    done = "SELECT count(*) FROM tasks WHERE status = 'succeeded'"
    try:
        wait_count(engine, done, 50, timeout=60)
        (pid_before,) = [r[0] for r in engine.connect().execute(sa.text("SELECT pid FROM workers"))]
        cluster.restart("fast")
        wait_count(engine, done, count(engine, done) + 50, timeout=60)
        cluster.restart("immediate")
        wait_count(engine, done, total, timeout=120)
        with engine.connect() as conn:
            pid_after = conn.execute(sa.text("SELECT pid FROM workers")).scalar_one()
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=60)
        engine.dispose()
    assert worker.returncode == 0, err[-3000:]
    assert pid_after == pid_before  # reconnected, not restarted
    assert "database unavailable at" in err
    assert "Traceback" not in err
    assert count(engine, "SELECT count(*) FROM tasks WHERE status <> 'succeeded'") == 0
    engine.dispose()


def test_worker_started_while_the_database_is_down_waits_for_it(cluster):
    settings = dbqueue.configure(database_url=cluster.url)
    database.migrate(settings)
    task = dbqueue.enqueue(jobs.add, args=(2, 3))
    settings.get_engine().dispose()
    cluster.stop()
    worker = start_worker(cluster.url, "--sleep-delay", "0.2")
    try:
        time.sleep(4)
        assert worker.poll() is None  # still waiting, not exited
        cluster.start()
        assert task.wait(timeout=60).result == 5
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=60)
        settings.get_engine().dispose()
    assert worker.returncode == 0
    assert "database unavailable at" in err and "retrying in" in err
    assert "postgres@" not in err or "***" in err or ":" in err


def test_sigterm_while_waiting_for_the_database_exits_zero(cluster):
    settings = dbqueue.configure(database_url=cluster.url)
    database.migrate(settings)
    settings.get_engine().dispose()
    cluster.stop()
    worker = start_worker(cluster.url)
    deadline = time.monotonic() + 60  # wait until it is really waiting (handlers installed)
    while "retrying in" not in worker.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "Traceback" not in err


def test_enqueue_after_a_restart_gets_a_fresh_pooled_connection(cluster):
    """The pool pings a connection that rested (config.PING_AFTER_IDLE), not every checkout:
    the application's first enqueue after a restart must still succeed, on a new connection."""
    settings = dbqueue.configure(database_url=cluster.url)
    database.migrate(settings)
    engine = settings.get_engine()
    first = dbqueue.enqueue(jobs.add, args=(1, 1))
    with engine.connect() as conn:
        backend_before = backend_id(conn)
    cluster.restart("fast")
    time.sleep(config.PING_AFTER_IDLE + 0.2)
    try:
        second = dbqueue.enqueue(jobs.add, args=(2, 2))
        with engine.connect() as conn:
            backend_after = backend_id(conn)
            ids = [r[0] for r in conn.execute(sa.text("SELECT id FROM tasks ORDER BY id"))]
    finally:
        engine.dispose()
    assert ids == [first.id, second.id]
    assert backend_after != backend_before
