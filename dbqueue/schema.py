"""The tables, in SQLAlchemy Core: the one source the alembic migrations follow.

Owns table and index definitions, the status names and the database-clock expression
`db_now()`. It owns no statements: those live in `store.py` (and in `counters.py` and
`bus.py` for their own tables).
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import expression
from sqlalchemy.types import TypeDecorator

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class Status(str, enum.Enum):
    """A task's state (`Task.status`), stored as its value in `tasks.status`.

    `queued` (waiting, or scheduled when its run_at is in the future), `running` (claimed by a
    worker), then `succeeded`, `failed` (out of attempts, or never runnable) or `cancelled`,
    which are final until `dbqueue retry` queues a failed or cancelled task again. A `Status`
    is a `str`: `Status.SUCCEEDED == "succeeded"`.
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


STATUSES = tuple(s.value for s in Status)
FINISHED = (Status.SUCCEEDED.value, Status.FAILED.value, Status.CANCELLED.value)


def status_is(*statuses: str) -> sa.ColumnElement[bool]:
    """`tasks.status = 'queued'` (or `IN (...)`) with the statuses as SQL literals, never
    bound parameters.

    The partial indexes are defined on literal statuses, and a planner can only match a
    predicate it can see: once psycopg prepares a statement (its 6th run on a connection),
    PostgreSQL may switch to a generic plan in which `status = $1` matches no partial index,
    and the claim becomes a sequential scan and sort of the whole table (measured: 7 ms
    instead of 1.5 ms with 20,000 rows, growing with history). SQLite never uses a partial
    index for a parameterised term either.
    """
    unknown = set(statuses) - set(STATUSES)
    if unknown or not statuses:
        raise ValueError(f"unknown task status(es): {sorted(unknown)}")
    literals: list[sa.ColumnElement[Any]] = [
        sa.literal_column(f"'{Status(s).value}'") for s in statuses
    ]
    if len(literals) == 1:
        return tasks.c.status == literals[0]
    return tasks.c.status.in_(literals)


MYSQL = ("mysql", "mariadb")  # SQLAlchemy's dialect names for MySQL and MariaDB

#: Table options on MySQL/MariaDB: InnoDB (row locks, SKIP LOCKED), 4-byte UTF-8 throughout,
#: and binary comparison of text, as on PostgreSQL and SQLite ('Mail' is not 'mail').
MYSQL_TABLE: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}


def timestamp_type() -> sa.types.TypeEngine[Any]:
    """`timestamptz` on PostgreSQL; `DATETIME(6)` (UTC, microseconds) on MySQL/MariaDB."""
    return sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), *MYSQL)


def blob_type() -> sa.types.TypeEngine[Any]:
    """`bytea`/BLOB; `LONGBLOB` on MySQL/MariaDB, whose BLOB stops at 64 KiB."""
    return sa.LargeBinary().with_variant(mysql.LONGBLOB(), *MYSQL)


def long_text_type() -> sa.types.TypeEngine[Any]:
    """`text`; `LONGTEXT` on MySQL/MariaDB, whose TEXT stops at 64 KiB (tracebacks)."""
    return sa.Text().with_variant(mysql.LONGTEXT(), *MYSQL)


def double_type() -> sa.types.TypeEngine[Any]:
    """A double precision float: MySQL's FLOAT is single precision."""
    return sa.Float().with_variant(mysql.DOUBLE(asdecimal=False), *MYSQL)  # floats, not Decimal


#: Lengths that bind every engine, because MySQL/MariaDB's column (or an index's key size
#: there) cannot hold more: checked where the value is given, so that a longer one is refused
#: naming the limit instead of failing later with a driver error, or worse truncated.
BUS_TEXT_LENGTH = 300  # bus_subscriptions.matcher and .handler: VARCHAR in a unique key
PERIODIC_NAME_LENGTH = 300  # periodic_slots.name, the periodic function's handler
UNIQUE_KEY_BYTES = 65535  # tasks.unique_key: TEXT on MySQL/MariaDB, 64 KiB of UTF-8
ROW_ID_LENGTH = 200  # counter_deltas.row_id, a counted parent's primary key as text


def too_long(value: str, limit: int, unit: str = "characters") -> str | None:
    """'N characters, limit is L' when `value` is over `limit` (bytes: its UTF-8), else None."""
    size = len(value.encode()) if unit == "bytes" else len(value)
    return f"{size} {unit}, limit is {limit}" if size > limit else None


def key_text_type(length: int) -> sa.types.TypeEngine[Any]:
    """`text`, but `VARCHAR(length)` on MySQL/MariaDB for a column in a unique key (TEXT
    cannot be a key there without a prefix, and a prefix is not uniqueness)."""
    return sa.Text().with_variant(mysql.VARCHAR(length), *MYSQL)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware datetimes everywhere; stored as naive UTC text on SQLite and as naive
    UTC `DATETIME(6)` on MySQL/MariaDB.

    SQLite has no timestamp type; storing UTC in one fixed text format keeps comparisons
    with `db_now()` correct as plain string comparisons. MySQL's DATETIME has no time zone
    (its TIMESTAMP ends in 2038): every value in it is UTC, as `db_now()` is there.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in MYSQL:
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        if value.tzinfo is None:
            raise ValueError(
                f"naive datetime {value.isoformat()} is ambiguous; pass an aware datetime "
                "(for example datetime.now(timezone.utc))"
            )
        utc: dt.datetime = value.astimezone(dt.timezone.utc)
        if dialect.name == "sqlite" or dialect.name in MYSQL:
            return utc.replace(tzinfo=None)
        return utc

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # produced by db_now() on SQLite
            value = dt.datetime.fromisoformat(value)
        stamp: dt.datetime = value
        if stamp.tzinfo is None:
            return stamp.replace(tzinfo=dt.timezone.utc)
        return stamp.astimezone(dt.timezone.utc)


class db_now(expression.FunctionElement[dt.datetime]):
    """The database clock, optionally shifted by `seconds`; never the worker's clock.

    PostgreSQL uses `clock_timestamp()` rather than `now()`, which is frozen at the start of
    the transaction (a long transaction would otherwise stamp old times).
    """

    type = UTCDateTime()
    inherit_cache = True
    name = "db_now"

    def __init__(self, seconds: float | sa.ColumnElement[Any] | None = None) -> None:
        args: list[Any] = []
        if seconds is not None:
            args.append(
                seconds
                if isinstance(seconds, sa.ColumnElement)
                else sa.literal(float(seconds), sa.Float)
            )
        super().__init__(*args)


@compiles(db_now, "postgresql")
def _db_now_pg(element: db_now, compiler: Any, **kw: Any) -> str:
    args = list(element.clauses)
    if not args:
        return "clock_timestamp()"
    return f"(clock_timestamp() + make_interval(secs => {compiler.process(args[0], **kw)}))"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    args = list(element.clauses)
    if not args:
        return "strftime('%Y-%m-%d %H:%M:%f', 'now')"
    offset = compiler.process(args[0], **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', ({offset}) || ' seconds')"


@compiles(db_now, "mysql")
@compiles(db_now, "mariadb")
def _db_now_mysql(element: db_now, compiler: Any, **kw: Any) -> str:
    args = list(element.clauses)
    if not args:
        return "UTC_TIMESTAMP(6)"
    offset = compiler.process(args[0], **kw)
    return f"TIMESTAMPADD(MICROSECOND, ROUND(({offset}) * 1000000), UTC_TIMESTAMP(6))"


tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        sa.Identity(),
        primary_key=True,
    ),
    sa.Column("queue", sa.String(100), nullable=False, server_default="default"),
    sa.Column(
        "priority",
        sa.Integer,
        nullable=False,
        server_default="0",
        comment="lower runs first (delayed_job's rule)",
    ),
    sa.Column("run_at", UTCDateTime(), nullable=False, comment="not claimed before this time"),
    sa.Column("status", sa.String(16), nullable=False, server_default=Status.QUEUED.value),
    sa.Column(
        "handler", sa.Text, nullable=False, comment="module:qualname of the callable (signed)"
    ),
    sa.Column(
        "payload",
        blob_type(),
        nullable=False,
        comment="signed pickle of (callable reference, args, kwargs)",
    ),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False, server_default="25"),
    sa.Column(
        "timeout", double_type(), nullable=True, comment="seconds; null: the worker's default"
    ),
    sa.Column("locked_by", sa.String(200), nullable=True, comment="worker name holding the task"),
    sa.Column("locked_at", UTCDateTime(), nullable=True),
    sa.Column("result", blob_type(), nullable=True, comment="signed pickle of the return value"),
    sa.Column("exception", blob_type(), nullable=True, comment="signed pickle of the exception"),
    sa.Column(
        "error", long_text_type(), nullable=True, comment="exception, message and traceback as text"
    ),
    sa.Column("unique_key", sa.Text, nullable=True),
    sa.Column(
        "meta",
        sa.JSON(none_as_null=True),
        nullable=True,
        comment="small JSON dict (trace context, tenant): not pickled, not signed (migration 0006)",
    ),
    sa.Column(
        "snoozes",
        sa.Integer,
        nullable=False,
        server_default="0",
        comment="times the task put itself back with Snooze (no attempt spent)",
    ),
    sa.Column(
        "cancel_requested_at",
        UTCDateTime(),
        nullable=True,
        comment="Task.cancel() of a running task: its worker raises TaskCancelled in it",
    ),
    sa.Column(
        "concurrency_key",
        sa.Text,
        nullable=True,
        comment="tasks sharing a key run at most max_concurrency at once, fleet-wide",
    ),
    sa.Column("max_concurrency", sa.Integer, nullable=True, comment="limit for concurrency_key"),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=True),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.CheckConstraint(f"status IN {STATUSES!r}", name="status_known"),
    sa.CheckConstraint("attempts >= 0 AND max_attempts >= 1", name="attempts_valid"),
    sa.CheckConstraint("length(queue) > 0", name="queue_not_empty"),
    # Never hand out an id twice on SQLite (pruned or rolled-back ids would be reused, and a
    # stored task id would then name another task); PostgreSQL identities never go back.
    sqlite_autoincrement=True,
    **MYSQL_TABLE,
)

_PARTIAL: list[sa.Index] = []  # PostgreSQL and SQLite: partial indexes
# The claim of a worker serving every queue reads exactly these rows in exactly this order;
# finished rows never enter the index, so a table full of history does not slow the claim.
_PARTIAL.append(
    sa.Index(
        "ix_tasks_claimable",
        tasks.c.priority,
        tasks.c.run_at,
        tasks.c.id,
        postgresql_where=tasks.c.status == Status.QUEUED.value,
        sqlite_where=tasks.c.status == Status.QUEUED.value,
    )
)
# The same per queue, for workers given queues (`-q`): a claim for `mail` reads `mail`'s rows
# only, however large another queue's backlog (migration 0005). Queue counts, the idle
# worker's next run_at and the dashboard's queued figures read it too.
_PARTIAL.append(
    sa.Index(
        "ix_tasks_queue_claimable",
        tasks.c.queue,
        tasks.c.priority,
        tasks.c.run_at,
        tasks.c.id,
        postgresql_where=tasks.c.status == Status.QUEUED.value,
        sqlite_where=tasks.c.status == Status.QUEUED.value,
    )
)
# At most one queued-or-running task per unique_key.
_PARTIAL.append(
    sa.Index(
        "ix_tasks_unique_key",
        tasks.c.unique_key,
        unique=True,
        postgresql_where=sa.and_(
            tasks.c.unique_key.is_not(None), tasks.c.status.in_(("queued", "running"))
        ),
        sqlite_where=sa.and_(
            tasks.c.unique_key.is_not(None), tasks.c.status.in_(("queued", "running"))
        ),
    )
)
# Rescue and the dashboard look up running tasks by owner.
_PARTIAL.append(
    sa.Index(
        "ix_tasks_running",
        tasks.c.locked_by,
        postgresql_where=tasks.c.status == Status.RUNNING.value,
        sqlite_where=tasks.c.status == Status.RUNNING.value,
    )
)
# Concurrency limits (limits.py, migration 0008): the running rows of a key, counted by the
# limited claim for each candidate with a key; and the queued rows with a key, which the
# worker's heart probes every second to choose between the unlimited and the limited claim.
# Rows without a key enter neither, so tasks without limits pay nothing for them.
_PARTIAL.append(
    sa.Index(
        "ix_tasks_concurrency_running",
        tasks.c.concurrency_key,
        postgresql_where=sa.and_(tasks.c.status == "running", tasks.c.concurrency_key.is_not(None)),
        sqlite_where=sa.and_(tasks.c.status == "running", tasks.c.concurrency_key.is_not(None)),
    )
)
_PARTIAL.append(
    sa.Index(
        "ix_tasks_concurrency_queued",
        tasks.c.queue,
        postgresql_where=sa.and_(tasks.c.status == "queued", tasks.c.concurrency_key.is_not(None)),
        sqlite_where=sa.and_(tasks.c.status == "queued", tasks.c.concurrency_key.is_not(None)),
    )
)
# Pruning and the dashboard walk finished rows by age. Finished rows only: a claim
# (queued -> running) then writes no entry here (migration 0003).
_PARTIAL.append(
    sa.Index(
        "ix_tasks_finished",
        tasks.c.status,
        tasks.c.finished_at,
        postgresql_where=tasks.c.status.in_(FINISHED),
        sqlite_where=tasks.c.status.in_(FINISHED),
    )
)

for _index in _PARTIAL:
    _index.ddl_if(dialect=("postgresql", "sqlite"))  # type: ignore[arg-type]

# MySQL and MariaDB have no partial indexes: the same names, with `status` leading, so that a
# claim reads the queued rows of its queue in claim order and no other (tests/
# test_mysql_engine.py reads the plan). Finished rows do enter them, one entry each.
# ix_tasks_concurrency_running is not among them (migration 0009): there it would be the
# leading columns of ix_tasks_concurrency_queued, which serves its lookups as well.
# At most one queued-or-running task per unique_key: `unique_live`, a stored generated column
# that is the key's SHA-256 while the task is unfinished and NULL after (NULLs never collide),
# is made by the migrations on MySQL only and is not in this metadata (engines/mysql.py).
UNIQUE_LIVE = "unique_live"
UNIQUE_LIVE_SQL = "IF(status IN ('queued', 'running'), SHA2(unique_key, 256), NULL)"
KEY_PREFIX = 191  # characters of a TEXT column a MySQL index holds (concurrency_key)
MYSQL_INDEXES = {
    "ix_tasks_claimable": ["status", "priority", "run_at", "id"],
    "ix_tasks_queue_claimable": ["status", "queue", "priority", "run_at", "id"],
    "ix_tasks_running": ["status", "locked_by"],
    "ix_tasks_concurrency_queued": ["status", "concurrency_key", "queue"],
    "ix_tasks_finished": ["status", "finished_at"],
}
for _name, _columns in MYSQL_INDEXES.items():
    sa.Index(
        _name,
        *(tasks.c[c] for c in _columns),
        mysql_length={"concurrency_key": KEY_PREFIX} if "concurrency_key" in _columns else None,
    ).ddl_if(dialect=MYSQL)  # type: ignore[arg-type]  # a tuple works

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True, comment="host:pid:random"),
    sa.Column("hostname", sa.String(200), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column(
        "host_id",
        sa.String(300),
        nullable=True,
        comment="hostname/boot id/pid namespace: who may probe this pid (migration 0004)",
    ),
    sa.Column("queues", sa.Text, nullable=True, comment="comma-separated; null: every queue"),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
    **MYSQL_TABLE,
)

counter_deltas = sa.Table(
    "counter_deltas",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        sa.Identity(),
        primary_key=True,
    ),
    sa.Column("table_name", sa.String(200), nullable=False),
    sa.Column(
        "row_id", sa.String(ROW_ID_LENGTH), nullable=False, comment="parent primary key, as text"
    ),
    sa.Column("column_name", sa.String(200), nullable=False),
    sa.Column("delta", sa.BigInteger, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    **MYSQL_TABLE,
)
sa.Index(
    "ix_counter_deltas_parent",
    counter_deltas.c.table_name,
    counter_deltas.c.row_id,
    counter_deltas.c.column_name,
)

bus_subscriptions = sa.Table(
    "bus_subscriptions",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        sa.Identity(),
        primary_key=True,
    ),
    sa.Column("app_key", sa.String(100), nullable=False),
    sa.Column("queue", sa.String(100), nullable=False),
    sa.Column(
        "matcher",
        key_text_type(BUS_TEXT_LENGTH),
        nullable=False,
        comment="event name, or a regex pattern",
    ),
    sa.Column("is_regex", sa.Boolean, nullable=False),
    sa.Column("handler", key_text_type(BUS_TEXT_LENGTH), nullable=False, comment="module:qualname"),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.UniqueConstraint("app_key", "matcher", "is_regex", "handler"),
    **MYSQL_TABLE,
)

periodic_slots = sa.Table(
    "periodic_slots",
    metadata,
    sa.Column(
        "name",
        sa.String(PERIODIC_NAME_LENGTH),
        primary_key=True,
        comment="the periodic task's handler",
    ),
    sa.Column(
        "last_slot",
        UTCDateTime(),
        nullable=False,
        comment="latest slot enqueued (first seen: the slot current then, not enqueued)",
    ),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    **MYSQL_TABLE,
)

queue_settings = sa.Table(
    "queue_settings",
    metadata,
    sa.Column("queue", sa.String(100), primary_key=True),
    sa.Column(
        "paused",
        sa.Boolean,
        nullable=False,
        server_default=sa.false(),
        comment="workers claim nothing of a paused queue; enqueueing still works",
    ),
    sa.Column(
        "max_concurrency",
        sa.Integer,
        nullable=True,
        comment="at most this many of the queue's tasks run at once, fleet-wide; null: no cap",
    ),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    **MYSQL_TABLE,
)
