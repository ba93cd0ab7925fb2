"""The `db` fixture: every test runs on a real SQLite file, a real PostgreSQL database and a
real MariaDB database.

PostgreSQL: a template database is migrated once per test run and cloned for each test
(`CREATE DATABASE ... TEMPLATE`), so each test gets an empty, committed-to database in tens of
milliseconds and drops it afterwards. The server is DBQUEUE_TEST_PG_URL, else the local one on
127.0.0.1:5432.

MariaDB has no TEMPLATE: a template database is migrated once per run and each test's database
is cloned from it table by table (`CREATE TABLE new.t LIKE tpl.t`, then the template's rows:
alembic's version). The server is DBQUEUE_TEST_MYSQL_URL, else the local one on 127.0.0.1:3306
(root, no password).

With CI set, an unreachable server fails the run: it never skips.

Markers: `postgresql_only` (the feature exists only on PostgreSQL), `mysql_only` (only on
MySQL/MariaDB), `skip_locked` (needs concurrent claimers with SKIP LOCKED: PostgreSQL and
MariaDB, not SQLite).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import dbqueue
from dbqueue import config, database
from tests import mariadbcluster, pgcluster

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "DBQUEUE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
MYSQL_ADMIN_URL = os.environ.get("DBQUEUE_TEST_MYSQL_URL", "mysql+mysqldb://root@127.0.0.1:3306")
ENGINES = ["sqlite", "postgresql", "mariadb"]
# Which engines a marker keeps (a test with several markers runs where all of them allow).
MARKER_ENGINES = {
    "postgresql_only": {"postgresql"},
    "mysql_only": {"mariadb"},
    "skip_locked": {"postgresql", "mariadb"},
}
SECRET = "test-secret-key-that-is-long-enough-0123456789"

# tests/django needs Django 6 (Python 3.12+): scripts/test runs it in .venv-django, once per
# database. Collected only where Django is installed.
collect_ignore = [] if importlib.util.find_spec("django") else ["django"]
RUN_ID = uuid.uuid4().hex[:8]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db",
        action="append",
        choices=ENGINES,
        help="run only against these databases (default: all three)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db" in metafunc.fixturenames:
        kinds = metafunc.config.getoption("--db") or ENGINES
        for marker, allowed in MARKER_ENGINES.items():
            if metafunc.definition.get_closest_marker(marker) is not None:
                kinds = [k for k in kinds if k in allowed]
        metafunc.parametrize("db", kinds, indirect=True)
    if "server_kind" in metafunc.fixturenames:  # a server the test owns (and restarts)
        kinds = [k for k in metafunc.config.getoption("--db") or ENGINES if k != "sqlite"]
        metafunc.parametrize("server_kind", kinds)


def owned_server(kind: str) -> pgcluster.Cluster | mariadbcluster.Cluster:
    """A throwaway server of this engine from the local binaries, not yet started."""
    return pgcluster.Cluster() if kind == "postgresql" else mariadbcluster.Cluster()


def _admin_engine() -> sa.Engine:
    return sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def _create_database(admin: sa.Engine, quoted_name: str, server: str, variable: str) -> None:
    """The run's first statement on a server: unreachable fails the run, never skips it."""
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {quoted_name}")
    except sa.exc.OperationalError as exc:
        message = f"{server} is not reachable at {config.redact(admin.url)}: {exc.orig}"
        if os.environ.get("CI"):
            pytest.fail(message + f" (CI is set: {server} tests must run)")
        pytest.fail(message + f" (start it, or set {variable})")


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated template database, built once per run, dropped at the end."""
    name = f"dbqueue_tpl_{RUN_ID}"
    admin = _admin_engine()
    _create_database(admin, f'"{name}"', "PostgreSQL", "DBQUEUE_TEST_PG_URL")
    url = sa.make_url(PG_ADMIN_URL).set(database=name)
    settings = config.Settings(database_url=url.render_as_string(hide_password=False))
    database.migrate(settings)
    settings.get_engine().dispose()
    yield name
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def _mysql_admin_engine() -> sa.Engine:
    return sa.create_engine(
        MYSQL_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
    )


def _mysql_url(name: str) -> str:
    return sa.make_url(MYSQL_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _mysql_drop(admin: sa.Engine, name: str) -> None:
    """Drop a test database, first ending the connections still in it (a worker the test left
    behind, a pool not yet disposed): their metadata locks would make DROP wait for them."""
    with admin.connect() as conn:
        conn.exec_driver_sql("SET SESSION lock_wait_timeout = 30")
        ids = conn.execute(
            sa.text(
                "SELECT id FROM information_schema.processlist WHERE db = :name AND id <> "
                "CONNECTION_ID()"
            ),
            {"name": name},
        ).scalars()
        for connection_id in ids:
            with contextlib.suppress(sa.exc.DBAPIError):  # it may have ended meanwhile
                conn.exec_driver_sql(f"KILL CONNECTION {int(connection_id)}")
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")


@dataclasses.dataclass
class MysqlTemplate:
    """The migrated template: its name, its tables, and those with rows to copy."""

    name: str
    tables: list[str]
    with_rows: list[str]


@pytest.fixture(scope="session")
def mysql_template() -> Iterator[MysqlTemplate]:
    """A migrated template database on MariaDB, built once per run, dropped at the end."""
    name = f"dbqueue_tpl_{RUN_ID}"
    admin = _mysql_admin_engine()
    _create_database(admin, f"`{name}`", "MariaDB", "DBQUEUE_TEST_MYSQL_URL")
    try:
        try:
            settings = config.Settings(database_url=_mysql_url(name))
            try:
                database.migrate(settings)
            finally:
                settings.get_engine().dispose()
        except Exception as exc:
            pytest.fail(f"migrating the MariaDB template database {name} failed: {exc!r}")
        with admin.connect() as conn:
            tables = list(
                conn.execute(
                    sa.text(
                        "SELECT table_name FROM information_schema.tables "
                        "WHERE table_schema = :name AND table_type = 'BASE TABLE' "
                        "ORDER BY table_name"
                    ),
                    {"name": name},
                ).scalars()
            )
            with_rows = [
                table
                for table in tables
                if conn.exec_driver_sql(f"SELECT 1 FROM `{name}`.`{table}` LIMIT 1").first()
            ]
        yield MysqlTemplate(name, tables, with_rows)
    finally:
        _mysql_drop(admin, name)
        admin.dispose()


def _mysql_clone(admin: sa.Engine, template: MysqlTemplate, name: str) -> None:
    """A new database with the template's tables (indexes, charsets, AUTO_INCREMENT columns
    included: CREATE TABLE ... LIKE copies them all) and the template's rows."""
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}`")
        for table in template.tables:
            conn.exec_driver_sql(
                f"CREATE TABLE `{name}`.`{table}` LIKE `{template.name}`.`{table}`"
            )
        for table in template.with_rows:
            conn.exec_driver_sql(
                f"INSERT INTO `{name}`.`{table}` SELECT * FROM `{template.name}`.`{table}`"
            )


class Background(subprocess.Popen[str]):
    """A process whose output is read continuously, so a chatty worker never blocks on a
    full pipe; `communicate()` waits for it and returns everything it wrote."""

    def __init__(self, command: list[str], **kwargs: Any) -> None:
        super().__init__(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            **kwargs,
        )
        self._out: list[str] = []
        self._err: list[str] = []
        self._readers = [
            threading.Thread(target=self._drain, args=(self.stdout, self._out), daemon=True),
            threading.Thread(target=self._drain, args=(self.stderr, self._err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _drain(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
        stream.close()

    def output(self) -> str:
        """stderr so far (the logs), without waiting."""
        return "".join(self._err)

    def communicate(self, input: Any = None, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return "".join(self._out), "".join(self._err)


@dataclasses.dataclass
class DB:
    """One test's database, its settings (also installed as dbqueue's default) and helpers."""

    kind: str
    url: str
    settings: config.Settings
    tmp_path: Path

    @property
    def engine(self) -> sa.Engine:
        return self.settings.get_engine()

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses: same database, same key, tests importable."""
        env = dict(os.environ)
        env.update(
            DBQUEUE_DATABASE_URL=self.url,
            DBQUEUE_SECRET_KEY=SECRET,
            PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        env.pop("DBQUEUE_INLINE", None)
        return env

    def cli(
        self, *args: str, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the real `dbqueue` command (as `python -m dbqueue`) against this database."""
        return subprocess.run(
            [sys.executable, "-m", "dbqueue", *args],
            env=self.env,
            cwd=self.tmp_path,
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
        )

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start `dbqueue ARGS` in the background (a real worker process)."""
        return subprocess.Popen(
            [sys.executable, "-m", "dbqueue", *args],
            env=self.env,
            cwd=self.tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,
        )

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))

    def wait_for(self, sql: str, expected: Any, timeout: float = 30, **params: Any) -> Any:
        """Poll `sql` until it returns `expected`; fail with the last value otherwise."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.scalar(sql, **params)
            if value == expected:
                return value
            time.sleep(0.05)
        raise AssertionError(f"{sql!r} returned {value!r}, expected {expected!r} in {timeout}s")


@pytest.fixture
def db(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DB]:
    kind = request.param
    monkeypatch.setenv("DBQUEUE_SECRET_KEY", SECRET)
    monkeypatch.delenv("DBQUEUE_INLINE", raising=False)
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'dbqueue.sqlite3'}"
        settings = dbqueue.configure(database_url=url)
        database.migrate(settings)
        yield DB(kind, url, settings, tmp_path)
        settings.get_engine().dispose()
        return
    name = f"dbqueue_test_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    if kind == "mariadb":
        mysql_template = request.getfixturevalue("mysql_template")
        mysql_admin = _mysql_admin_engine()
        _mysql_clone(mysql_admin, mysql_template, name)
        url = _mysql_url(name)
        settings = dbqueue.configure(database_url=url)
        try:
            yield DB(kind, url, settings, tmp_path)
        finally:
            settings.get_engine().dispose()
            _mysql_drop(mysql_admin, name)
            mysql_admin.dispose()
        return
    template = request.getfixturevalue("pg_template")
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    url = sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    settings = dbqueue.configure(database_url=url)
    try:
        yield DB(kind, url, settings, tmp_path)
    finally:
        settings.get_engine().dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(autouse=True)
def _reset_default_settings() -> Iterator[None]:
    yield
    if config._current is not None and config._current.engine is not None:
        config._current.engine.dispose()
    config._current = None
