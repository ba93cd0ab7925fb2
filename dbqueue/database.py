"""The database as a whole: migrations, schema version checks, and readable connection errors.

Owns where the alembic scripts live (the checkout's `migrations/`, or the copy inside the
wheel), `migrate()`, the check that the schema matches this code, and turning driver
exceptions into one-line messages that say what to do. No statements on `tasks` here.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa

from dbqueue import config, errors

if TYPE_CHECKING:  # alembic is imported where it is used: a worker's start does not need it
    from alembic.config import Config
    from alembic.migration import MigrationContext

VERSION_TABLE = "dbqueue_alembic_version"


def migrations_dir() -> Path:
    """The alembic scripts: inside the installed wheel, else the checkout's `migrations/`."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise errors.ConfigurationError(
        f"dbqueue's migrations are missing (looked in {package / '_migrations'}); reinstall dbqueue"
    )


def alembic_config(settings: config.Settings) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["dbqueue_settings"] = settings
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(migrations_dir()))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(conn: sa.Connection) -> str | None:
    from alembic.migration import MigrationContext

    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def migrate(settings: config.Settings, revision: str = "head") -> None:
    """Upgrade the schema (alembic upgrade, with dbqueue's own version table).

    On MySQL/MariaDB, under a named lock: DDL commits at once there, so two deploys migrating
    together (one init container per pod) both created the first table and one failed with
    "Table ... already exists"; the second now waits, then finds the schema at head.
    """
    from alembic import command

    from dbqueue import upsert

    with errors_translated(settings), upsert.named_lock(settings.get_engine(), "migrate"):
        command.upgrade(alembic_config(settings), revision)


def upgrade_on(connection: sa.Connection, revision: str = "head") -> None:
    """Upgrade dbqueue's tables on the caller's connection, from inside another alembic env.py.

    `command.upgrade` cannot be nested in a running env.py (alembic's `context` and `op` are
    module-wide proxies the inner command would remove), so this drives a MigrationContext
    directly: dbqueue's scripts, dbqueue's version table, the application's connection.
    """
    _run_on(connection, lambda script, current: script._upgrade_revs(revision, current))


def downgrade_on(connection: sa.Connection, revision: str = "base") -> None:
    """`upgrade_on`'s reverse, on the caller's connection (a Django migration unapplied:
    `manage.py migrate dbqueue zero`)."""
    _run_on(connection, lambda script, current: script._downgrade_revs(revision, current))


def _run_on(connection: sa.Connection, plan: Any) -> None:
    """Run the revisions `plan(script, current revision)` lists on `connection`."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(migrations_dir()))

    def steps(current: Any, _context: MigrationContext) -> Any:
        return plan(script, current)

    context = MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE, "fn": steps, "script": script}
    )
    with Operations.context(context), context.begin_transaction():
        context.run_migrations()


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """`include_name=` for an application's autogenerate: dbqueue's tables are not its own."""
    from dbqueue import schema

    return type_ != "table" or (name not in schema.metadata.tables and name != VERSION_TABLE)


def include_object_for(dialect: sa.Dialect) -> Any:
    """`include_object=` comparing dbqueue's metadata with a database of this dialect: an
    index made for other engines only (`Index.ddl_if`) is left out, and on MySQL/MariaDB so
    are the generated column `unique_live` and its unique index, which the migrations make
    there in place of a partial unique index (schema.UNIQUE_LIVE)."""
    from dbqueue import schema

    mysql = dialect.name in schema.MYSQL

    def include_object(obj: Any, name: str | None, type_: str, reflected: bool, _to: Any) -> bool:
        if reflected:
            return not (
                mysql
                and (
                    (type_ == "column" and name == schema.UNIQUE_LIVE)
                    or (type_ == "index" and name == "ix_tasks_unique_key")
                )
            )
        ddl_if = getattr(obj, "_ddl_if", None)
        if ddl_if is not None and ddl_if.dialect is not None:
            return dialect.name in ddl_if.dialect
        return True

    return include_object


def downgrade(settings: config.Settings, revision: str = "base") -> None:
    from alembic import command

    with errors_translated(settings):
        command.downgrade(alembic_config(settings), revision)


def check_schema(settings: config.Settings) -> None:
    """Raise SchemaError unless the database is at this code's migration head.

    The usual answer (it is) comes without alembic, which takes longer to import than the
    rest of a worker's start: the head read from the scripts' text, the stored revision by a
    plain SELECT. Anything else goes through alembic, which also words the error.
    """
    if _at_head_without_alembic(settings):
        return
    from alembic.script import ScriptDirectory

    expected = head_revision()
    with errors_translated(settings), settings.get_engine().connect() as conn:
        found = current_revision(conn)
        conn.rollback()
    if found == expected:
        return
    script = ScriptDirectory(str(migrations_dir()))
    url = config.redact(settings.database_url)
    if found is None:
        raise errors.SchemaError(
            f"{url} has no dbqueue tables (expected revision {expected}): run `dbqueue migrate`"
            " with DBQUEUE_DATABASE_URL (or --database-url) pointing at it"
        )
    known = {rev.revision for rev in script.walk_revisions()}
    if found not in known:
        raise errors.SchemaError(
            f"database schema is newer than this dbqueue (revision {found} is unknown, this "
            f"version knows up to {expected}): upgrade dbqueue"
        )
    raise errors.SchemaError(
        f"database schema is at revision {found}, this dbqueue needs {expected}: "
        "run `dbqueue migrate`"
    )


_REVISION = re.compile(
    r"""^(down_revision|revision)\b[^=\n]*=\s*(?:"([^"]*)"|'([^']*)'|None)\s*$"""
)


def _head_from_scripts() -> str | None:
    """The one head of a plain chain of `revision = "..."` / `down_revision = "..."` lines,
    or None for anything else (branches, merges, tuples: alembic reads those)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (migrations_dir() / "versions").glob("*.py"):
        found = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            match = _REVISION.match(line)
            if match:
                found[match.group(1)] = match.group(2) or match.group(3)
        if "revision" not in found or "down_revision" not in found or not found["revision"]:
            return None
        revisions.add(found["revision"])
        if found["down_revision"]:
            parents.add(found["down_revision"])
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 and parents <= revisions else None


def _at_head_without_alembic(settings: config.Settings) -> bool:
    head = _head_from_scripts()
    if head is None:
        return False
    with errors_translated(settings), settings.get_engine().connect() as conn:
        try:
            stored = [
                row[0] for row in conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}"))
            ]
        except sa.exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise  # the connection was lost: an outage, worded by errors_translated
            return False  # no version table: the full check says what to do
    return stored == [head]


def long_transactions(conn: sa.Connection, older_than_seconds: float) -> list[sa.Row[Any]]:
    """PostgreSQL transactions holding back vacuum (an old xmin) for longer than the limit.

    Finished task rows cannot be vacuumed while one is open, so the table and its indexes
    bloat and claims slow down: the operator should hear about it.
    """
    if conn.dialect.name != "postgresql":
        return []
    stmt = sa.text(
        "SELECT pid, application_name, state, "
        "extract(epoch FROM clock_timestamp() - xact_start) AS age_s "
        "FROM pg_stat_activity WHERE backend_xmin IS NOT NULL AND pid <> pg_backend_pid() "
        "AND xact_start < clock_timestamp() - make_interval(secs => :limit) "
        "ORDER BY xact_start LIMIT 5"
    )
    return list(conn.execute(stmt, {"limit": older_than_seconds}))


#: Connection failures that are configuration mistakes, not outages (PostgreSQL messages).
_MISCONFIGURED = (
    "password authentication failed",
    "no password supplied",
    'role "',
    'database "',
    "no pg_hba.conf entry",
    "access denied for user",  # MySQL/MariaDB 1045, 1044
    "unknown database",  # MySQL/MariaDB 1049
)


_MISSING_TABLE = (
    re.compile(r"no such table: (?:\w+\.)?(\w+)"),  # SQLite (main.x when qualified)
    re.compile(r'relation "(?:[^".]+\.)?([^"]+)" does not exist'),  # PostgreSQL
    re.compile(r"Table '(?:[^'.]+\.)?([^']+)' doesn't exist"),  # MySQL 1146: 'db.table'
)


def _missing_table(message: str) -> str | None:
    """The table a driver's "no such table" message names, if it names one."""
    for pattern in _MISSING_TABLE:
        found = pattern.search(message)
        if found:
            return found.group(1)
    return None


def _dbqueue_tables() -> set[str]:
    from dbqueue import schema

    return {*schema.metadata.tables, VERSION_TABLE}


def describe_error(settings: config.Settings, exc: BaseException) -> errors.DbqueueError:
    """A DbqueueError with a one-line message for a driver exception, password hidden."""
    url = config.redact(settings.database_url)
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    lowered = " ".join(text).lower()
    if isinstance(exc, (sa.exc.ProgrammingError, sa.exc.OperationalError)) and (
        "has no column named" in lowered
        or "no such column" in lowered
        or ("column" in lowered and "does not exist" in lowered)
        or "unknown column" in lowered  # MySQL 1054
    ):
        return errors.SchemaError(
            f"{url} has an older dbqueue schema ({first}): run `dbqueue migrate`"
        )
    if isinstance(exc, (sa.exc.ProgrammingError, sa.exc.OperationalError)) and (
        "no such table" in lowered
        or ("relation" in lowered and "does not exist" in lowered)
        or ("table" in lowered and "doesn't exist" in lowered)  # MySQL 1146
    ):
        missing = _missing_table(first)
        if missing is not None and missing not in _dbqueue_tables():
            # The application's table (a counter cache's model, say), not dbqueue's: `dbqueue
            # migrate` would not create it.
            return errors.SchemaError(
                f"{url} has no table {missing!r} ({first}): it is not one of dbqueue's tables; "
                "create your application's tables there"
            )
        return errors.SchemaError(
            f"{url} has no dbqueue tables ({first}): run `dbqueue migrate` with "
            "DBQUEUE_DATABASE_URL (or --database-url) pointing at it"
        )
    if "prepared statement" in lowered and (
        "already exists" in lowered or "does not exist" in lowered
    ):
        # psycopg's own statement names on a server session shared by other clients.
        return errors.ConfigurationError(
            f"{url} answered {first!r}: the database is reached through a transaction "
            "pooler (PgBouncer's pool_mode = transaction), which hands each client's prepared "
            "statements to other clients: set DBQUEUE_PGBOUNCER=transaction (or add "
            "?dbqueue_pgbouncer=transaction to the URL)"
        )
    if is_transient(exc):
        return errors.LockConflict(
            f"lock conflict at {url} (the database undid the transaction): {first}"
        )
    if any(marker in lowered for marker in _MISCONFIGURED):
        # Waiting will not fix a typo: say so instead of retrying forever.
        return errors.ConfigurationError(f"cannot connect to {url}: {first}")
    if isinstance(exc, sa.exc.DBAPIError) and is_disconnect(exc):
        return errors.DatabaseUnavailable(f"database unavailable at {url}: {first}")
    return errors.DbqueueError(f"database error at {url}: {first}")


@contextlib.contextmanager
def errors_translated(settings: config.Settings) -> Iterator[None]:
    """Re-raise driver errors as DbqueueErrors with readable messages."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        raise describe_error(settings, exc) from exc
    except sa.exc.ArgumentError as exc:
        raise errors.ConfigurationError(
            f"cannot use database URL {config.redact(settings.database_url)}: {exc}"
        ) from exc


T = TypeVar("T")
log = logging.getLogger("dbqueue.database")

#: How many times dbqueue runs a transaction of its own (an enqueue) that the database ended
#: over a lock conflict before raising LockConflict.
OWN_TRANSACTION_ATTEMPTS = 5


def in_own_transaction(settings: config.Settings, work: Callable[[sa.Connection], T]) -> T:
    """`work(conn)` in a transaction of dbqueue's own, run again on a lock conflict (`retried`)."""

    def run() -> T:
        with settings.get_engine().begin() as conn:
            return work(conn)

    return retried(settings, run)


def retried(settings: config.Settings, action: Callable[[], T]) -> T:
    """`action()`, a transaction (or autocommit statement) of dbqueue's own, run again when
    the database ends it over a lock conflict (`is_transient`: the server undid the work, or
    the statement and then our rollback the rest), so running it again stores everything once.
    Driver errors come out as DbqueueErrors (`errors_translated`; LockConflict once the
    attempts run out)."""
    with errors_translated(settings):
        for attempt in range(1, OWN_TRANSACTION_ATTEMPTS):
            try:
                return action()
            except sa.exc.DBAPIError as exc:
                if not is_transient(exc):
                    raise
                log.warning(
                    "%s; running the transaction again (attempt %d of %d)",
                    describe_error(settings, exc),
                    attempt + 1,
                    OWN_TRANSACTION_ATTEMPTS,
                    extra={"event": "lock_conflict_retried"},
                )
                time.sleep(random.uniform(0, 0.02 * attempt))  # the other side goes first
        return action()


@contextlib.contextmanager
def conflicts_named(what: str) -> Iterator[None]:
    """Inside the application's transaction: a lock conflict (`is_transient`) comes out as
    LockConflict saying what the server undid and that the application must roll back and run
    its whole transaction again; dbqueue cannot, the transaction is not its own."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        if not is_transient(exc):
            raise
        raise errors.LockConflict(
            f"{what} inside the caller's transaction met {_conflict_named(exc)}; roll the "
            "transaction back "
            "and run all of it again (dbqueue retries only transactions of its own)"
        ) from exc


def _conflict_named(exc: BaseException) -> str:
    """What kind of lock conflict `exc` is (is_transient) and what the server undid."""
    code = _mysql_code(exc)
    if code == 1213:
        return "a deadlock (1213): the server rolled back the whole transaction"
    if code is not None:
        return f"a lock wait timeout ({code}): the server undid that statement"
    state = _pg_sqlstate(exc)
    kind = PG_TRANSIENT.get(state or "", "a lock conflict")
    return f"{kind} ({state}): PostgreSQL aborted the whole transaction"


#: The oldest servers with `FOR UPDATE SKIP LOCKED`, which the claim needs.
MYSQL_MINIMUM = (8, 0)
MARIADB_MINIMUM = (10, 6)


def check_mysql_version(version: str, where: str) -> None:
    """Refuse a MySQL older than 8.0 or a MariaDB older than 10.6 (`version` as `SELECT
    VERSION()` says it, e.g. `10.11.6-MariaDB-0+deb12u1` or `8.0.36`), naming what is needed."""
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    mariadb = "mariadb" in version.lower()
    needed = MARIADB_MINIMUM if mariadb else MYSQL_MINIMUM
    if found < needed:
        name = "MariaDB" if mariadb else "MySQL"
        raise errors.ConfigurationError(
            f"{where} runs {name} {version}: dbqueue needs {name} "
            f"{'.'.join(map(str, needed))} or later (FOR UPDATE SKIP LOCKED); upgrade the server"
        )


def is_mysql(bind: sa.Engine | sa.Connection | sa.Dialect) -> bool:
    """Whether the database is MySQL or MariaDB (SQLAlchemy names the dialect either way)."""
    dialect = getattr(bind, "dialect", bind)
    return dialect.name in {"mysql", "mariadb"}  # type: ignore[union-attr]


def is_psycopg(bind: sa.Engine | sa.Connection) -> bool:
    """Whether the engine (or connection) talks to PostgreSQL through psycopg 3, whose
    connection the LISTEN thread, the lone-enqueue path and the worker's claim use directly."""
    return bind.dialect.name == "postgresql" and bind.dialect.driver == "psycopg"


#: MySQL/MariaDB errors after which the server has undone the transaction's work (a deadlock:
#: ER_LOCK_DEADLOCK) or the statement's (ER_LOCK_WAIT_TIMEOUT, whose transaction the caller's
#: `with engine.begin()` then rolls back): the whole transaction may simply run again.
MYSQL_TRANSIENT = (1213, 1205)
#: PostgreSQL's (SQLSTATE): after any of them the transaction is aborted, its work undone, so
#: dbqueue's own may simply run again. psycopg raises them as OperationalError, which was
#: taken for an outage ("database unavailable") and an enqueue was not run again.
PG_TRANSIENT = {
    "40P01": "a deadlock",
    "55P03": "a lock wait timeout (lock_timeout)",
    "40001": "a serialization failure",
}
_MYSQL_DRIVERS = ("MySQLdb", "pymysql", "mariadb", "mysql", "asyncmy")  # aiomysql: pymysql's


#: MySQL/MariaDB server errors that mean the connection or the server went away (the client's
#: own, 2000-2999, are all of that kind): too many connections, shutdown in progress, the
#: connection killed or timed out by the server. Its drivers raise OperationalError for many
#: other errors too (a CHECK constraint, 4025), which are no outage.
_MYSQL_GONE = frozenset({1040, 1053, 1077, 1078, 1079, 1080, 1152, 1158, 1159, 1160, 1161})
_MYSQL_GONE_TOO = frozenset({1927, 4031})


def _mysql_code(exc: BaseException) -> int | None:
    """The server's error number of a MySQL driver's exception (None for other drivers)."""
    orig = getattr(exc, "orig", None)
    if orig is None or type(orig).__module__.split(".")[0] not in _MYSQL_DRIVERS:
        return None
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _pg_sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL driver's exception (psycopg, psycopg2, asyncpg)."""
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return state if isinstance(state, str) else None


def is_transient(exc: BaseException) -> bool:
    """Whether an exception is a lock conflict the database resolved by undoing this work
    (MySQL/MariaDB deadlock 1213, lock wait timeout 1205; PostgreSQL deadlock, lock_timeout,
    serialization failure): safe to retry where the caller runs the whole transaction again
    (the worker's claim, outcomes and heartbeats, an enqueue of dbqueue's own), never inside
    a transaction of the application's."""
    if not isinstance(exc, sa.exc.DBAPIError) or exc.connection_invalidated:
        return False
    code = _mysql_code(exc)
    if code is not None:
        return code in MYSQL_TRANSIENT
    return _pg_sqlstate(exc) in PG_TRANSIENT


def is_disconnect(exc: BaseException) -> bool:
    """Whether an exception means the connection or server went away (worth retrying)."""
    if is_transient(exc):
        return False  # a lock conflict, reported as OperationalError by MySQL's drivers
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        code = _mysql_code(exc)
        if code is not None and isinstance(exc, sa.exc.OperationalError):
            return 2000 <= code < 3000 or code in _MYSQL_GONE or code in _MYSQL_GONE_TOO
        return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError))
    return isinstance(exc, (ConnectionError, errors.DatabaseUnavailable))
