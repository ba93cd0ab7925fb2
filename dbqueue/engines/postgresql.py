"""PostgreSQL: the claim in one UPDATE over a MATERIALIZED `FOR UPDATE SKIP LOCKED` CTE, sent
to psycopg's cursor; batch inserts and completions as arrays; LISTEN/NOTIFY; advisory locks.

The statements go through SQLAlchemy where that costs nothing and to the driver's cursor
where SQLAlchemy's execution path was measured to cost as much as the round trip (the
lone enqueue, the worker's claim).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from dbqueue import database, limits
from dbqueue.engines import base
from dbqueue.engines.base import CLAIM_COLUMNS, NewTask, Outcome
from dbqueue.schema import tasks

NOTIFY_CHANNEL = "dbqueue"
NOTIFY_MIN_INTERVAL = 0.005  # seconds between NOTIFYs for one queue from one process


# -- the driver's cursor -----------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def driver_sql(
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


def driver_params(
    statement: Any, dialect: sa.Dialect, values: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """(SQL, parameters) to send `statement` with `values` through the driver's cursor."""
    sql, fixed, processors = driver_sql(statement, dialect)
    params = {**fixed, **values}
    for name, process in processors:
        params[name] = process(params[name])
    return sql, params


# -- NOTIFY ------------------------------------------------------------------------------------


class NotifyLimiter:
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


limiter = NotifyLimiter()


def notify_inline(task: NewTask) -> bool:
    """Whether this one-row insert should carry its NOTIFY (ready now, and due)."""
    return task.run_at is None and task.delay <= 0 and limiter.due(task.queue)


def _notify_column(queue: str) -> Any:
    """`(SELECT pg_notify(channel, queue))` for RETURNING: an InitPlan, run once per statement,
    so the insert and its NOTIFY travel in one round trip."""
    return sa.select(sa.func.pg_notify(sa.literal(NOTIFY_CHANNEL), sa.literal(queue))).label(
        "notified"
    )


@functools.lru_cache(maxsize=256)
def insert_one_statement(notify_queue: str | None) -> Any:
    """The one-row INSERT, built once (per queue when it carries its NOTIFY): building it
    and its cache key on every enqueue cost more client time than the round trip."""
    stmt = base.insert_one_statement()
    if notify_queue is not None:
        stmt = stmt.returning(_notify_column(notify_queue))
    return stmt


def insert_one_autocommit(engine: sa.Engine, task: NewTask, *, notify: bool = True) -> int:
    """Store one task in a statement of its own (autocommit); returns its id.

    The statement is SQLAlchemy's (`insert_one_statement`, compiled once) but it goes to the
    driver's cursor of a pooled connection directly: measured after a 20 ms pause, as an
    enqueue from a web request is, SQLAlchemy's execution path around a cached statement
    (connection branch, isolation switch and reset, execution context, result object) cost
    about as much client time as the round trip itself. Connection events (checkout pings)
    still run; cursor-level events (`before_cursor_execute`) do not see this statement.
    """
    inline = notify and notify_inline(task)
    statement = insert_one_statement(task.queue if inline else None)
    sql, params = driver_params(statement, engine.dialect, base.insert_values(task))
    with base.pooled_driver(engine, sql, params) as pooled:
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
    assert row is not None
    return int(row[0])


# -- batch insert --------------------------------------------------------------------------------

_INSERT_MANY = sa.text(
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
_INSERT_MANY_UNIFORM = sa.text(
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
    """A list psycopg sends as a binary array (see `binary_array`)."""


def binary_array(conn: sa.Connection, values: list[Any]) -> list[Any]:
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


def _insert_unnest(conn: sa.Connection, new: Sequence[NewTask]) -> list[int]:
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
        statement = _INSERT_MANY_UNIFORM
        params: dict[str, Any] = {
            "queue": first.queue,
            "priority": first.priority,
            "run_at": first.run_at.astimezone(utc) if first.run_at else None,
            "delay": float(first.delay),
            "handler": first.handler,
            "max_attempts": first.max_attempts,
            "timeout": first.timeout,
            "payloads": binary_array(conn, [t.payload for t in new]),
        }
    else:
        statement = _INSERT_MANY
        params = {
            "queues": [t.queue for t in new],
            "priorities": [t.priority for t in new],
            "run_ats": [t.run_at.astimezone(utc) if t.run_at else None for t in new],
            "delays": [float(t.delay) for t in new],
            "handlers": [t.handler for t in new],
            "payloads": binary_array(conn, [t.payload for t in new]),
            "max_attempts": [t.max_attempts for t in new],
            "timeouts": [t.timeout for t in new],
        }
    return list(conn.execute(statement, params).scalar_one())


# -- batch completion ----------------------------------------------------------------------------

# A batch's rows are found by `id = ANY(ids)` and each row's own values picked from the
# arrays by its position: joined to unnest(ids, ...) instead, the generic plan of the
# prepared statement re-ran the unnest for every row of a nested loop (measured: a third
# more time per batch of 100 than this form).
COMPLETE_MANY = sa.text(
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
COMPLETE_MANY_BARE = sa.text(
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

_LIMITS_LOCK = sa.text("SELECT pg_advisory_xact_lock(:lock_key)")  # see limits.py


class PostgreSQL(base.Engine):
    name = "postgresql"
    autocommit_statements = True
    notifies = True

    def insert_one(self, conn: sa.Connection, task: NewTask, notify: bool = False) -> int:
        inline = notify and notify_inline(task)
        stmt = insert_one_statement(task.queue if inline else None)
        return int(conn.execute(stmt, base.insert_values(task)).scalar_one())

    def insert_alone(self, engine: sa.Engine, task: NewTask, notify: bool = True) -> int | None:
        if not database.is_psycopg(engine):
            return None
        return insert_one_autocommit(engine, task, notify=notify)

    def insert_many(self, conn: sa.Connection, new: Sequence[NewTask]) -> list[int]:
        if all(t.meta is None and t.concurrency_key is None for t in new):
            return _insert_unnest(conn, new)
        return super().insert_many(conn, new)  # meta: the unnest statements leave it out

    def insert_if_absent(self, conn: sa.Connection, task: NewTask) -> int | None:
        return base.insert_on_conflict_do_nothing(conn, task, postgresql.insert)

    def notify(self, conn: sa.Connection, queues: Iterable[str]) -> None:
        """The payload is the queue name alone; one round trip however many queues are due
        (a bus publish fans out to many)."""
        due = sorted(q for q in set(queues) if limiter.due(q))
        if due:
            conn.execute(sa.select(*(sa.func.pg_notify(NOTIFY_CHANNEL, q) for q in due)))

    def claim(
        self,
        conn: sa.Connection,
        worker: str,
        limit: int,
        queues: tuple[str, ...] | None,
        registered: bool,
        exclude: tuple[str, ...],
        limited: bool,
    ) -> list[Any]:
        stmt = self.claim_statement(queues, registered, exclude, limited)
        if limited:
            if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
                raise ValueError("a limited claim needs a transaction: the lock ends with it")
            self.lock_limited_claims(conn)
        values = {"claim_limit": limit, "claim_worker": worker}
        if database.is_psycopg(conn):
            return _claim_on_driver(conn, stmt, values, sort_free=queues is None and not limited)
        return list(conn.execute(stmt, values).all())  # other drivers: the planner's choice

    @functools.lru_cache(maxsize=32)  # noqa: B019 (one instance per engine, never freed)
    def claim_statement(
        self,
        queues: tuple[str, ...] | None,
        registered: bool = False,
        exclude: tuple[str, ...] = (),
        limited: bool = False,
    ) -> Any:
        """The claim, built once per set of queues. The candidate ids are locked `FOR UPDATE
        SKIP LOCKED` inside a MATERIALIZED CTE: without the fence the planner may re-run the
        LIMITed subquery in a nested loop and update more rows than the limit (Oban learned
        this). SKIP LOCKED lets concurrent workers take disjoint batches instead of queueing
        on each other's locks
        (https://www.postgresql.org/docs/current/sql-select.html#SQL-FOR-UPDATE-SHARE).

        The claim's own transaction commits without waiting for its WAL to reach the disk
        (`synchronous_commit` off for that transaction alone, set by an InitPlan that runs
        once before any row is read). A claim lost in a crash of the server returns its
        tasks to `queued`, as if never claimed: delivery is at-least-once anyway, the
        outcome write of the run is fenced (it finds the row no longer ours and says so),
        and every outcome and enqueue still waits for its flush, which also makes every
        earlier claim durable. It saves a disk flush per batch (measured: about a tenth of a
        drain's time).

        A registered claim reads the worker's row `FOR KEY SHARE`, so a rescue deleting it
        waits for this claim to commit and then sees (and returns) what it took.
        """
        candidates = base.claimable(
            queues, sa.bindparam("claim_limit", type_=sa.Integer), exclude, limited
        )
        relaxed = sa.select(
            sa.func.set_config(
                sa.literal_column("'synchronous_commit'"),
                sa.literal_column("'off'"),
                sa.true(),
            )
        ).scalar_subquery()
        candidates = candidates.where(relaxed == sa.literal_column("'off'"))
        if registered:  # an uncorrelated EXISTS: one InitPlan, run once per claim
            own_row = base.own_worker_row().with_for_update(read=True, key_share=True)
            candidates = candidates.where(own_row.exists())
        fenced = candidates.cte("claimable").prefix_with("MATERIALIZED", dialect="postgresql")
        # `id = ANY(ARRAY(SELECT id FROM claimable))`: the ids as one value, looked up in the
        # primary key. With `id IN (SELECT ...)` the generic plan of the prepared claim,
        # which cannot know the LIMIT, hash-joined the ids to a sequential scan of the
        # whole table whenever the table was small (measured on 10,000 rows: 1.9 ms against
        # 0.53 ms per claim; tests/test_claim_plan.py).
        claimed = tasks.c.id == sa.any_(sa.func.array(sa.select(fenced.c.id).scalar_subquery()))
        return (
            sa.update(tasks).where(claimed).values(base.claimed_values()).returning(*CLAIM_COLUMNS)
        )

    def is_transient(self, exc: BaseException) -> bool:
        """Deadlock, lock_timeout or serialization failure: the transaction was aborted."""
        return database.is_transient(exc)

    def complete_many(
        self, conn: sa.Connection, worker: str, outcomes: Sequence[Outcome]
    ) -> set[int] | None:
        """One UPDATE taking arrays of (id, attempts, result, error), fenced like the rest;
        a batch of executemany UPDATEs costs the server one statement each."""
        params: dict[str, Any] = {
            "ids": binary_array(conn, [o.id for o in outcomes]),
            "attempts": binary_array(conn, [o.attempts for o in outcomes]),
            "worker": worker,
        }
        if all(o.result is None and o.error is None for o in outcomes):
            statement = COMPLETE_MANY_BARE
        else:
            statement = COMPLETE_MANY
            params["results"] = binary_array(conn, [o.result for o in outcomes])
            params["errors"] = [o.error for o in outcomes]
        return set(conn.execute(statement, params).scalars().all())

    def lock_limited_claims(self, conn: sa.Connection) -> None:
        conn.execute(_LIMITS_LOCK, {"lock_key": limits.CLAIM_LOCK})

    def limit_idle(self, conn: sa.Connection, seconds: float) -> None:
        """SET LOCAL idle_in_transaction_session_timeout: transaction-scoped, so it is fine
        behind a pooler in transaction mode."""
        milliseconds = str(max(1, round(seconds * 1000)))
        conn.execute(
            sa.select(sa.func.set_config("idle_in_transaction_session_timeout", milliseconds, True))
        )


#: The all-queues claim (`dbqueue work` without --queues) must walk ix_tasks_claimable in
#: claim order and stop after LIMIT rows. PostgreSQL picks that plan only when its statistics
#: say many rows are queued; a table analyzed while empty (a new install, a table pruned
#: nearly empty, the `VACUUM ANALYZE` before a burst) or while every row was finished (a
#: burst into a long history: `queued` is not among the status column's common values, and
#: autovacuum waits for a tenth of the table to change) makes it bitmap-scan every queued
#: row and sort them all for each claim: 15 ms instead of 1.5 ms per claim of 100 over
#: 20,000 queued rows. With sorts disabled the only plan left is the ordered index walk,
#: whatever the statistics say. So each connection looks at the claim's plan (EXPLAIN, no
#: run) at most every PLAN_CHECK_SECONDS; while it sorts over a backlog of STALE_BACKLOG
#: rows or more, the claim goes out as one simple query behind this set_config: one message,
#: one implicit transaction, and the setting ends with it. Not always: that query is planned
#: each time (no prepared statement), and a psycopg pipeline, tried first, flushed the claim
#: before its Sync, so a process descheduled in between held the claimed rows' transaction
#: open. Per-queue and limited claims keep the planner's choice (their plans hold without
#: statistics; forbidding sorts there made plans hundreds of times slower).
SORT_OFF = "SELECT set_config('enable_sort', 'off', true); "
PLAN_CHECK_SECONDS = 5.0
STALE_BACKLOG = 1000
_BACKLOG = (
    f"SELECT count(*) FROM (SELECT 1 FROM tasks WHERE status = 'queued' LIMIT {STALE_BACKLOG}) s"
)
_PLAN_CHECKED = "dbqueue_claim_plan_sorts"  # key in the DBAPI connection's info: (when, sorts)
_LAST_FULL = "dbqueue_claim_was_full"  # whether the connection's last plain claim filled its batch


def _claim_sorts(conn: sa.Connection, cursor: Any, sql: str, params: dict[str, Any]) -> bool:
    """Whether the all-queues claim is now planned with a sort over a backlog worth the
    concern (SORT_OFF); asked of the server at most every PLAN_CHECK_SECONDS per connection."""
    info = conn.connection.info
    now = time.monotonic()
    checked_at, cached = info.get(_PLAN_CHECKED, (None, False))
    if checked_at is not None and now - checked_at < PLAN_CHECK_SECONDS:
        return bool(cached)
    cursor.execute("EXPLAIN (FORMAT JSON) " + sql, params)
    plan = cursor.fetchone()[0]
    sorts: bool = '"Node Type": "Sort"' in json.dumps(plan)
    if sorts:
        cursor.execute(_BACKLOG)
        sorts = int(cursor.fetchone()[0]) >= STALE_BACKLOG
    info[_PLAN_CHECKED] = (now, sorts)
    return sorts


def _note_plain_claim(conn: sa.Connection, full: bool) -> None:
    """A claim that filled its batch after one that did not is the start of a burst, which
    may have landed in a table whose statistics predate it (the worker looked at the plan
    while idle, over an empty backlog): look at the plan again before the next claim rather
    than up to PLAN_CHECK_SECONDS later."""
    info = conn.connection.info
    if full and not info.get(_LAST_FULL, False):
        info.pop(_PLAN_CHECKED, None)
    info[_LAST_FULL] = full


def _claim_on_driver(
    conn: sa.Connection, stmt: Any, values: dict[str, Any], sort_free: bool = False
) -> list[Any]:
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
    import psycopg
    from psycopg.rows import namedtuple_row

    if not conn.in_transaction():
        conn.begin()
    sql, params = driver_params(stmt, conn.dialect, values)
    driver: Any = conn.connection.driver_connection
    error = conn.dialect.loaded_dbapi.Error
    try:
        with driver.cursor(row_factory=namedtuple_row) as cursor:
            if not (sort_free and _claim_sorts(conn, cursor, sql, params)):
                cursor.execute(sql, params)
                rows: list[Any] = cursor.fetchall()
                if sort_free:
                    _note_plain_claim(conn, full=len(rows) >= values["claim_limit"])
                return rows
        with psycopg.ClientCursor(driver, row_factory=namedtuple_row) as cursor:
            cursor.execute(SORT_OFF + sql, params)
            cursor.nextset()
            rows = cursor.fetchall()
        return rows
    except error as exc:
        invalidated = conn.dialect.is_disconnect(exc, driver, None)
        if invalidated:
            conn.invalidate(exc)
        raise base.driver_error(conn.dialect, sql, params, exc, invalidated) from exc


ENGINE = PostgreSQL()
