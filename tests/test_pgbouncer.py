"""dbqueue through PgBouncer in transaction pooling mode (PostgreSQL only: PgBouncer is a
PostgreSQL pooler; the setting is refused on SQLite).

Each test starts its own Debian `pgbouncer` (tests/pgbouncer.py) in front of the local server.
Behind it, a server session belongs to a client for one transaction only: psycopg's prepared
statements (made after 5 runs of a statement on a connection) then land on sessions other
clients use, and a LISTEN hears nothing. `DBQUEUE_PGBOUNCER=transaction` turns them off; the
listener connects to DBQUEUE_LISTEN_URL, a direct URL, when one is given.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

import dbqueue
from dbqueue import config, database, errors, store
from tests import jobs
from tests import pgbouncer as pgbouncer_harness
from tests import pgbouncer_app as app
from tests.conftest import PG_ADMIN_URL, Background, _admin_engine

pytestmark = pytest.mark.postgresql_only

PREPARED = "prepared statement"
POLLING = "workers poll for new tasks"
LISTENING = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    f"AND query = 'LISTEN {store.NOTIFY_CHANNEL}'"
)


@pytest.fixture
def pgbouncer() -> Iterator[Callable[..., pgbouncer_harness.PgBouncer]]:
    """Starts PgBouncers (`pgbouncer(pool_size=1)`) in front of the test server; stops them."""
    if pgbouncer_harness.binary() is None:
        message = "Debian's pgbouncer is not installed: apt-get install pgbouncer (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: these tests must run)")
        pytest.skip(message)
    started: list[pgbouncer_harness.PgBouncer] = []

    def start(**options: int) -> pgbouncer_harness.PgBouncer:
        bouncer = pgbouncer_harness.PgBouncer(PG_ADMIN_URL, **options)
        started.append(bouncer)
        return bouncer.start()

    yield start
    for bouncer in started:
        bouncer.stop()


def database_name(db) -> str:
    name = sa.make_url(db.url).database
    assert name is not None
    return name


def pooled_env(db, url: str, **extra: str) -> dict[str, str]:
    env = db.env
    env.pop("DBQUEUE_LISTEN_URL", None)
    env.update(DBQUEUE_DATABASE_URL=url, DBQUEUE_PGBOUNCER="transaction", **extra)
    return env


def dbqueue_cli(env: dict[str, str], cwd, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dbqueue", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def start_work(env: dict[str, str], cwd, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dbqueue", "work", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, wait, and return the logs (stderr); the process must exit cleanly."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return err


# -- the setting --------------------------------------------------------------------------


def test_prepared_statements_collide_through_pgbouncer_unless_told(db, pgbouncer):
    """Two processes' enqueues share PgBouncer's one server session: with psycopg's default
    the second prepares the name the first already prepared there. The error says what to
    set; with the setting the same enqueues all land."""
    bouncer = pgbouncer(pool_size=1)
    url = bouncer.url(database_name(db))
    runs = 8  # psycopg prepares a statement on its 6th run on a connection

    def enqueue_from_two_clients(settings_a: config.Settings, settings_b: config.Settings) -> None:
        try:
            for settings in (settings_a, settings_b):
                for n in range(runs):
                    dbqueue.enqueue(jobs.add, args=(n, n), settings=settings)
        finally:
            settings_a.get_engine().dispose()
            settings_b.get_engine().dispose()

    # notify=False: one statement text for every enqueue (NOTIFYs are rate-limited per process).
    untold = [config.Settings(database_url=url, pgbouncer=None, notify=False) for _ in range(2)]
    with pytest.raises(errors.ConfigurationError) as caught:
        enqueue_from_two_clients(*untold)
    message = str(caught.value)
    assert 'prepared statement "_pg3_0" already exists' in message
    assert "set DBQUEUE_PGBOUNCER=transaction" in message
    assert "***" in message and pgbouncer_harness.PASSWORD not in message
    assert db.scalar("SELECT count(*) FROM tasks") == runs + 5  # B failed at its 6th

    in_url = bouncer.url(database_name(db), dbqueue_pgbouncer="transaction")
    told = [
        config.Settings(database_url=in_url, pgbouncer=None, notify=False),
        config.Settings(database_url=url, pgbouncer="transaction", notify=False),
    ]
    enqueue_from_two_clients(*told)
    assert db.scalar("SELECT count(*) FROM tasks") == 3 * runs + 5
    assert bouncer.stats(database_name(db))["total_xact_count"] >= 2 * runs


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_workers_without_the_setting_stop_saying_what_to_set(db, pgbouncer):
    """Two polling workers on one server session: the second to prepare its claim collides
    with the first's statement name, and the worker says what to set (not only a traceback)."""
    bouncer = pgbouncer(pool_size=1)
    env = pooled_env(db, bouncer.url(database_name(db)))
    del env["DBQUEUE_PGBOUNCER"]
    work = Background(
        [sys.executable, "-m", "dbqueue", "work", "-c", "2", "--sleep-delay", "0.05"],
        env=env,
        cwd=db.tmp_path,
    )
    try:
        deadline = time.monotonic() + 120
        while "set DBQUEUE_PGBOUNCER=transaction" not in work.output():
            assert time.monotonic() < deadline, work.output()
            time.sleep(0.2)
    finally:
        work.send_signal(signal.SIGTERM)
        _out, err = work.communicate(timeout=60)
    (line,) = [line for line in err.splitlines() if "set DBQUEUE_PGBOUNCER" in line][:1]
    assert "stops:" in line and 'prepared statement "_pg3_0"' in line, line
    assert pgbouncer_harness.PASSWORD not in err


def test_the_url_parameter_is_dbqueues_not_the_drivers(db):
    url = sa.make_url(db.url).update_query_dict({"dbqueue_pgbouncer": "transaction"})
    settings = config.Settings(database_url=url.render_as_string(hide_password=False))
    assert settings.transaction_pooled()
    with settings.get_engine().connect() as conn:
        assert conn.connection.driver_connection.prepare_threshold is None
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    assert "dbqueue_pgbouncer" not in settings.get_engine().url.query
    settings.get_engine().dispose()
    plain = config.Settings(database_url=db.url, pgbouncer=None)
    assert not plain.transaction_pooled()
    with plain.get_engine().connect() as conn:
        assert conn.connection.driver_connection.prepare_threshold == 5  # psycopg's default
    plain.get_engine().dispose()


def test_an_applications_engine_that_prepares_is_refused_behind_the_pooler(db, monkeypatch):
    """dbqueue cannot change how the application made its Engine: it says what to change."""
    monkeypatch.setenv("DBQUEUE_PGBOUNCER", "transaction")
    preparing = sa.create_engine(db.url)
    dbqueue.configure(engine=preparing)
    with pytest.raises(
        errors.ConfigurationError, match=re.escape("connect_args={'prepare_threshold': None}")
    ):
        dbqueue.enqueue(jobs.add, args=(1, 2))
    preparing.dispose()
    unprepared = sa.create_engine(db.url, connect_args={"prepare_threshold": None})
    dbqueue.configure(engine=unprepared)
    assert dbqueue.enqueue(jobs.add, args=(1, 2)).id > 0
    unprepared.dispose()
    monkeypatch.delenv("DBQUEUE_PGBOUNCER")
    dbqueue.configure(engine=(plain := sa.create_engine(db.url)))  # not pooled: not checked
    assert dbqueue.enqueue(jobs.add, args=(1, 2)).id > 0
    plain.dispose()


def test_the_setting_comes_from_the_environment(db, monkeypatch):
    monkeypatch.setenv("DBQUEUE_PGBOUNCER", "transaction")
    settings = config.Settings(database_url=db.url)
    assert settings.pgbouncer == "transaction" and settings.transaction_pooled()
    with settings.get_engine().connect() as conn:
        assert conn.connection.driver_connection.prepare_threshold is None
    settings.get_engine().dispose()
    monkeypatch.setenv("DBQUEUE_PGBOUNCER", "session")
    assert not config.Settings(database_url=db.url).transaction_pooled()


@pytest.mark.parametrize(
    ("query", "told", "message"),
    [
        ("?dbqueue_pgbouncer=transactions", None, "dbqueue_pgbouncer='transactions' is not one"),
        ("", "yes", "DBQUEUE_PGBOUNCER='yes' is not one of transaction, session, off"),
        ("", "statement", "statement pooling forbids; use PgBouncer's pool_mode = transaction"),
        ("?dbqueue_pgbouncer=session", "transaction", "contradicts dbqueue_pgbouncer=session"),
    ],
)
def test_bad_settings_are_refused_naming_the_fix(query, told, message):
    url = "postgresql+psycopg://postgres:s3cret@127.0.0.1:5432/app" + query
    with pytest.raises(errors.ConfigurationError, match=message) as caught:
        config.Settings(database_url=url, pgbouncer=told).get_engine()
    assert "s3cret" not in str(caught.value)


def test_the_setting_is_refused_on_sqlite(tmp_path):
    """SQLite has no pooler: the PostgreSQL-only setting is a mistake, said as one."""
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    with pytest.raises(errors.ConfigurationError, match="is for PostgreSQL behind PgBouncer"):
        config.Settings(database_url=url, pgbouncer="transaction").get_engine()
    with pytest.raises(errors.ConfigurationError, match="dbqueue_pgbouncer=transaction is for"):
        config.Settings(database_url=url + "?dbqueue_pgbouncer=transaction").get_engine()


def test_a_listen_url_that_is_not_postgresql_is_refused(db):
    from dbqueue import listener

    settings = config.Settings(database_url=db.url, listen_url="sqlite:///x.sqlite3")
    with pytest.raises(errors.ConfigurationError, match="DBQUEUE_LISTEN_URL=sqlite"):
        listener.connect_params(settings.get_engine(), settings.listen_url)
    settings.get_engine().dispose()


# -- real processes through the pooler ------------------------------------------------------


@pytest.mark.slow
def test_migrate_an_empty_database_through_pgbouncer(db, pgbouncer):
    """Every migration, the CONCURRENTLY index build outside a transaction included, runs
    through the pooler, and `status` reads through it."""
    bouncer = pgbouncer(pool_size=1)
    empty = f"{database_name(db)}_empty"
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{empty}"')
    try:
        env = pooled_env(db, bouncer.url(empty))
        migrate = dbqueue_cli(env, db.tmp_path, "migrate")
        assert migrate.returncode == 0, migrate.stderr
        status = dbqueue_cli(env, db.tmp_path, "status")
        assert status.returncode == 0, status.stderr
        direct = sa.make_url(db.url).set(database=empty)
        engine = sa.create_engine(direct, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            assert database.current_revision(conn) == database.head_revision()
        engine.dispose()
        for text in (migrate.stderr, status.stderr):
            assert PREPARED not in text
        assert bouncer.stats(empty)["total_xact_count"] > 0
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{empty}" WITH (FORCE)')
        admin.dispose()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_workers_enqueue_bus_counters_and_periodic_through_pgbouncer(db, pgbouncer):
    """Everything that talks to the database, through a pool of 2 server sessions shared by
    2 worker processes, their supervisor, the enqueuer and the tasks: no prepared-statement
    error anywhere, every task run once, counters exact, periodic slots enqueued."""
    bouncer = pgbouncer(pool_size=2)
    name = database_name(db)
    with db.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE runs (label VARCHAR(100), pid INTEGER)"))
    app.counter_models.Base.metadata.create_all(db.engine)
    env = pooled_env(db, bouncer.url(name), DBQUEUE_APP_KEY="pgb")
    logs: dict[str, str] = {}

    migrate = dbqueue_cli(env, db.tmp_path, "migrate")
    assert migrate.returncode == 0, migrate.stderr
    logs["migrate"] = migrate.stderr

    work = start_work(env, db.tmp_path, "-c", "2", "--sleep-delay", "0.2", "-i", app.__name__)
    try:
        db.wait_for("SELECT count(*) FROM workers", 2, timeout=60)
        db.wait_for("SELECT count(*) FROM bus_subscriptions", 1, timeout=30)  # synced at start
        enqueuer = subprocess.run(
            [sys.executable, "-c", f"from {app.__name__} import main; main()"],
            env=env,
            cwd=db.tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert enqueuer.returncode == 0, enqueuer.stderr
        logs["enqueuer"] = enqueuer.stderr
        done = json.loads(enqueuer.stdout)
        assert done["published"] == [1] * app.EVENTS
        db.wait_for(
            "SELECT count(*) FROM runs WHERE label NOT IN ('tick')", 3 * app.TASKS + app.EVENTS
        )
        db.wait_for("SELECT count(*) >= 3 FROM runs WHERE label = 'tick'", True)
        db.wait_for("SELECT count(*) FROM counter_deltas", 0)
        assert db.scalar(LISTENING) == 0  # nobody LISTENs through the pooler
    finally:
        logs["work"] = stop(work)

    assert (
        db.scalar("SELECT comments_count FROM posts WHERE id = :id", id=done["post_id"])
        == app.COMMENTS
    )
    labels = [r.label for r in db.rows("SELECT label FROM runs WHERE label <> 'tick'")]
    assert len(labels) == len(set(labels)), "a task ran twice"
    ticks = db.rows("SELECT unique_key FROM tasks WHERE handler = :h", h=f"{app.__name__}:tick")
    assert len(ticks) == len({t.unique_key for t in ticks}) >= 3

    # What `work` left queued (a tick enqueued as it stopped) and more, drained by `workoff`.
    pooled = config.Settings(database_url=bouncer.url(name), pgbouncer="transaction")
    try:
        for n in range(8):
            dbqueue.enqueue(app.task, args=(f"workoff:{n}",), settings=pooled)
    finally:
        pooled.get_engine().dispose()
    workoff = dbqueue_cli(env, db.tmp_path, "workoff", "-c", "2", "-i", app.__name__)
    assert workoff.returncode == 0, workoff.stderr
    logs["workoff"] = workoff.stderr
    assert db.scalar("SELECT count(*) FROM runs WHERE label LIKE 'workoff:%'") == 8
    assert db.scalar("SELECT count(*) FROM tasks WHERE status <> 'succeeded'") == 0

    for source, text in logs.items():
        assert PREPARED not in text, f"{source}: {text}"
    assert logs["work"].count(POLLING) == 1, logs["work"]
    (line,) = [line for line in logs["work"].splitlines() if POLLING in line]
    assert " INFO " in line and "dbqueue.listener" in line and "PgBouncer" in line, line
    assert PREPARED not in bouncer.log()
    # The traffic went through the pooler: many transactions on few server sessions.
    assert bouncer.stats(name)["total_xact_count"] > 100


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_running_task_holds_no_server_session(db, pgbouncer):
    """With one server session in the pool, an enqueue goes through while a worker runs a
    task, which ends only after it: the worker keeps no transaction open around the task
    (one that did would pin the pooler's only session, and the enqueue would wait for it
    until PgBouncer's query_wait_timeout failed it)."""
    bouncer = pgbouncer(pool_size=1)
    name = database_name(db)
    with db.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE runs (label VARCHAR(100), pid INTEGER)"))
    release = db.tmp_path / "release"
    pooled = config.Settings(database_url=bouncer.url(name), pgbouncer="transaction")
    dbqueue.enqueue(app.nap_until, args=(str(release),), settings=pooled)
    work = start_work(pooled_env(db, bouncer.url(name)), db.tmp_path, "--sleep-delay", "0.2")
    try:
        db.wait_for("SELECT count(*) FROM runs WHERE label = 'nap'", 1)  # the task is running
        dbqueue.enqueue(jobs.add, args=(1, 2), settings=pooled)
        release.touch()  # the task ends only now
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'succeeded'", 2)
    finally:
        release.touch()
        pooled.get_engine().dispose()
        err = stop(work)
    assert PREPARED not in err


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_direct_listen_url_wakes_workers_behind_pgbouncer(db, pgbouncer):
    """A worker sleeping 60 s between polls takes a task enqueued through the pooler at once
    when its listener is on DBQUEUE_LISTEN_URL; without it, the task waits for the poll."""
    bouncer = pgbouncer(pool_size=2)
    name = database_name(db)
    pooled = config.Settings(database_url=bouncer.url(name), pgbouncer="transaction")

    def enqueue() -> int:
        return dbqueue.enqueue(jobs.add, args=(1, 2), settings=pooled).id

    def status(task_id: int) -> str:
        return str(db.scalar("SELECT status FROM tasks WHERE id = :id", id=task_id))

    try:
        for listen_url in (db.url, None):
            extra = {"DBQUEUE_LISTEN_URL": listen_url} if listen_url else {}
            env = pooled_env(db, bouncer.url(name), **extra)
            first = enqueue()  # claimed at start, before the worker goes to sleep
            work = start_work(env, db.tmp_path, "--sleep-delay", "60")
            try:
                db.wait_for("SELECT status FROM tasks WHERE id = :id", "succeeded", id=first)
                if listen_url:
                    db.wait_for(LISTENING, 1)  # on the direct connection
                time.sleep(1.0)  # the worker is asleep for up to 60 s
                second = enqueue()
                if listen_url:
                    db.wait_for(
                        "SELECT status FROM tasks WHERE id = :id", "succeeded", 20, id=second
                    )
                else:
                    time.sleep(3.0)
                    assert status(second) == "queued"  # no wake-up: it waits for the poll
                    assert db.scalar(LISTENING) == 0
            finally:
                err = stop(work)
            assert PREPARED not in err
            assert err.count(POLLING) == (0 if listen_url else 1), err
    finally:
        pooled.get_engine().dispose()
