"""Every SQL statement on `tasks` and `workers`: one function per state transition.

    insert    (new)              -> queued
    claim     queued             -> running    (SKIP LOCKED on PostgreSQL,
                                                BEGIN IMMEDIATE on SQLite)
    complete  running            -> succeeded
    retry     running            -> queued     (run_at = now + backoff)
    fail      running            -> failed
    release   running            -> queued     (claimed but never started: graceful shutdown)
    release_unique_key  running  -> running    (unique_key dropped: the counter flush)
    rescue    running (dead/expired worker) -> queued, or failed when out of attempts
    cancel    queued             -> cancelled
    requeue   failed/cancelled   -> queued     (`dbqueue retry`, the dashboard)
    clear     queued             -> (deleted)
    prune     finished, old      -> (deleted)

Every write that ends a run is fenced on (id, status='running', locked_by, attempts) and its
row count is checked, so a worker presumed dead cannot overwrite the run that replaced it.
Every time comes from the database clock (`schema.db_now`). Callers own the transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import operator
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.compiler import compiles

from dbqueue import database, limits
from dbqueue.schema import FINISHED, Status, UTCDateTime, db_now, status_is, tasks, workers

log = logging.getLogger("dbqueue.store")

NOTIFY_CHANNEL = "dbqueue"
NOTIFY_MIN_INTERVAL = 0.005  # seconds between NOTIFYs for one queue from one process

CLAIM_COLUMNS = (
    tasks.c.id,
    tasks.c.queue,
    tasks.c.priority,
    tasks.c.run_at,
    tasks.c.handler,
    tasks.c.payload,
    tasks.c.attempts,
    tasks.c.max_attempts,
    tasks.c.timeout,
    tasks.c.meta,
)


@dataclasses.dataclass(slots=True)
class NewTask:
    """One row to insert. `run_at` absolute, or `delay` seconds from the database's now."""

    handler: str
    payload: bytes
    queue: str = "default"
    priority: int = 0
    run_at: dt.datetime | None = None
    delay: float = 0.0
    max_attempts: int = 25
    timeout: float | None = None
    unique_key: str | None = None
    meta: dict[str, Any] | None = None
    concurrency_key: str | None = None  # with max_concurrency: see limits.py
    max_concurrency: int | None = None


@dataclasses.dataclass
class Outcome:
    """How one run ended, as the worker records it. `status` is the new status."""

    id: int
    attempts: int
    status: Status
    result: bytes | None = None
    exception: bytes | None = None
    error: str | None = None
    retry_in: float = 0.0
    snooze: bool = False  # QUEUED again without spending the attempt (Snooze)


def _insert_values(task: NewTask) -> dict[str, Any]:
    return {
        "queue": task.queue,
        "priority": task.priority,
        "run_at_abs": task.run_at,
        "delay_s": float(task.delay),
        "handler": task.handler,
        "payload": task.payload,
        "max_attempts": task.max_attempts,
        "timeout": task.timeout,
        "unique_key": task.unique_key,
        "meta": task.meta,
        "concurrency_key": task.concurrency_key,
        "max_concurrency": task.max_concurrency,
    }


def _insert_statement() -> Any:
    return {
        "queue": sa.bindparam("queue"),
        "priority": sa.bindparam("priority"),
        "run_at": sa.func.coalesce(
            sa.bindparam("run_at_abs", type_=tasks.c.run_at.type), db_now(sa.bindparam("delay_s"))
        ),
        "status": Status.QUEUED.value,
        "handler": sa.bindparam("handler"),
        "payload": sa.bindparam("payload", type_=sa.LargeBinary),
        "attempts": 0,
        "max_attempts": sa.bindparam("max_attempts"),
        "timeout": sa.bindparam("timeout", type_=sa.Float),
        "unique_key": sa.bindparam("unique_key", type_=sa.Text),
        "meta": sa.bindparam("meta", type_=tasks.c.meta.type),
        "concurrency_key": sa.bindparam("concurrency_key", type_=sa.Text),
        "max_concurrency": sa.bindparam("max_concurrency", type_=sa.Integer),
        "created_at": db_now(),
    }


@functools.lru_cache(maxsize=256)
def _insert_one_statement(notify_queue: str | None) -> Any:
    """The one-row INSERT, built once (per queue when it carries its NOTIFY): building it
    and its cache key on every enqueue cost more client time than the round trip."""
    stmt = sa.insert(tasks).values(_insert_statement()).returning(tasks.c.id)
    if notify_queue is not None:
        stmt = stmt.returning(_notify_column(notify_queue))
    return stmt


@functools.lru_cache(maxsize=256)
def _driver_sql(
    statement: Any, dialect: sa.Dialect
) -> tuple[str, dict[str, Any], tuple[tuple[str, Callable[[Any], Any]], ...]]:
    """A statement built once, compiled once for the driver's cursor: its SQL, its fixed
    parameters and SQLAlchemy's bind processors. (An expanding IN would need SQLAlchemy's
    execution path: list its values as separate parameters, as the claim does.)"""
    compiled = statement.compile(dialect=dialect)
    processors = tuple(
        (name, proc)
        for name, proc in compiled._bind_processors.items()  # SQLAlchemy's own type coercions
        if isinstance(name, str)
        and proc is not None
        # bytes go as they are: psycopg's C dumper sends them in binary, where the processor
        # would wrap them in psycopg.Binary, whose dumper is Python code run per statement
        and not isinstance(compiled.binds[name].type, sa.LargeBinary)
    )
    return str(compiled), dict(compiled.params), processors


def _driver_params(
    statement: Any, dialect: sa.Dialect, values: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """(SQL, parameters) to send `statement` with `values` through the driver's cursor."""
    sql, fixed, processors = _driver_sql(statement, dialect)
    params = {**fixed, **values}
    for name, process in processors:
        params[name] = process(params[name])
    return sql, params


def insert_one_autocommit(engine: sa.Engine, task: NewTask, *, notify: bool = True) -> int:
    """Store one task in a statement of its own on PostgreSQL (autocommit); returns its id.

    The statement is SQLAlchemy's (`_insert_one_statement`, compiled once) but it goes to the
    driver's cursor of a pooled connection directly: measured after a 20 ms pause, as an
    enqueue from a web request is, SQLAlchemy's execution path around a cached statement
    (connection branch, isolation switch and reset, execution context, result object) cost
    about as much client time as the round trip itself. Connection events (checkout pings)
    still run; cursor-level events (`before_cursor_execute`) do not see this statement.
    """
    inline = notify and _notify_inline_pg(task)
    statement = _insert_one_statement(task.queue if inline else None)
    sql, params = _driver_params(statement, engine.dialect, _insert_values(task))
    error = engine.dialect.loaded_dbapi.Error
    try:
        pooled = engine.raw_connection()
    except error as exc:  # the pool hands out the driver's own connect error
        raise _driver_error(engine.dialect, sql, params, exc, invalidated=True) from exc
    try:
        driver: Any = pooled.dbapi_connection  # a psycopg.Connection
        transactional = not driver.autocommit  # an Engine made with AUTOCOMMIT stays so
        driver.autocommit = True
        try:
            with driver.cursor() as cursor:
                cursor.execute(sql, params)  # prepared as the connection says (PgBouncer)
                row = cursor.fetchone()
        finally:
            if transactional:
                driver.autocommit = False
    except error as exc:
        invalidated = engine.dialect.is_disconnect(exc, driver, None)
        if invalidated:
            pooled.invalidate(exc)
        raise _driver_error(engine.dialect, sql, params, exc, invalidated) from exc
    finally:
        pooled.close()
    assert row is not None
    return int(row[0])


def _driver_error(
    dialect: sa.Dialect, sql: str, params: dict[str, Any], exc: Exception, invalidated: bool
) -> sa.exc.StatementError:
    """A driver error as SQLAlchemy would have wrapped it (database.errors_translated and
    database.is_disconnect read those)."""
    return sa.exc.DBAPIError.instance(
        sql,
        params,
        exc,
        dialect.loaded_dbapi.Error,
        connection_invalidated=invalidated,
        dialect=dialect,
    )


@functools.lru_cache(maxsize=1)
def _insert_statement_many() -> Any:
    """Several rows in one executemany, ids in parameter order (SQLite; PostgreSQL for
    tasks that carry meta, which the unnest statements leave out to stay lean)."""
    return (
        sa.insert(tasks)
        .values(_insert_statement())
        .returning(tasks.c.id, sort_by_parameter_order=True)
    )


def insert(
    conn: sa.Connection, new: Sequence[NewTask], *, replace: bool = False, notify: bool = True
) -> list[int]:
    """Insert tasks (queued); returns their ids in order, in one round trip when none is unique.

    A task whose `unique_key` is already queued or running is not inserted: its id is the
    existing task's, whose arguments and run_at are replaced when `replace` is true and it has
    not started.
    """
    if not new:
        return []
    ids: list[int]
    if (
        len(new) > 1
        and conn.dialect.name == "postgresql"
        and all(t.unique_key is None and t.meta is None and t.concurrency_key is None for t in new)
    ):
        ids = _insert_many_pg(conn, new)
    elif len(new) == 1 and new[0].unique_key is None:
        inline = notify and _notify_inline(conn, new[0])
        notify = False  # carried by this statement, or not due (the limiter said so)
        stmt = _insert_one_statement(new[0].queue if inline else None)
        ids = [conn.execute(stmt, _insert_values(new[0])).scalar_one()]
    elif all(t.unique_key is None for t in new):
        stmt = _insert_statement_many()
        ids = [r[0] for r in conn.execute(stmt, [_insert_values(t) for t in new])]
    else:
        values = _insert_statement()
        ids = [_insert_unique(conn, t, values, replace) for t in new]
    if notify:
        notify_queues(conn, {t.queue for t in new if t.run_at is None and t.delay <= 0})
    return ids


_INSERT_MANY_PG = sa.text(
    """
    WITH inserted AS (
        INSERT INTO tasks (queue, priority, run_at, status, handler, payload, attempts,
                           max_attempts, timeout, created_at)
        SELECT n.queue, n.priority,
               coalesce(n.run_at, clock_timestamp() + make_interval(secs => n.delay)),
               'queued', n.handler, n.payload, 0, n.max_attempts, n.timeout, clock_timestamp()
        FROM unnest(CAST(:queues AS text[]), CAST(:priorities AS int[]),
                    CAST(:run_ats AS timestamptz[]), CAST(:delays AS float8[]),
                    CAST(:handlers AS text[]), CAST(:payloads AS bytea[]),
                    CAST(:max_attempts AS int[]), CAST(:timeouts AS float8[]))
             WITH ORDINALITY AS n(queue, priority, run_at, delay, handler, payload,
                                  max_attempts, timeout, position)
        ORDER BY n.position
        RETURNING id
    )
    SELECT array_agg(id ORDER BY id) FROM inserted
    """
)

# enqueue_many's batches: one function with one set of options, so only the payloads
# differ; the rest goes once as scalars (dumping seven arrays of one repeated value was
# half of the client's time per batch, measured).
_INSERT_MANY_UNIFORM_PG = sa.text(
    """
    WITH inserted AS (
        INSERT INTO tasks (queue, priority, run_at, status, handler, payload, attempts,
                           max_attempts, timeout, created_at)
        SELECT CAST(:queue AS text), CAST(:priority AS int),
               coalesce(CAST(:run_at AS timestamptz),
                        clock_timestamp() + make_interval(secs => CAST(:delay AS float8))),
               'queued', CAST(:handler AS text), n.payload, 0, CAST(:max_attempts AS int),
               CAST(:timeout AS float8), clock_timestamp()
        FROM unnest(CAST(:payloads AS bytea[])) WITH ORDINALITY AS n(payload, position)
        ORDER BY n.position
        RETURNING id
    )
    SELECT array_agg(id ORDER BY id) FROM inserted
    """
)


class _BinaryArray(list):  # type: ignore[type-arg]
    """A list psycopg sends as a binary array (see `_binary_array`)."""


def _binary_array(conn: sa.Connection, values: list[Any]) -> list[Any]:
    """`values` (bytes or ints) as a parameter psycopg sends in binary: as text, every
    element of an array is checked, and a bytea one escaped and quoted, by a regular
    expression in Python (measured: 4.9 ms for 1,000 payloads of 100 bytes, 0.3 ms in
    binary). psycopg picks a list's format by its class, so the list is re-classed and this
    connection told to dump that class in binary; SQLAlchemy still runs the statement.
    Other drivers get the plain list."""
    if not database.is_psycopg(conn) or all(v is None for v in values):
        return values  # an all-NULL array has no element type to send in binary
    from psycopg.adapt import PyFormat
    from psycopg.types.array import ListBinaryDumper

    adapters = conn.connection.driver_connection.adapters  # type: ignore[union-attr]
    if adapters.get_dumper(_BinaryArray, PyFormat.AUTO) is not ListBinaryDumper:
        adapters.register_dumper(_BinaryArray, ListBinaryDumper)  # once per connection
    return _BinaryArray(values)


def _uniform(task: NewTask) -> tuple[Any, ...]:
    return (
        task.queue,
        task.priority,
        task.run_at,
        task.delay,
        task.handler,
        task.max_attempts,
        task.timeout,
    )


def _insert_many_pg(conn: sa.Connection, new: Sequence[NewTask]) -> list[int]:
    """(new) -> queued for many tasks in one short statement: the payloads as an array, the
    other columns as scalars when every task shares them, else one array per column.

    insertmanyvalues would send a statement with 9 placeholders per row that psycopg parses
    anew for every batch (most of enqueue_many's time, measured); this text is the same for
    every batch, so it is parsed once and prepared. Identities are drawn in `position` order,
    so the sorted ids are the tasks' ids in order; they come back as one array, not a row each.
    """
    utc = dt.timezone.utc
    first = new[0]
    statement: Any
    if all(_uniform(t) == _uniform(first) for t in new):
        statement = _INSERT_MANY_UNIFORM_PG
        params: dict[str, Any] = {
            "queue": first.queue,
            "priority": first.priority,
            "run_at": first.run_at.astimezone(utc) if first.run_at else None,
            "delay": float(first.delay),
            "handler": first.handler,
            "max_attempts": first.max_attempts,
            "timeout": first.timeout,
            "payloads": _binary_array(conn, [t.payload for t in new]),
        }
    else:
        statement = _INSERT_MANY_PG
        params = {
            "queues": [t.queue for t in new],
            "priorities": [t.priority for t in new],
            "run_ats": [t.run_at.astimezone(utc) if t.run_at else None for t in new],
            "delays": [float(t.delay) for t in new],
            "handlers": [t.handler for t in new],
            "payloads": _binary_array(conn, [t.payload for t in new]),
            "max_attempts": [t.max_attempts for t in new],
            "timeouts": [t.timeout for t in new],
        }
    return list(conn.execute(statement, params).scalar_one())


def _insert_unique(conn: sa.Connection, task: NewTask, values: Any, replace: bool) -> int:
    if task.unique_key is None:
        row = conn.execute(
            sa.insert(tasks).values(values).returning(tasks.c.id), _insert_values(task)
        ).scalar_one()
        return int(row)
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = (
        dialect_insert(tasks)
        .values(values)
        .on_conflict_do_nothing(
            index_elements=[tasks.c.unique_key],
            # Literal statuses (status_is): a prepared statement's generic plan could not
            # match a parameterised predicate to the partial index ("no unique or exclusion
            # constraint matching the ON CONFLICT specification").
            index_where=sa.and_(
                tasks.c.unique_key.is_not(None), status_is(Status.QUEUED, Status.RUNNING)
            ),
        )
        .returning(tasks.c.id)
    )
    inserted = conn.execute(stmt, _insert_values(task)).scalar_one_or_none()
    if inserted is not None:
        return int(inserted)
    existing = conn.execute(
        sa.select(tasks.c.id, tasks.c.status).where(
            tasks.c.unique_key == task.unique_key,
            status_is(Status.QUEUED, Status.RUNNING),
        )
    ).one_or_none()
    if existing is None:  # finished between our insert and select: try once more
        return _insert_unique(conn, task, values, replace)
    if replace and existing.status == Status.QUEUED.value:
        conn.execute(
            sa.update(tasks)
            .where(tasks.c.id == existing.id, status_is(Status.QUEUED))
            .values(
                payload=task.payload,
                handler=task.handler,
                priority=task.priority,
                queue=task.queue,
                max_attempts=task.max_attempts,
                timeout=task.timeout,
                concurrency_key=task.concurrency_key,
                max_concurrency=task.max_concurrency,
                run_at=sa.func.coalesce(
                    sa.literal(task.run_at, tasks.c.run_at.type), db_now(task.delay)
                ),
            )
        )
    return int(existing.id)


class _NotifyLimiter:
    """At most one NOTIFY per queue per interval from this process.

    NOTIFY takes a database-wide lock at commit, so a burst of enqueues must not send one
    each; workers woken by the first find the rest, and polling covers any gap.
    """

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def due(self, queue: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(queue, -1.0) < NOTIFY_MIN_INTERVAL:
                return False
            self._last[queue] = now
            return True


_limiter = _NotifyLimiter()


def _notify_inline(conn: sa.Connection, task: NewTask) -> bool:
    """Whether this one-row insert should carry its NOTIFY (PostgreSQL, ready now, due)."""
    return conn.dialect.name == "postgresql" and _notify_inline_pg(task)


def _notify_inline_pg(task: NewTask) -> bool:
    return task.run_at is None and task.delay <= 0 and _limiter.due(task.queue)


def _notify_column(queue: str) -> Any:
    """`(SELECT pg_notify(channel, queue))` for RETURNING: an InitPlan, run once per statement,
    so the insert and its NOTIFY travel in one round trip."""
    return sa.select(sa.func.pg_notify(sa.literal(NOTIFY_CHANNEL), sa.literal(queue))).label(
        "notified"
    )


def notify_queues(conn: sa.Connection, queues: Iterable[str]) -> None:
    """Wake listening workers (PostgreSQL only); the payload is the queue name alone.

    One round trip however many queues are due (a bus publish fans out to many).
    """
    if conn.dialect.name != "postgresql":
        return
    due = sorted(q for q in set(queues) if _limiter.due(q))
    if due:
        conn.execute(sa.select(*(sa.func.pg_notify(NOTIFY_CHANNEL, q) for q in due)))


def claim(
    conn: sa.Connection,
    worker: str,
    limit: int,
    queues: Sequence[str] | None = None,
    *,
    registered: bool = False,
    exclude: Sequence[str] = (),
    limited: bool = False,
) -> list[Any]:
    """queued -> running for up to `limit` ready tasks, lowest priority value first; rows
    with CLAIM_COLUMNS' names as attributes, in claim order.

    `limited`: the claim that honours concurrency limits (limits.py): every kind of row, a
    row with a key or of a capped queue only while its key and queue have a free slot. On
    PostgreSQL it first takes the limited claims' advisory lock, so `conn` must be in a
    transaction (not autocommit), which the caller commits at once. Without it, the claim
    takes only rows without a key; capped queues are the caller's to leave out (`queues`,
    `exclude`), as paused ones are.

    `registered`: claim only while `worker` has its row in `workers` (the worker loop's
    claims). A worker presumed dead has lost its row to another worker's rescue; claiming
    anyway, it would start tasks that the next rescue returns to the queue as orphaned, and
    they would run twice. On PostgreSQL the row is read `FOR KEY SHARE`, so a rescue deleting
    it waits for this claim to commit and then sees (and returns) what it took.

    `exclude`: queues not to claim from when `queues` is None (the paused ones). A worker
    given queues drops paused ones from its list instead, which keeps its index reads exact.

    PostgreSQL: the candidate ids are locked `FOR UPDATE SKIP LOCKED` inside a MATERIALIZED CTE:
    without the fence the planner may re-run the LIMITed subquery in a nested loop and update
    more rows than the limit (Oban learned this). SKIP LOCKED lets concurrent workers take
    disjoint batches instead of queueing on each other's locks
    (https://www.postgresql.org/docs/current/sql-select.html#SQL-FOR-UPDATE-SHARE).
    SQLite: the caller's transaction began with BEGIN IMMEDIATE, so one claimer at a time.
    """
    postgresql = conn.dialect.name == "postgresql"
    stmt = _claim_statement(
        tuple(queues) if queues else None, postgresql, registered, tuple(sorted(exclude)), limited
    )
    if limited and postgresql:
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            raise ValueError("a limited claim needs a transaction: the lock ends with it")
        conn.execute(_LIMITS_LOCK, {"lock_key": limits.CLAIM_LOCK})
    values = {"claim_limit": limit, "claim_worker": worker}
    rows: list[Any]
    if database.is_psycopg(conn):
        rows = _claim_on_driver(conn, stmt, values)
    else:
        rows = list(conn.execute(stmt, values).all())
    rows.sort(key=_CLAIM_ORDER)  # RETURNING comes in no particular order
    return rows


def _claim_on_driver(conn: sa.Connection, stmt: Any, values: dict[str, Any]) -> list[Any]:
    """The claim sent to the driver's cursor of `conn` (autocommit for the worker; inside
    the caller's transaction otherwise). Measured on an idle worker woken by a NOTIFY: 1.03
    -> 0.75 ms per claim, a tenth of the enqueue-to-start latency; SQLAlchemy's execution
    path around a statement it had already compiled was the difference.

    It does what SQLAlchemy's execute would around it: begins `conn`'s transaction when none
    is (its autobegin; else the caller's commit() would find nothing to commit while psycopg
    held the claim in a transaction of its own, rolled back at close), and invalidates a
    broken connection. Rows are psycopg named tuples with CLAIM_COLUMNS' names, read by
    attribute; their run_at is in the session's time zone (only sorted here). Cursor-level
    events do not see the claim."""
    from psycopg.rows import namedtuple_row

    if not conn.in_transaction():
        conn.begin()
    sql, params = _driver_params(stmt, conn.dialect, values)
    driver: Any = conn.connection.driver_connection
    error = conn.dialect.loaded_dbapi.Error
    try:
        with driver.cursor(row_factory=namedtuple_row) as cursor:
            cursor.execute(sql, params)
            rows: list[Any] = cursor.fetchall()
            return rows
    except error as exc:
        invalidated = conn.dialect.is_disconnect(exc, driver, None)
        if invalidated:
            conn.invalidate(exc)
        raise _driver_error(conn.dialect, sql, params, exc, invalidated) from exc


_CLAIM_ORDER = operator.itemgetter(2, 3, 0)  # priority, run_at, id in CLAIM_COLUMNS
_LIMITS_LOCK = sa.text("SELECT pg_advisory_xact_lock(:lock_key)")  # see limits.py


@functools.lru_cache(maxsize=32)
def _claim_statement(
    queues: tuple[str, ...] | None,
    postgresql: bool,
    registered: bool = False,
    exclude: tuple[str, ...] = (),
    limited: bool = False,
) -> Any:
    """The claim, built once per set of queues: building the construct and its cache key on
    every call cost more client time than the database spent running it (measured: 1.6 ms
    of 2.3 ms per claim of 100).

    Which rows it reads is `_claimable`'s business (the one place to port to another
    engine); this wraps them in the fence and the UPDATE.

    PostgreSQL: the claim's own transaction commits without waiting for its WAL to reach the
    disk (`synchronous_commit` off for that transaction alone, set by an InitPlan that runs
    once before any row is read). A claim lost in a crash of the server returns its tasks to
    `queued`, as if never claimed: delivery is at-least-once anyway, the outcome write of
    the run is fenced (it finds the row no longer ours and says so), and every outcome and
    enqueue still waits for its flush, which also makes every earlier claim durable. It
    saves a disk flush per batch (measured: about a tenth of a drain's time).
    """
    candidates = _claimable(queues, sa.bindparam("claim_limit", type_=sa.Integer), exclude, limited)
    if postgresql:
        relaxed = sa.select(
            sa.func.set_config(
                sa.literal_column("'synchronous_commit'"),
                sa.literal_column("'off'"),
                sa.true(),
            )
        ).scalar_subquery()
        candidates = candidates.where(relaxed == sa.literal_column("'off'"))
    if registered:  # an uncorrelated EXISTS: one InitPlan, run once per claim
        own_row: sa.Select[Any] = (
            sa.select(sa.literal_column("1"))
            .select_from(workers)
            .where(workers.c.name == sa.bindparam("claim_worker", type_=sa.String))
        )
        if postgresql:
            own_row = own_row.with_for_update(read=True, key_share=True)
        candidates = candidates.where(own_row.exists())
    fenced = candidates.cte("claimable").prefix_with("MATERIALIZED", dialect="postgresql")
    claimed: Any
    if postgresql:
        # `id = ANY(ARRAY(SELECT id FROM claimable))`: the ids as one value, looked up in the
        # primary key. With `id IN (SELECT ...)` the generic plan of the prepared claim,
        # which cannot know the LIMIT, hash-joined the ids to a sequential scan of the
        # whole table whenever the table was small (measured on 10,000 rows: 1.9 ms against
        # 0.53 ms per claim; tests/test_claim_plan.py).
        claimed = tasks.c.id == sa.any_(sa.func.array(sa.select(fenced.c.id).scalar_subquery()))
    else:
        claimed = tasks.c.id.in_(sa.select(fenced.c.id))
    now = db_now()
    return (
        sa.update(tasks)
        .where(claimed)
        .values(
            status=Status.RUNNING.value,
            locked_by=sa.bindparam("claim_worker", type_=sa.String),
            locked_at=now,
            started_at=now,
            attempts=tasks.c.attempts + 1,
        )
        .returning(*CLAIM_COLUMNS)
    )


def _claimable(
    queues: tuple[str, ...] | None,
    limit: Any,
    exclude: tuple[str, ...] = (),
    limited: bool = False,
) -> sa.Select[Any]:
    """SELECT the ids of up to `limit` ready tasks of `queues` (None: every queue) in claim
    order (priority, run_at, id), locked `FOR UPDATE SKIP LOCKED` where the engine has it.

    Each queue's rows are read through an index that holds queued rows only: every queue,
    `ix_tasks_claimable (priority, run_at, id)`; one queue, `ix_tasks_queue_claimable
    (queue, priority, run_at, id)` from `queue = :q`, so another queue's backlog is never
    read (it was: a claim for an empty queue beside 200,000 rows of another took 76 ms).
    Several queues: one such read per queue, each LIMITed, merged in claim order and
    LIMITed again. `queue IN (...)` would read every row of the listed queues and sort
    them. The price: a claim of n over k queues locks up to k*n rows while its statement
    runs; those it does not take are free again at its commit (the worker's claim commits
    at once), and meanwhile another worker skips them. Queue names are parameters, one
    each, never an expanding list (see _driver_sql).

    Concurrency limits (limits.py): the unlimited claim reads the same rows and leaves out
    those with a key; the limited one keeps the rows that `limits.fits` and then
    `limits.trimmed` of the locked candidates.
    """
    columns: tuple[Any, ...] = (tasks.c.id, tasks.c.priority, tasks.c.run_at)
    if limited:
        columns += (tasks.c.queue, tasks.c.concurrency_key, limits.capped())

    def ready(queue: str | None) -> sa.Select[Any]:
        stmt = (
            sa.select(*columns)
            .where(
                status_is(Status.QUEUED),
                tasks.c.run_at <= db_now(),
                limits.fits(queue) if limited else limits.free_of_limits(),
            )
            .order_by(tasks.c.priority, tasks.c.run_at, tasks.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        if queue is None:
            if exclude:  # paused queues: their ready rows are read and skipped (docs/operations)
                stmt = stmt.where(tasks.c.queue.not_in([sa.literal(q) for q in exclude]))
            return stmt
        # SQLite's planner, once ANALYZE has run, may prefer walking ix_tasks_claimable in
        # order and filtering by queue (measured: every row of a 100,000-row backlog)
        return stmt.where(tasks.c.queue == sa.literal(queue)).with_hint(
            tasks, "INDEXED BY ix_tasks_queue_claimable", "sqlite"
        )

    if queues is None or len(queues) == 1:
        only = ready(queues[0] if queues else None)
        if limited:
            return limits.trimmed(only.subquery("candidates"), limit)
        return only.with_only_columns(tasks.c.id)
    per_queue = [ready(q).subquery(f"ready_{i}") for i, q in enumerate(queues)]
    merged = sa.union_all(*(sa.select(*r.c) for r in per_queue))
    listed = merged.subquery("listed")
    if limited:
        return limits.trimmed(listed, limit)
    return (
        sa.select(listed.c.id)
        .order_by(listed.c.priority, listed.c.run_at, listed.c.id)
        .limit(limit)
    )


@compiles(sa.Table, "sqlite")
def _sqlite_table_with_hint(element: sa.Table, compiler: Any, **kw: Any) -> str:
    """A table in a SQLite FROM clause, followed by the statement's hint for it (`INDEXED
    BY ...`, from `Select.with_hint(table, text, "sqlite")`): SQLAlchemy's SQLite compiler
    drops table hints, SQLite's grammar has this one."""
    text: str = compiler.visit_table(element, **kw)
    hint = (kw.get("fromhints") or {}).get(element)
    if hint and kw.get("asfrom") and not kw.get("ashint"):
        text = f"{text} {hint}"
    return text


def claim_by_id(conn: sa.Connection, worker: str, task_id: int) -> list[sa.Row[Any]]:
    """queued -> running for one given task whatever its run_at (inline mode)."""
    now = db_now()
    stmt = (
        sa.update(tasks)
        .where(tasks.c.id == task_id, status_is(Status.QUEUED))
        .values(
            status=Status.RUNNING.value,
            locked_by=worker,
            locked_at=now,
            started_at=now,
            attempts=tasks.c.attempts + 1,
        )
        .returning(*CLAIM_COLUMNS)
    )
    return list(conn.execute(stmt))


def _fence() -> Any:
    """The owner check of every write that ends or gives back a run; the worker is a bound
    parameter, so each such statement is built once for all workers."""
    return sa.and_(
        tasks.c.id == sa.bindparam("task_id"),
        status_is(Status.RUNNING),
        tasks.c.locked_by == sa.bindparam("fence_worker", type_=sa.String),
        tasks.c.attempts == sa.bindparam("task_attempts"),
    )


def record(conn: sa.Connection, worker: str, outcomes: Sequence[Outcome]) -> int:
    """Write many outcomes (complete, retry, fail), one statement per kind; returns rows written.

    Rows not written are runs this worker no longer owns (rescued while it was cut off);
    they are logged here and left as the newer run wrote them.
    """
    written = 0
    by_status: dict[Status, list[Outcome]] = {}
    snoozed = [o for o in outcomes if o.snooze]
    for outcome in outcomes:
        if not outcome.snooze:
            by_status.setdefault(outcome.status, []).append(outcome)
    for status, group in by_status.items():
        if status is Status.SUCCEEDED:
            written += complete(conn, worker, group)
        elif status is Status.QUEUED:
            written += retry(conn, worker, group)
        elif status is Status.CANCELLED:
            written += _execute_fenced(conn, Status.CANCELLED, worker, group)
        else:
            written += fail(conn, worker, group)
    if snoozed:
        written += snooze(conn, worker, snoozed)
    return written


def snooze(conn: sa.Connection, worker: str, outcomes: Sequence[Outcome]) -> int:
    """running -> queued `retry_in` seconds from now, the attempt given back, the snooze
    counted; the previous error and exception stay as they were (a snooze is no failure)."""
    stmt = (
        sa.update(tasks)
        .where(_fence())
        .values(
            status=Status.QUEUED.value,
            locked_by=None,
            locked_at=None,
            attempts=tasks.c.attempts - 1,
            snoozes=tasks.c.snoozes + 1,
            run_at=db_now(sa.bindparam("retry_in", type_=sa.Float)),
        )
        .returning(tasks.c.id)
    )
    landed: set[int] = set()
    for params in _params(outcomes, fence_worker=worker):
        landed.update(r[0] for r in conn.execute(stmt, params))
    return _written(conn, worker, outcomes, len(landed), landed)


def _params(outcomes: Sequence[Outcome], **extra: Any) -> list[dict[str, Any]]:
    return [
        {
            "task_id": o.id,
            "task_attempts": o.attempts,
            "new_result": o.result,
            "new_exception": o.exception,
            "new_error": o.error,
            "retry_in": float(o.retry_in),
            **extra,
        }
        for o in outcomes
    ]


def _execute_fenced(
    conn: sa.Connection, status: Status, worker: str, outcomes: Sequence[Outcome]
) -> int:
    stmt = _outcome_statement(status)
    params = _params(outcomes, fence_worker=worker)
    count = conn.execute(stmt, params[0] if len(params) == 1 else params).rowcount
    return _written(conn, worker, outcomes, count)


@functools.cache
def _outcome_statement(status: Status) -> Any:
    """The fenced UPDATE that ends a run as `status` (succeeded, queued again, failed), built
    once: SQLite and one-task batches write every outcome through it."""
    values: dict[str, Any] = {
        "status": status.value,
        "error": sa.bindparam("new_error", type_=sa.Text),
        "locked_by": None,
        "locked_at": None,
    }
    if status is Status.SUCCEEDED:
        values.update(result=sa.bindparam("new_result", type_=sa.LargeBinary), finished_at=db_now())
    else:
        values["exception"] = sa.bindparam("new_exception", type_=sa.LargeBinary)
        if status is Status.QUEUED:
            values["run_at"] = db_now(sa.bindparam("retry_in", type_=sa.Float))
        else:
            values["finished_at"] = db_now()
    return sa.update(tasks).where(_fence()).values(**values)


def _written(
    conn: sa.Connection,
    worker: str,
    outcomes: Sequence[Outcome],
    count: int,
    landed: set[int] | None = None,
) -> int:
    """`count` rows were written for `outcomes`: log and count the runs no longer ours.

    `landed`: the ids written, when the statement returned them. Otherwise a row counts as
    written when it now holds our outcome for our attempt (asking whether we still *own* it
    would be wrong after the write: our own write released it).
    """
    if count != len(outcomes):
        if landed is None:
            landed = set() if len(outcomes) == 1 else {o.id for o in outcomes if _holds(conn, o)}
        lost = [o.id for o in outcomes if o.id not in landed]
        for task_id in lost:
            log.warning(
                "lost ownership of task %s: it was rescued while this worker was cut off; "
                "the newer run's outcome stands",
                task_id,
                extra={"task_id": task_id, "event": "lost_ownership"},
            )
        LOST_WRITES.add(len(lost))
        return len(outcomes) - len(lost)
    return count


class _Counter:
    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


LOST_WRITES = _Counter()


def _holds(conn: sa.Connection, outcome: Outcome) -> bool:
    """Whether the row now holds this outcome of this attempt (it was written)."""
    row = conn.execute(
        sa.select(tasks.c.id).where(
            tasks.c.id == outcome.id,
            status_is(outcome.status),
            tasks.c.attempts == outcome.attempts,
            tasks.c.locked_by.is_(None),
        )
    ).first()
    return row is not None


# A batch's rows are found by `id = ANY(ids)` and each row's own values picked from the
# arrays by its position: joined to unnest(ids, ...) instead, the generic plan of the
# prepared statement re-ran the unnest for every row of a nested loop (measured: a third
# more time per batch of 100 than this form).
_COMPLETE_MANY_PG = sa.text(
    """
    UPDATE tasks
    SET status = 'succeeded',
        result = (CAST(:results AS bytea[]))[array_position(CAST(:ids AS bigint[]), tasks.id)],
        error = (CAST(:errors AS text[]))[array_position(CAST(:ids AS bigint[]), tasks.id)],
        locked_by = NULL, locked_at = NULL, finished_at = clock_timestamp()
    WHERE tasks.id = ANY(CAST(:ids AS bigint[])) AND tasks.status = 'running'
      AND tasks.locked_by = :worker
      AND tasks.attempts = (CAST(:attempts AS int[]))[array_position(CAST(:ids AS bigint[]),
                                                                     tasks.id)]
    RETURNING tasks.id
    """
)

# The usual batch: tasks that returned None with nothing to note, so no result or error
# arrays to send (building and parsing two arrays of NULLs was a fifth of the statement).
_COMPLETE_MANY_BARE_PG = sa.text(
    """
    UPDATE tasks
    SET status = 'succeeded', result = NULL, error = NULL,
        locked_by = NULL, locked_at = NULL, finished_at = clock_timestamp()
    WHERE tasks.id = ANY(CAST(:ids AS bigint[])) AND tasks.status = 'running'
      AND tasks.locked_by = :worker
      AND tasks.attempts = (CAST(:attempts AS int[]))[array_position(CAST(:ids AS bigint[]),
                                                                     tasks.id)]
    RETURNING tasks.id
    """
)


def complete(conn: sa.Connection, worker: str, outcomes: Sequence[Outcome]) -> int:
    """running -> succeeded, storing each result.

    PostgreSQL, several at once: one UPDATE taking arrays of (id, attempts, result, error),
    fenced like the rest; a batch of executemany UPDATEs costs the server one statement each.
    """
    if len(outcomes) > 1 and conn.dialect.name == "postgresql":
        params: dict[str, Any] = {
            "ids": _binary_array(conn, [o.id for o in outcomes]),
            "attempts": _binary_array(conn, [o.attempts for o in outcomes]),
            "worker": worker,
        }
        if all(o.result is None and o.error is None for o in outcomes):
            statement = _COMPLETE_MANY_BARE_PG
        else:
            statement = _COMPLETE_MANY_PG
            params["results"] = _binary_array(conn, [o.result for o in outcomes])
            params["errors"] = [o.error for o in outcomes]
        landed = set(conn.execute(statement, params).scalars().all())
        return _written(conn, worker, outcomes, len(landed), landed)
    return _execute_fenced(conn, Status.SUCCEEDED, worker, outcomes)


def retry(conn: sa.Connection, worker: str, outcomes: Sequence[Outcome]) -> int:
    """running -> queued again, `retry_in` seconds from now, keeping the exception."""
    return _execute_fenced(conn, Status.QUEUED, worker, outcomes)


def fail(conn: sa.Connection, worker: str, outcomes: Sequence[Outcome]) -> int:
    """running -> failed (final), keeping the exception and the readable error."""
    return _execute_fenced(conn, Status.FAILED, worker, outcomes)


def release(conn: sa.Connection, worker: str, claimed: Sequence[tuple[int, int]]) -> int:
    """running -> queued for claimed tasks that never started; the attempt is given back."""
    if not claimed:
        return 0
    stmt = (
        sa.update(tasks)
        .where(_fence())
        .values(
            status=Status.QUEUED.value,
            locked_by=None,
            locked_at=None,
            started_at=None,
            attempts=tasks.c.attempts - 1,
        )
    )
    params = [{"task_id": i, "task_attempts": a, "fence_worker": worker} for i, a in claimed]
    return int(conn.execute(stmt, params).rowcount)


def release_unknown(conn: sa.Connection, worker: str, keep: set[int]) -> int:
    """running -> queued for this live worker's rows it does not know it holds (a claim whose
    commit reply was lost), the attempt given back; `keep` are the tasks it does run."""
    stmt = sa.update(tasks).where(status_is(Status.RUNNING), tasks.c.locked_by == worker)
    if keep:
        stmt = stmt.where(tasks.c.id.not_in(sorted(keep)))
    stmt = stmt.values(
        status=Status.QUEUED.value,
        locked_by=None,
        locked_at=None,
        started_at=None,
        attempts=tasks.c.attempts - 1,
    )
    return int(conn.execute(stmt).rowcount)


def release_unique_key(conn: sa.Connection, unique_key: str) -> list[int]:
    """running -> running without its unique_key: the next enqueue with the key queues anew.

    For a task that has started reading what it was enqueued for (the counter flush): a
    later enqueue must not count on this run. Returns the ids of the tasks changed.
    """
    stmt = (
        sa.update(tasks)
        .where(tasks.c.unique_key == unique_key, status_is(Status.RUNNING))
        .values(unique_key=None)
        .returning(tasks.c.id)
    )
    return [int(r[0]) for r in conn.execute(stmt)]


def rescue(conn: sa.Connection, dead_workers: Sequence[str], reason: str) -> list[int]:
    """running -> queued (or failed when out of attempts) for tasks held by dead workers."""
    if not dead_workers:
        return []
    out_of_attempts = tasks.c.attempts >= tasks.c.max_attempts
    cancelled = tasks.c.cancel_requested_at.is_not(None)  # asked to stop: it stops here
    ends = sa.or_(cancelled, out_of_attempts)
    stmt = (
        sa.update(tasks)
        .where(status_is(Status.RUNNING), tasks.c.locked_by.in_(list(dead_workers)))
        .values(
            status=sa.case(
                (cancelled, Status.CANCELLED.value),
                (out_of_attempts, Status.FAILED.value),
                else_=Status.QUEUED.value,
            ),
            error=sa.literal(reason),
            locked_by=None,
            locked_at=None,
            # run_at stays: the task keeps its place in the queue (priority, run_at, id)
            # instead of waiting behind everything enqueued while it ran
            finished_at=sa.case((ends, db_now()), else_=None),
        )
        .returning(tasks.c.id)
    )
    return [r[0] for r in conn.execute(stmt)]


def cancel(conn: sa.Connection, task_ids: Sequence[int], *, returning: bool = False) -> Any:
    """queued -> cancelled; how many (or, `returning`, which ids) were."""
    stmt = (
        sa.update(tasks)
        .where(tasks.c.id.in_(list(task_ids)), status_is(Status.QUEUED))
        .values(status=Status.CANCELLED.value, finished_at=db_now())
    )
    if returning:
        return sorted(r[0] for r in conn.execute(stmt.returning(tasks.c.id)))
    return int(conn.execute(stmt).rowcount)


def request_cancel(conn: sa.Connection, task_ids: Sequence[int]) -> list[int]:
    """running -> running with `cancel_requested_at` set: its worker stops the run."""
    stmt = (
        sa.update(tasks)
        .where(tasks.c.id.in_(list(task_ids)), status_is(Status.RUNNING))
        .values(cancel_requested_at=sa.func.coalesce(tasks.c.cancel_requested_at, db_now()))
        .returning(tasks.c.id)
    )
    return sorted(r[0] for r in conn.execute(stmt))


def cancel_requests(conn: sa.Connection, worker: str, task_ids: Sequence[int]) -> list[int]:
    """Which of this worker's running tasks were asked to stop (read by primary key)."""
    stmt = sa.select(tasks.c.id).where(
        tasks.c.id.in_(list(task_ids)),
        status_is(Status.RUNNING),
        tasks.c.locked_by == worker,
        tasks.c.cancel_requested_at.is_not(None),
    )
    return [r[0] for r in conn.execute(stmt)]


def queued_ids(conn: sa.Connection, queue: str) -> list[int]:
    """Ids of the queued tasks of one queue (through ix_tasks_queue_claimable)."""
    stmt = sa.select(tasks.c.id).where(status_is(Status.QUEUED), tasks.c.queue == queue)
    return [r[0] for r in conn.execute(stmt)]


def statuses(conn: sa.Connection, task_ids: Sequence[int]) -> dict[int, str]:
    """id -> status for the ids that exist."""
    stmt = sa.select(tasks.c.id, tasks.c.status).where(tasks.c.id.in_(list(task_ids)))
    return {r.id: r.status for r in conn.execute(stmt)}


def requeue(
    conn: sa.Connection,
    task_ids: Sequence[int] | None = None,
    *,
    all_failed: bool = False,
    queues: Sequence[str] | None = None,
) -> int:
    """failed/cancelled -> queued now, with a fresh set of attempts."""
    stmt = sa.update(tasks).where(status_is(Status.FAILED, Status.CANCELLED))
    if task_ids is not None:
        stmt = stmt.where(tasks.c.id.in_(list(task_ids)))
    elif all_failed:
        stmt = stmt.where(status_is(Status.FAILED))
    else:
        return 0
    if queues:
        stmt = stmt.where(tasks.c.queue.in_(list(queues)))
    stmt = stmt.values(
        status=Status.QUEUED.value,
        attempts=0,
        run_at=db_now(),
        finished_at=None,
        cancel_requested_at=None,
    )
    return int(conn.execute(stmt).rowcount)


def clear(conn: sa.Connection, queues: Sequence[str] | None = None) -> int:
    """Delete queued tasks (of some queues, or all)."""
    stmt = sa.delete(tasks).where(status_is(Status.QUEUED))
    if queues:
        stmt = stmt.where(tasks.c.queue.in_(list(queues)))
    return int(conn.execute(stmt).rowcount)


def delete(conn: sa.Connection, task_ids: Sequence[int]) -> int:
    """Delete tasks that are not running."""
    stmt = sa.delete(tasks).where(tasks.c.id.in_(list(task_ids)), ~status_is(Status.RUNNING))
    return int(conn.execute(stmt).rowcount)


def prune(conn: sa.Connection, older_than_seconds: float, batch: int = 5000) -> int:
    """Delete up to `batch` finished tasks older than the cutoff; call until it returns 0."""
    doomed = (
        sa.select(tasks.c.id)
        .where(
            status_is(*FINISHED),
            tasks.c.finished_at < db_now(-float(older_than_seconds)),
        )
        .limit(batch)
        .scalar_subquery()
    )
    return int(conn.execute(sa.delete(tasks).where(tasks.c.id.in_(doomed))).rowcount)


def get(conn: sa.Connection, task_id: int) -> sa.Row[Any] | None:
    """One task row, every column."""
    return conn.execute(sa.select(tasks).where(tasks.c.id == task_id)).first()


def ready_count(conn: sa.Connection, queues: Sequence[str] | None = None) -> int:
    """Queued tasks whose run_at has come (exact: an index-only read of the queued rows of
    `queues`, or of every queue; the history is never read)."""
    stmt = sa.select(sa.func.count()).where(status_is(Status.QUEUED), tasks.c.run_at <= db_now())
    if queues:
        stmt = stmt.where(tasks.c.queue.in_(list(queues)))
    return int(conn.execute(stmt).scalar_one())


def seconds_until_next(conn: sa.Connection, queues: Sequence[str] | None = None) -> float | None:
    """Seconds until the earliest queued task becomes ready (0 if one is ready); None if none.

    The idle worker's sleep, asked after every empty claim. `min(run_at)` over the queued
    rows read all of them (300 ms beside 1,000,000 queued rows, on every idle poll): the
    claim indexes are ordered by priority first. So this reads, per queue, the earliest
    run_at of each priority present: one index lookup per distinct priority (a recursive
    CTE that skips from one priority to the next), however many rows each holds.
    """
    earliest_of = [earliest_run_at(q, i) for i, q in enumerate(queues or [None])]
    earliest_sql = (
        earliest_of[0]
        if len(earliest_of) == 1
        else sa.func.min(
            sa.union_all(*(sa.select(e.label("run_at")) for e in earliest_of)).subquery().c.run_at
        )
    )
    earliest, now = conn.execute(sa.select(earliest_sql, db_now())).one()
    if earliest is None:
        return None
    if isinstance(earliest, str):
        earliest = UTCDateTime().process_result_value(earliest, conn.dialect)
    return max(0.0, float((earliest - now).total_seconds()))


def earliest_run_at(queue: str | None, n: int) -> Any:
    """A scalar subquery: the earliest run_at of `queue`'s queued rows (None: every queue),
    by a loose index scan over the claim index's priorities (seconds_until_next)."""
    index = "ix_tasks_claimable" if queue is None else "ix_tasks_queue_claimable"

    def queued() -> sa.Select[Any]:
        stmt = sa.select(tasks.c.priority).where(status_is(Status.QUEUED))
        if queue is not None:
            stmt = stmt.where(tasks.c.queue == sa.literal(queue))
        return stmt.with_hint(tasks, f"INDEXED BY {index}", "sqlite")

    first = queued().order_by(tasks.c.priority).limit(1).scalar_subquery()
    levels = sa.select(first.label("priority")).cte(f"priorities_{n}", recursive=True)
    following = (
        queued()
        .where(tasks.c.priority > levels.c.priority)
        .order_by(tasks.c.priority)
        .limit(1)
        .scalar_subquery()
    )
    levels = levels.union_all(sa.select(following).where(levels.c.priority.is_not(None)))
    earliest = (
        queued()
        .with_only_columns(tasks.c.run_at)
        .where(tasks.c.priority == levels.c.priority)
        .order_by(tasks.c.run_at)
        .limit(1)
        .scalar_subquery()
    )
    return (
        sa.select(sa.type_coerce(sa.func.min(earliest), UTCDateTime()))
        .where(levels.c.priority.is_not(None))
        .scalar_subquery()
    )


# -- workers ---------------------------------------------------------------------------------


def register_worker(
    conn: sa.Connection,
    name: str,
    hostname: str,
    pid: int,
    queues: Sequence[str] | None,
    host_id: str | None = None,
) -> None:
    """Add this worker process to `workers`, heartbeating from now."""
    conn.execute(
        sa.insert(workers).values(
            name=name,
            hostname=hostname,
            pid=pid,
            host_id=host_id,
            queues=",".join(queues) if queues else None,
            started_at=db_now(),
            heartbeat_at=db_now(),
        )
    )


def heartbeat(conn: sa.Connection, name: str) -> bool:
    """Stamp the worker alive; False when its row is gone (it was declared dead)."""
    stmt = sa.update(workers).where(workers.c.name == name).values(heartbeat_at=db_now())
    return bool(conn.execute(stmt).rowcount)


def unregister_worker(conn: sa.Connection, name: str) -> None:
    conn.execute(sa.delete(workers).where(workers.c.name == name))


def list_workers(conn: sa.Connection, host_id: str | None = None) -> list[sa.Row[Any]]:
    """Registered workers (of one process table, or all) with the database's now."""
    stmt = sa.select(workers, db_now().label("now")).order_by(workers.c.name)
    if host_id is not None:
        stmt = stmt.where(workers.c.host_id == host_id)
    return list(conn.execute(stmt))


def stale_workers(conn: sa.Connection, after_seconds: float) -> list[str]:
    """Workers whose last heartbeat is older than `after_seconds`."""
    stmt = sa.select(workers.c.name).where(workers.c.heartbeat_at < db_now(-after_seconds))
    return [r[0] for r in conn.execute(stmt)]


def limit_idle(conn: sa.Connection, seconds: float) -> None:
    """Have PostgreSQL end this transaction (and its session) if the client goes silent
    inside it for `seconds`: SET LOCAL idle_in_transaction_session_timeout.

    A worker cut off from the network mid-transaction leaves the server waiting for its
    next statement with the transaction's row locks held until TCP gives up, minutes or
    hours later. Those are the rows a rescue updates (the worker's `workers` row, its
    tasks), so every other worker's heartbeat would queue behind them. Transaction-scoped,
    so it is fine behind a pooler in transaction mode; nothing to do on SQLite, where no
    network lies between the worker and the database.
    """
    if conn.dialect.name == "postgresql":
        milliseconds = str(max(1, round(seconds * 1000)))
        conn.execute(
            sa.select(sa.func.set_config("idle_in_transaction_session_timeout", milliseconds, True))
        )


def remove_workers(conn: sa.Connection, names: Sequence[str]) -> None:
    conn.execute(sa.delete(workers).where(workers.c.name.in_(list(names))))


def orphaned_owners(conn: sa.Connection) -> list[str]:
    """Owners of running tasks that have no row in `workers` (their row was removed)."""
    stmt = (
        sa.select(tasks.c.locked_by)
        .where(
            status_is(Status.RUNNING),
            tasks.c.locked_by.is_not(None),
            ~sa.exists().where(workers.c.name == tasks.c.locked_by),
        )
        .distinct()
    )
    return [r[0] for r in conn.execute(stmt)]


def running_tasks(conn: sa.Connection, worker: str | None = None) -> list[sa.Row[Any]]:
    stmt = sa.select(tasks.c.id, tasks.c.locked_by, tasks.c.attempts).where(
        status_is(Status.RUNNING)
    )
    if worker is not None:
        stmt = stmt.where(tasks.c.locked_by == worker)
    return list(conn.execute(stmt))


def queued_by_handler(conn: sa.Connection, handler: str) -> list[sa.Row[Any]]:
    """Queued tasks of one handler, oldest first, with their payloads (the pytest plugin)."""
    return list(
        conn.execute(
            sa.select(tasks.c.id, tasks.c.queue, tasks.c.run_at, tasks.c.payload)
            .where(status_is(Status.QUEUED), tasks.c.handler == handler)
            .order_by(tasks.c.id)
        )
    )
