"""Settings from arguments and DBQUEUE_* environment variables, and the Engine they describe.

Owns: the default `Settings` (what `dbqueue.configure()` changes), building an Engine with the
connection settings a queue needs (SQLite WAL + BEGIN IMMEDIATE, PostgreSQL READ COMMITTED,
no server-side prepared statements behind a transaction pooler such as PgBouncer), the inline
switch, and readable errors for bad URLs. It owns no SQL on `tasks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url

from dbqueue import errors

DEFAULT_DATABASE_URL = "sqlite:///dbqueue.sqlite3"

#: Async tasks a worker process runs at once by default. 10, as arq's max_jobs: each running
#: task may hold a connection of the application's async engine, and SQLAlchemy's default
#: pool gives 15 (5 + 10 overflow), so at 10 no task waits for a connection and the
#: database sees at most 10 more sessions per worker process; a worker never claims more
#: than it can start, so a higher value only helps when tasks mostly wait on other services
#: (HTTP calls, mail): raise it there (docs/guides/async.md).
DEFAULT_ASYNC_CONCURRENCY = 10

#: The database URL's parameter saying how a pooler in front of PostgreSQL hands out server
#: connections (`?dbqueue_pgbouncer=transaction`); removed before the URL reaches the driver.
POOLER_PARAM = "dbqueue_pgbouncer"
#: What DBQUEUE_PGBOUNCER (or the URL parameter) may say. `transaction`: each transaction may
#: run on another server session, so nothing may outlive one (no prepared statements, no
#: LISTEN). `session` and `off`: a client keeps its server session, nothing changes.
POOL_MODES = ("transaction", "session", "off")


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _env_int(name: str, default: int, unit: str = "bytes") -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise errors.ConfigurationError(f"{name}={text!r} is not a positive whole number of {unit}")
    return value


def _env_list(name: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in os.environ.get(name, "").split(",") if p.strip())


@dataclasses.dataclass
class Settings:
    """Everything dbqueue needs to know; passed to workers, never read from globals there.

    Each field not given is read from its environment variable when the Settings is made
    (see the configuration reference). `dbqueue.configure(...)` makes the process-wide
    default; every function that touches the database also takes `settings=`.

    Attributes:
        database_url: the SQLAlchemy URL (`DBQUEUE_DATABASE_URL`; default
            `sqlite:///dbqueue.sqlite3`). `postgresql://` means psycopg 3.
        engine: your own Engine, whose pool dbqueue shares; it wins over `database_url`.
        secret_key: the signing key, at least 32 bytes (`DBQUEUE_SECRET_KEY`); without one a
            key file is created on first use.
        fallback_keys: old keys still accepted for verifying, never for signing
            (`DBQUEUE_SECRET_KEY_FALLBACKS`, comma-separated).
        key_file: where the generated key lives (`DBQUEUE_KEY_FILE`; default
            `$XDG_CONFIG_HOME/dbqueue/key`).
        allowed_modules: if not empty, workers run only callables of these modules and their
            submodules (`DBQUEUE_ALLOWED_MODULES`).
        max_payload_bytes: the largest signed payload (or result) stored
            (`DBQUEUE_MAX_PAYLOAD_BYTES`; default 1 MiB).
        async_concurrency: `async def` tasks each worker process runs at once on its event
            loop (`DBQUEUE_ASYNC_CONCURRENCY`; default 10; `--async-concurrency` wins).
        inline: run tasks in this process once their enqueue commits (`DBQUEUE_INLINE=1`).
        notify: send NOTIFY on enqueue (PostgreSQL); `DBQUEUE_NO_NOTIFY=1` turns it off.
        pgbouncer: `"transaction"` when the database is reached through PgBouncer in
            transaction pooling (`DBQUEUE_PGBOUNCER`).
        listen_url: a direct URL for LISTEN when `database_url` goes through a pooler
            (`DBQUEUE_LISTEN_URL`).
    """

    database_url: str = dataclasses.field(
        default_factory=lambda: os.environ.get("DBQUEUE_DATABASE_URL", DEFAULT_DATABASE_URL)
    )
    engine: sa.Engine | None = None
    secret_key: str | None = dataclasses.field(
        default_factory=lambda: os.environ.get("DBQUEUE_SECRET_KEY") or None
    )
    fallback_keys: tuple[str, ...] = dataclasses.field(
        default_factory=lambda: _env_list("DBQUEUE_SECRET_KEY_FALLBACKS")
    )
    key_file: str | None = dataclasses.field(
        default_factory=lambda: os.environ.get("DBQUEUE_KEY_FILE") or None
    )
    allowed_modules: tuple[str, ...] = dataclasses.field(
        default_factory=lambda: _env_list("DBQUEUE_ALLOWED_MODULES")
    )
    max_payload_bytes: int = dataclasses.field(
        default_factory=lambda: _env_int("DBQUEUE_MAX_PAYLOAD_BYTES", 1024 * 1024)
    )
    async_concurrency: int = dataclasses.field(
        default_factory=lambda: _env_int(
            "DBQUEUE_ASYNC_CONCURRENCY", DEFAULT_ASYNC_CONCURRENCY, "tasks"
        )
    )
    inline: bool = dataclasses.field(default_factory=lambda: _env_bool("DBQUEUE_INLINE"))
    notify: bool = dataclasses.field(default_factory=lambda: not _env_bool("DBQUEUE_NO_NOTIFY"))
    pgbouncer: str | None = dataclasses.field(
        default_factory=lambda: os.environ.get("DBQUEUE_PGBOUNCER", "").strip() or None
    )
    listen_url: str | None = dataclasses.field(
        default_factory=lambda: os.environ.get("DBQUEUE_LISTEN_URL", "").strip() or None
    )

    _keyring: Any = dataclasses.field(default=None, repr=False, compare=False)
    _engine_checked: bool = dataclasses.field(default=False, repr=False, compare=False)

    def keyring(self) -> Any:
        """The signing keys (serializer.Keyring), loaded once.

        Raises:
            ConfigurationError: the key is shorter than 32 bytes, or the key file cannot be
                created or is readable by group or others.
        """
        if self._keyring is None:
            from dbqueue import serializer

            self._keyring = serializer.load_keyring(
                self.secret_key, self.fallback_keys, self.key_file
            )
        return self._keyring

    def get_engine(self) -> sa.Engine:
        """The Engine: the application's own when it handed one, else built once from the URL.

        Raises:
            ConfigurationError: the URL cannot be used (unknown dialect, missing driver), or
                contradicts the PgBouncer setting.
        """
        if self.engine is None:
            self.engine = create_engine(self.database_url, pgbouncer=self.pgbouncer)
            self._engine_checked = True
        elif not self._engine_checked:
            self._engine_checked = True
            if self.transaction_pooled():
                _refuse_prepared_statements(self.engine)
        return self.engine

    def transaction_pooled(self) -> bool:
        """Whether the database is reached through a pooler in transaction mode (PgBouncer's
        `pool_mode = transaction`), told by DBQUEUE_PGBOUNCER or the URL's parameter: then
        nothing may rely on a server session outliving its transaction."""
        return pool_mode(self.database_url, self.pgbouncer) == "transaction"


_lock = threading.Lock()
_current: Settings | None = None


def current() -> Settings:
    """The process-wide default settings, read from the environment on first use."""
    global _current
    with _lock:
        if _current is None:
            _current = Settings()
        return _current


def configure(
    database_url: str | None = None, engine: sa.Engine | None = None, **options: Any
) -> Settings:
    """Replace the process-wide default settings and return them.

    `configure(database_url=...)` or `configure(engine=...)`; settings not given are read from
    the environment, as `Settings()` does. Call it at start-up, before enqueueing.

    Args:
        database_url: the SQLAlchemy URL of the database holding dbqueue's tables.
        engine: your application's Engine: dbqueue shares its pool (and its URL).
        **options: any other `Settings` field (`secret_key`, `allowed_modules`, `inline`...).

    Returns:
        The new default `Settings`.

    Raises:
        TypeError: an option that is not a `Settings` field.
        ConfigurationError: `DBQUEUE_MAX_PAYLOAD_BYTES` is not a positive whole number.
    """
    global _current
    kwargs: dict[str, Any] = dict(options)
    if database_url is not None:
        kwargs["database_url"] = database_url
    if engine is not None:
        kwargs["engine"] = engine
        kwargs.setdefault("database_url", engine.url.render_as_string(hide_password=False))
    unknown = set(kwargs) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise TypeError(f"unknown dbqueue setting(s): {', '.join(sorted(unknown))}")
    settings = Settings(**kwargs)
    with _lock:
        _current = settings
    return settings


@contextlib.contextmanager
def inline(enabled: bool = True) -> Iterator[None]:
    """Within the block, run each task in this process once its enqueue commits (for tests).

    `with dbqueue.inline(): ...`: a task enqueued in dbqueue's own transaction runs at once;
    one enqueued with `session=` or `connection=` runs when that transaction commits, never
    after a rollback. The row is claimed, run and recorded as a worker would, so
    `task.result` and `task.status` read as after a real worker. It is not a worker: a task
    to be retried stays queued, and there is no hard timeout.

    Args:
        enabled: False switches inline mode off within the block (when `DBQUEUE_INLINE=1`).
    """
    settings = current()
    before = settings.inline
    settings.inline = enabled
    try:
        yield
    finally:
        settings.inline = before


_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def redact(url: str | sa.URL) -> str:
    """A URL safe to print: the password hidden, even in a URL that does not parse."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return _PASSWORD.sub(r"\1***@", str(url))


def _parse(url: str | sa.URL) -> sa.URL:
    try:
        return make_url(url)
    except Exception as exc:
        raise errors.ConfigurationError(
            f"invalid database URL {redact(url)!r}: {exc}. Expected e.g. "
            "sqlite:///dbqueue.sqlite3 or postgresql+psycopg://user@host/dbname"
        ) from None


def _checked_mode(value: str, source: str) -> str:
    mode = value.strip().lower()
    if mode == "statement":
        raise errors.ConfigurationError(
            f"{source}=statement: dbqueue needs transactions of several statements, which "
            "statement pooling forbids; use PgBouncer's pool_mode = transaction with "
            f"{source}=transaction"
        )
    if mode not in POOL_MODES:
        raise errors.ConfigurationError(
            f"{source}={value!r} is not one of {', '.join(POOL_MODES)} (how the pooler in front "
            "of PostgreSQL hands out server connections; PgBouncer's pool_mode)"
        )
    return mode


def pool_mode(url: str | sa.URL, told: str | None = None) -> str | None:
    """The pooling mode in front of the database: the URL's `dbqueue_pgbouncer` parameter,
    else `told` (DBQUEUE_PGBOUNCER); None when neither says. Both saying different things
    is refused rather than guessed."""
    parsed = _parse(url)
    in_url = parsed.query.get(POOLER_PARAM)
    if isinstance(in_url, tuple):
        in_url = in_url[-1]
    from_url = _checked_mode(in_url, POOLER_PARAM) if in_url is not None else None
    from_env = _checked_mode(told, "DBQUEUE_PGBOUNCER") if told else None
    if from_url and from_env and from_url != from_env:
        raise errors.ConfigurationError(
            f"DBQUEUE_PGBOUNCER={from_env} contradicts {POOLER_PARAM}={from_url} in the "
            f"database URL {redact(parsed)}: keep one of them"
        )
    mode = from_url or from_env
    if mode is not None and parsed.get_backend_name() == "sqlite":
        source = POOLER_PARAM if from_url else "DBQUEUE_PGBOUNCER"
        raise errors.ConfigurationError(
            f"{source}={mode} is for PostgreSQL behind PgBouncer; {redact(parsed)} is "
            "SQLite: remove it"
        )
    return mode


def driver_url(url: str | sa.URL) -> sa.URL:
    """The URL as the driver must see it: without dbqueue's own parameter."""
    return _parse(url).difference_update_query([POOLER_PARAM])


def create_engine(url: str, *, pgbouncer: str | None = None, **kwargs: Any) -> sa.Engine:
    """An Engine set up for queue work, with a readable error for a bad URL.

    SQLite: WAL (readers never block the writer), a long busy timeout, and every transaction
    `BEGIN IMMEDIATE` so a read-then-write never fails with SQLITE_BUSY half way.
    PostgreSQL: READ COMMITTED regardless of the server default, as SKIP LOCKED claims need.
    Behind a transaction pooler (`pgbouncer="transaction"`, DBQUEUE_PGBOUNCER's value, or
    `?dbqueue_pgbouncer=transaction` in the URL): psycopg never prepares statements on the
    server. It prepares a statement run 5 times on a connection under a name of its own,
    and the pooler later hands that server session to another client, which fails with
    `prepared statement "_pg3_0" already exists` (or runs on a session that never saw it:
    `does not exist`).
    """
    mode = pool_mode(url, pgbouncer)
    parsed = driver_url(url)
    if parsed.drivername in {"postgresql", "postgres"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in {"sqlite", "postgresql", "mysql", "mariadb"}:
        raise errors.ConfigurationError(
            f"cannot use database URL {redact(parsed)}: dbqueue works with SQLite, PostgreSQL "
            f"and MySQL/MariaDB, not {parsed.get_backend_name()}"
        )
    if parsed.drivername.startswith("sqlite"):
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            directory = Path(database).expanduser().resolve().parent
            if not directory.is_dir():
                raise errors.ConfigurationError(
                    f"SQLite database directory {directory} does not exist: create it or "
                    "point DBQUEUE_DATABASE_URL elsewhere"
                )
            if not os.access(directory, os.W_OK):
                raise errors.ConfigurationError(
                    f"directory {directory} is not writable (SQLite needs to create "
                    f"{Path(database).name}-wal there)"
                )
        kwargs.setdefault("connect_args", {}).setdefault("timeout", 30)
        engine = _create(parsed, kwargs)
        _setup_sqlite(engine)
        return engine
    if parsed.drivername.startswith("postgresql"):
        kwargs.setdefault("isolation_level", "READ COMMITTED")
        ping_when_idle = "pool_pre_ping" not in kwargs
        connect_args = kwargs.setdefault("connect_args", {})
        if mode == "transaction":
            connect_args["prepare_threshold"] = None
        connect_args.setdefault("connect_timeout", 10)
        # Notice a half-open connection within seconds instead of the kernel's two hours.
        connect_args.setdefault("keepalives_idle", 10)
        connect_args.setdefault("keepalives_interval", 5)
        connect_args.setdefault("keepalives_count", 3)
        # Keepalives only probe an idle socket: a statement sent into a dead network is
        # retransmitted for about 15 minutes (tcp_retries2) without an error, and the worker
        # sending it (a heartbeat, an outcome) hangs that long. Give up after as long instead.
        connect_args.setdefault("tcp_user_timeout", 25_000)  # milliseconds
        engine = _create(parsed, kwargs)
        if ping_when_idle:
            _ping_when_idle(engine)
        return engine
    if parsed.get_backend_name() in {"mysql", "mariadb"}:
        return _create_mysql(parsed, kwargs)
    return _create(parsed, kwargs)


MYSQL_OWN = "dbqueue_mysql"  # connection record info: made by _create_mysql
MYSQL_IDLE_LIMITED = "dbqueue_idle_limited"  # ...and its session has an idle limit set
MYSQL_AUTOCOMMIT_LEFT = "dbqueue_autocommit_left"  # ...and a lone enqueue left it autocommit


def _create_mysql(url: sa.URL, kwargs: dict[str, Any]) -> sa.Engine:
    """MySQL 8.0+ / MariaDB 10.6+: READ COMMITTED (InnoDB's REPEATABLE READ takes gap locks
    that deadlock concurrent claimers), utf8mb4 on the wire, the session's time zone UTC, and
    an older server refused at connect (database.check_mysql_version)."""
    from dbqueue import database

    kwargs.setdefault("isolation_level", "READ COMMITTED")
    # The pool's ROLLBACK on every checkin is a round trip (the MySQL drivers cannot tell
    # whether a transaction is open): a third of a single enqueue's. A Connection ends its
    # own transaction when it closes, so the reset only repeated what was already done.
    kwargs.setdefault("pool_reset_on_return", None)
    ping_when_idle = "pool_pre_ping" not in kwargs
    given = url
    if str(url.query.get("charset", "utf8mb4")).lower() == "utf8mb4":
        url = url.update_query_dict({"charset": "utf8mb4"})  # mysqlclient knows no UTF8MB4
    else:
        raise errors.ConfigurationError(
            f"{redact(given)}: charset={url.query['charset']} cannot carry every character "
            "dbqueue's utf8mb4 tables hold (an emoji in a queue name, a key or an error "
            "message): remove charset= from the URL (dbqueue sets utf8mb4) or set "
            "charset=utf8mb4"
        )
    kwargs.setdefault("connect_args", {}).setdefault("connect_timeout", 10)
    engine = _create(url, kwargs, given)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT VERSION()")
            (version,) = cursor.fetchone()
            database.check_mysql_version(str(version), redact(given))
            cursor.execute("SET time_zone = '+00:00'")
        finally:
            cursor.close()
        record.info[MYSQL_OWN] = True

    @event.listens_for(engine, "checkin")
    def _end_idle_limit(dbapi_connection: Any, record: Any) -> None:
        """MariaDB's idle_transaction_timeout is the session's (engines.mysql.limit_idle):
        back to none before the connection serves anything else."""
        if dbapi_connection is None or not record.info.pop(MYSQL_IDLE_LIMITED, False):
            return
        try:
            cursor = dbapi_connection.cursor()
            cursor.execute("SET SESSION idle_transaction_timeout = 0")
            cursor.close()
        except Exception:  # a broken connection: the pool's ping replaces it
            record.info[MYSQL_IDLE_LIMITED] = True

    @event.listens_for(engine, "begin")
    def _end_autocommit(conn: sa.Connection) -> None:
        """A lone enqueue leaves its connection in autocommit (engines.mysql._insert_alone):
        off again before anything else runs on it, unless the Connection asked for
        AUTOCOMMIT itself (SQLAlchemy turns it off when the Connection is released)."""
        info = conn.connection.info
        if not info.pop(MYSQL_AUTOCOMMIT_LEFT, False):
            return
        if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            conn.connection.dbapi_connection.autocommit(False)  # type: ignore[union-attr]

    if ping_when_idle:
        _ping_when_idle(engine)
    return engine


def _refuse_prepared_statements(engine: sa.Engine) -> None:
    """An application's Engine behind a transaction pooler must not let psycopg prepare
    statements (dbqueue cannot change how the application made it): say so whenever dbqueue
    takes such a connection instead of failing now and then on another client's statement
    name."""
    if engine.dialect.driver != "psycopg":
        return

    @event.listens_for(engine, "checkout")
    def _check(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if dbapi_connection.prepare_threshold is not None:
            raise errors.ConfigurationError(
                f"the Engine given to dbqueue for {redact(engine.url)} lets psycopg prepare "
                "statements, which a transaction pooler (DBQUEUE_PGBOUNCER=transaction) hands "
                "to other clients: create it with connect_args={'prepare_threshold': None}"
            )


PING_AFTER_IDLE = 1.0  # seconds a pooled connection may rest before it is tested on checkout


def _ping_when_idle(engine: sa.Engine) -> None:
    """pool_pre_ping, but only for a connection that rested in the pool for a while.

    A ping on every checkout is a round trip on every enqueue (a third of a single enqueue's
    time, measured). A connection checked in a moment ago is as good as tested; one that
    rested (through a database restart, say) is pinged, and a dead one is replaced by the
    pool before anyone uses it (DisconnectionError makes the pool reconnect).
    """

    @event.listens_for(engine, "checkin")
    def _rested_from(dbapi_connection: Any, record: Any) -> None:
        record.info["dbqueue_checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_rested(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        checked_in = record.info.get("dbqueue_checked_in")
        if checked_in is None or time.monotonic() - checked_in < PING_AFTER_IDLE:
            return  # new, or used a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise sa.exc.DisconnectionError(f"pooled connection is gone: {exc}") from exc


def _create(url: sa.URL, kwargs: dict[str, Any], given: sa.URL | None = None) -> sa.Engine:
    """The Engine; `given` is the URL as the user wrote it, for messages (`url` may carry
    query parameters dbqueue added, such as MySQL's charset)."""
    shown = redact(given if given is not None else url)
    try:
        return sa.create_engine(url, **kwargs)
    except ModuleNotFoundError as exc:
        raise errors.ConfigurationError(
            f"the driver for {shown} is not installed (no module {exc.name!r}): install it, or "
            "use a driver dbqueue installs: sqlite:///path, postgresql://user@host/db (psycopg "
            "3) or mysql://user@host/db (mysqlclient: pip install 'dbqueue[mysql]')"
        ) from None
    except Exception as exc:
        raise errors.ConfigurationError(f"cannot use database URL {shown}: {exc}") from None


def _setup_sqlite(engine: sa.Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below decide how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def is_sqlite(bind: sa.Engine | sa.Connection) -> bool:
    return bind.dialect.name == "sqlite"
