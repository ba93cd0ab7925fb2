"""What every engine shares, and the interface each engine module fills in.

`store.py` owns the state machine (which transition writes what); an `Engine` owns how one
database runs the statements that differ between databases: the claim, the batch insert and
the lone-task fast path, unique inserts, batch completion, the limited claims' lock, NOTIFY,
the idle-in-transaction guard and which errors are worth a retry. The defaults here are
plain SQLAlchemy Core that any engine with RETURNING runs (SQLite uses them as they are).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa

from dbqueue import limits
from dbqueue.schema import Status, db_now, status_is, tasks, workers

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


def insert_values(task: NewTask) -> dict[str, Any]:
    """The bound values of `insert_columns()` for one task."""
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


def insert_columns() -> dict[str, Any]:
    """(new) -> queued: the column values of an INSERT, as bind parameters."""
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


@functools.lru_cache(maxsize=1)
def insert_one_statement() -> Any:
    """The one-row INSERT returning its id, built once."""
    return sa.insert(tasks).values(insert_columns()).returning(tasks.c.id)


@functools.lru_cache(maxsize=1)
def insert_many_statement() -> Any:
    """Several rows in one executemany, ids in parameter order."""
    return (
        sa.insert(tasks)
        .values(insert_columns())
        .returning(tasks.c.id, sort_by_parameter_order=True)
    )


def insert_on_conflict_do_nothing(
    conn: sa.Connection, task: NewTask, dialect_insert: Callable[[sa.Table], Any]
) -> int | None:
    """`INSERT ... ON CONFLICT (unique_key) WHERE <the partial index's predicate> DO NOTHING
    RETURNING id` (PostgreSQL and SQLite): the new id, or None when the key is held."""
    stmt = (
        dialect_insert(tasks)
        .values(insert_columns())
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
    inserted = conn.execute(stmt, insert_values(task)).scalar_one_or_none()
    return None if inserted is None else int(inserted)


def claimed_values() -> dict[str, Any]:
    """queued -> running: what a claim writes (the worker is the `claim_worker` parameter)."""
    now = db_now()
    return {
        "status": Status.RUNNING.value,
        "locked_by": sa.bindparam("claim_worker", type_=sa.String),
        "locked_at": now,
        "started_at": now,
        "attempts": tasks.c.attempts + 1,
    }


def own_worker_row() -> sa.Select[Any]:
    """`SELECT 1 FROM workers WHERE name = :claim_worker`: a registered claim's condition."""
    return (
        sa.select(sa.literal_column("1"))
        .select_from(workers)
        .where(workers.c.name == sa.bindparam("claim_worker", type_=sa.String))
    )


def claimable(
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
    each, never an expanding list (see postgresql.driver_sql).

    Concurrency limits (limits.py): the unlimited claim reads the same rows and leaves out
    those with a key; the limited one keeps the rows that `limits.fits` and then
    `limits.trimmed` of the locked candidates.
    """

    def ready(queue: str | None) -> sa.Select[Any]:
        return ready_rows(queue, limit, exclude, limited)

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


def ready_rows(
    queue: str | None, limit: Any, exclude: tuple[str, ...] = (), limited: bool = False
) -> sa.Select[Any]:
    """One queue's (None: every queue's) ready rows for `claimable`, up to `limit` in claim
    order, locked `FOR UPDATE SKIP LOCKED`: (id, priority, run_at), and for the limited
    claim also (queue, concurrency_key, capped)."""
    columns: tuple[Any, ...] = (tasks.c.id, tasks.c.priority, tasks.c.run_at)
    if limited:
        columns += (tasks.c.queue, tasks.c.concurrency_key, limits.capped())
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


class Engine:
    """How one database runs what differs; the defaults are plain SQLAlchemy Core.

    One instance per engine module (engines.of() picks it by the dialect's name); stateless,
    so its cached statements serve every connection.
    """

    name = "generic"
    #: The worker sends one-statement work (the claim, an outcome) in autocommit, where a
    #: statement is atomic on its own; elsewhere each is a transaction of its own.
    autocommit_statements = False
    #: Workers can be woken by LISTEN/NOTIFY; elsewhere they poll.
    notifies = False

    # -- enqueue ---------------------------------------------------------------------------

    def insert_one(self, conn: sa.Connection, task: NewTask, notify: bool = False) -> int:
        """Insert one task without a unique key; its id. `notify`: the statement carries
        its own wake-up where it can (no separate `notify` follows it)."""
        return int(conn.execute(insert_one_statement(), insert_values(task)).scalar_one())

    def insert_alone(self, engine: sa.Engine, task: NewTask, notify: bool = True) -> int | None:
        """Store one task without a unique key in a statement of its own that commits itself
        (autocommit), on a pooled connection of `engine` taken here; its id. None: this
        engine (or this Engine's driver) has no such path, and the caller inserts the task in
        a transaction of its own (INSERT, then COMMIT: one round trip more)."""
        return None

    def insert_many(self, conn: sa.Connection, new: Sequence[NewTask]) -> list[int]:
        """Insert several tasks without unique keys; their ids in order."""
        rows = conn.execute(insert_many_statement(), [insert_values(t) for t in new])
        return [r[0] for r in rows]

    def insert_if_absent(self, conn: sa.Connection, task: NewTask) -> int | None:
        """Insert a task with a unique key unless a queued or running task holds the key;
        its id, or None when one does."""
        raise NotImplementedError(f"{self.name}: unique keys")

    def unique_key_is(self, key: str) -> sa.ColumnElement[bool]:
        """The condition that finds a unique key's rows through an index."""
        return tasks.c.unique_key == key

    def notify(self, conn: sa.Connection, queues: Iterable[str]) -> None:
        """Wake workers listening for these queues (nothing where workers poll)."""

    # -- claim -----------------------------------------------------------------------------

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
        """queued -> running for up to `limit` rows (see store.claim); rows with
        CLAIM_COLUMNS' names as attributes, in any order."""
        stmt = self.claim_statement(queues, registered, exclude, limited)
        return list(conn.execute(stmt, {"claim_limit": limit, "claim_worker": worker}).all())

    @functools.lru_cache(maxsize=32)  # noqa: B019 (one instance per engine, never freed)
    def claim_statement(
        self,
        queues: tuple[str, ...] | None,
        registered: bool = False,
        exclude: tuple[str, ...] = (),
        limited: bool = False,
    ) -> Any:
        """The claim as one UPDATE ... RETURNING, built once per set of queues: building
        the construct and its cache key on every call cost more client time than the
        database spent running it (measured: 1.6 ms of 2.3 ms per claim of 100)."""
        candidates = claimable(
            queues, sa.bindparam("claim_limit", type_=sa.Integer), exclude, limited
        )
        if registered:  # an uncorrelated EXISTS: run once per claim
            candidates = candidates.where(own_worker_row().exists())
        fenced = candidates.cte("claimable")
        return (
            sa.update(tasks)
            .where(tasks.c.id.in_(sa.select(fenced.c.id)))
            .values(claimed_values())
            .returning(*CLAIM_COLUMNS)
        )

    # -- outcomes and other transitions ----------------------------------------------------

    def complete_many(
        self, conn: sa.Connection, worker: str, outcomes: Sequence[Outcome]
    ) -> set[int] | None:
        """Write several successful outcomes in one statement, fenced; the ids written, or
        None when this engine writes them one statement per row (store's fenced UPDATE)."""
        return None

    def update_returning(
        self,
        conn: sa.Connection,
        where: Any,
        values: dict[str, Any],
        *columns: Any,
        params: dict[str, Any] | None = None,
    ) -> list[Any]:
        """UPDATE tasks SET `values` WHERE `where`, returning `columns` of the rows changed
        (`params`: the values of the statement's bind parameters)."""
        stmt = sa.update(tasks).where(where).values(values).returning(*columns)
        return list(conn.execute(stmt, params) if params else conn.execute(stmt))

    def delete_ids(self, conn: sa.Connection, ids: sa.Select[Any]) -> int:
        """DELETE the tasks whose ids `ids` selects (a LIMITed SELECT); how many."""
        stmt = sa.delete(tasks).where(tasks.c.id.in_(ids.scalar_subquery()))
        return int(conn.execute(stmt).rowcount)

    def lock_limited_claims(self, conn: sa.Connection) -> None:
        """Serialise the limited claims (limits.py) for the rest of `conn`'s transaction.
        Nothing by default: an engine with one writer at a time (SQLite) serialises them."""

    def limit_idle(self, conn: sa.Connection, seconds: float) -> None:
        """Have the server end this transaction if the client goes silent in it for
        `seconds` (store.limit_idle). Nothing by default."""

    def is_transient(self, exc: BaseException) -> bool:
        """Whether `exc` is a conflict the database resolved by aborting this statement or
        transaction (a deadlock, a lock wait timeout): the same work may simply be retried."""
        return False


def driver_error(
    dialect: sa.Dialect, sql: str, params: Any, exc: Exception, invalidated: bool
) -> sa.exc.StatementError:
    """A driver error of a statement sent to the driver's cursor, wrapped as SQLAlchemy
    would have wrapped it (database.errors_translated and database.is_disconnect read
    those)."""
    return sa.exc.DBAPIError.instance(
        sql,
        params,
        exc,
        dialect.loaded_dbapi.Error,
        connection_invalidated=invalidated,
        dialect=dialect,
    )


@contextlib.contextmanager
def pooled_driver(engine: sa.Engine, sql: str, params: Any) -> Iterator[Any]:
    """A pooled connection of `engine` for `sql` sent to the driver's cursor directly (the
    lone enqueue's fast paths): the driver's errors come out as SQLAlchemy would have wrapped
    them (driver_error), a broken connection is invalidated, and the connection goes back to
    the pool after."""
    error = engine.dialect.loaded_dbapi.Error
    try:
        pooled = engine.raw_connection()
    except error as exc:  # the pool hands out the driver's own connect error
        raise driver_error(engine.dialect, sql, params, exc, invalidated=True) from exc
    try:
        yield pooled
    except error as exc:
        invalidated = engine.dialect.is_disconnect(exc, pooled.dbapi_connection, None)
        if invalidated:
            pooled.invalidate(exc)
        raise driver_error(engine.dialect, sql, params, exc, invalidated) from exc
    finally:
        pooled.close()
