"""Counter caches: delta rows written with the child's change, and the task that applies them.

Owns every statement on `counter_deltas`, the ORM hooks that write delta rows, the flush task
(`flush`), `increment`/`decrement` and `reconcile`. It does not own statements on `tasks`
(the flush asks `store.release_unique_key`) nor on the application's tables beyond adding to
a counter column and recounting it.

Why a counter stays exact, without writers ever touching the parent row:

    writer  (its own transaction)   [PG: shared advisory lock on the counter]
            INSERT a delta row; enqueue flush with unique_key counter:<table>:<id>:<column>
    flush   (one transaction)       [PG: exclusive advisory lock on the counter]
            give up the flush's unique_key; DELETE the deltas (SKIP LOCKED) RETURNING delta;
            UPDATE parent SET column = column + sum

A writer that finds a flush already queued counts on that flush to read its delta, so the flush
must not read before such a writer commits, and no writer may count on a flush that has read.
On PostgreSQL the advisory lock gives both: writers hold it shared (they never wait on one
another), the flush exclusively, and the flush releases its unique_key under that lock, so a
later writer enqueues a fresh flush. On SQLite the database's single write lock does the same
(the writer holds it from its first write to its commit, the flush runs under BEGIN IMMEDIATE).

MySQL/MariaDB have no shared advisory lock (GET_LOCK is exclusive and belongs to the session,
not the transaction), so the parent row is the lock: writers read it LOCK IN SHARE MODE (what
InnoDB's own foreign-key check on inserting the child already does), the flush reads it FOR
UPDATE, which it would take anyway to add the sum. Row locks end with the transaction, like
PostgreSQL's xact advisory locks. The cost: a writer also waits for an application
transaction that holds the parent row for update, and a transaction that inserts a child and
then updates the parent can deadlock with another doing the same (as with a foreign key).
"""

from __future__ import annotations

import dataclasses
import decimal
import hashlib
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, orm

from dbqueue import config, errors, serializer, store, upsert
from dbqueue.enqueue import enqueue as enqueue_task  # the package's `enqueue` is the function
from dbqueue.schema import ROW_ID_LENGTH, counter_deltas, db_now, too_long

log = logging.getLogger("dbqueue.counters")

DEFAULT_QUEUE = "counter_caches"
FLUSH_BATCH = 10_000  # deltas one flush applies; it enqueues a successor for the rest
# How long a flush or a recount waits for a lock (writers in flight, the parent row) before it
# gives up and tries again later. Below PostgreSQL's deadlock_timeout (1 s by default), so in a
# lock cycle with an application transaction the flush gives way, never the application.
LOCK_TIMEOUT_MS = 500
RECONCILE_BATCH = 200  # parent rows recounted per transaction
RECONCILE_TRIES = 50  # attempts at one batch whose locks keep timing out

# Advisory-lock namespace (the two-int form, so it cannot collide with one-bigint locks).
_LOCK_NAMESPACE = 0x64627163  # "dbqc"
_PENDING = "dbqueue_counter_deltas"  # Session.info key of the deltas of the current flush


class CounterCacheError(errors.DbqueueError, ValueError):
    """A counter cache that cannot work: not a many-to-one relationship, a composite primary
    key, a missing column, a counter declared twice, a bad queue or `by`. Raised at
    declaration (import) or by `increment`; also a `ValueError`."""


@dataclasses.dataclass(frozen=True, eq=False)
class Counter:
    """One cached count: `parent_table.column` counts the child rows pointing at each parent.

    Returned by `async_counter_cache` and listed by `registered()`.

    Attributes:
        child: the mapper of the child class (`Comment`).
        relationship: the relationship's name on the child (`"post"`).
        fk_column: the child's foreign key column.
        parent: the mapper of the parent class (`Post`).
        parent_table: the parent's table.
        pk_column: the parent's primary key column.
        column: the parent's counter column (`"comments_count"`).
        queue: the queue of the flush tasks.
    """

    child: orm.Mapper[Any]
    relationship: str
    fk_column: sa.Column[Any]
    parent: orm.Mapper[Any]
    parent_table: sa.Table
    pk_column: sa.Column[Any]
    column: str
    queue: str

    @property
    def name(self) -> str:
        """`Child.relationship`, as `dbqueue counters reconcile --only` takes it."""
        return f"{self.child.class_.__name__}.{self.relationship}"

    @property
    def fk_key(self) -> str:
        """The child's attribute name for the foreign key column."""
        return self.child.get_property_by_column(self.fk_column).key

    def __repr__(self) -> str:
        return f"<counter {self.parent_table.fullname}.{self.column} of {self.name}>"


_counters: dict[tuple[str, str], Counter] = {}
_by_child: dict[orm.Mapper[Any], list[Counter]] = {}
_models: dict[str, str] = {}  # parent table name -> "module:qualname" of its mapped class


# -- declaring counters ----------------------------------------------------------------------


def async_counter_cache(
    relationship: Any, column: str | None = None, *, queue: str = DEFAULT_QUEUE
) -> Counter:
    """Keep `parent.<column>` equal to the number of children, through delta rows.

    Each ORM flush that inserts, deletes or re-parents a child writes a delta row in the same
    transaction, and at most one queued flush task per counter applies the deltas. Declare it
    at import time, in a module the workers import too.

    Args:
        relationship: a many-to-one relationship attribute such as `Comment.post`, joining one
            foreign key column to the parent's single-column primary key.
        column: the parent's integer column to keep. Default `<child table>_count`
            (`comments_count`).
        queue: the queue of the flush tasks. Default `"counter_caches"`.

    Returns:
        The `Counter`.

    Raises:
        CounterCacheError: not a relationship attribute, not many-to-one, a composite primary
            key, a join other than foreign key to primary key, a missing column, a counter
            already declared, or a bad queue name.
    """
    prop = getattr(relationship, "property", None)
    if not isinstance(prop, orm.RelationshipProperty):
        raise CounterCacheError(
            f"async_counter_cache() takes a relationship attribute such as Comment.post, "
            f"not {relationship!r}"
        )
    child = prop.parent
    where = f"{child.class_.__name__}.{prop.key}"
    if prop.direction is not orm.MANYTOONE:
        raise CounterCacheError(
            f"{where} is {prop.direction.name.lower()}; a counter cache needs a many-to-one "
            "relationship (the child's side, e.g. Comment.post)"
        )
    parent = prop.mapper
    parent_table = parent.local_table
    if not isinstance(parent_table, sa.Table):
        raise CounterCacheError(f"{parent.class_.__name__} is not mapped to a table")
    pk_columns = list(parent_table.primary_key.columns)
    if len(pk_columns) != 1:
        raise CounterCacheError(
            f"{where}: {parent_table.name} has a composite primary key; counter caches need "
            "a single-column primary key"
        )
    pairs = list(prop.local_remote_pairs or [])
    if (
        len(pairs) != 1
        or pairs[0][1] is not pk_columns[0]
        or not isinstance(pairs[0][0], sa.Column)
    ):
        raise CounterCacheError(
            f"{where} must join one foreign key column to {parent_table.name}'s primary key"
        )
    column = column or f"{child.local_table.name}_count"  # type: ignore[attr-defined]
    if column not in parent_table.c:
        raise CounterCacheError(
            f"{where}: {parent_table.name} has no column {column!r}; add an integer column "
            f"(default 0) or pass column=..."
        )
    _check_queue(queue)
    key = (parent_table.fullname, column)
    if key in _counters:
        raise CounterCacheError(
            f"{parent_table.fullname}.{column} is already counted by {_counters[key].name}; "
            "register each counter once"
        )
    counter = Counter(
        child=child,
        relationship=prop.key,
        fk_column=pairs[0][0],
        parent=parent,
        parent_table=parent_table,
        pk_column=pk_columns[0],
        column=column,
        queue=queue,
    )
    _counters[key] = counter
    _remember_model(parent_table, parent.class_)
    if child not in _by_child:
        _by_child[child] = []
        _listen(child.class_)
    _by_child[child].append(counter)
    return counter


def registered() -> list[Counter]:
    """Every counter declared in this process (`async_counter_cache`), in declaration
    order."""
    return list(_counters.values())


def _check_queue(queue: Any) -> None:
    if not isinstance(queue, str) or not 0 < len(queue) <= 100:
        raise CounterCacheError(
            f"queue must be a non-empty string of at most 100 characters, not {queue!r}"
        )


# -- ORM hooks: collect the deltas of one flush, write them at its end ------------------------


def _listen(child_class: type) -> None:
    event.listen(child_class, "after_insert", _after_insert, propagate=True)
    event.listen(child_class, "before_update", _before_update, propagate=True)
    event.listen(child_class, "before_delete", _before_delete, propagate=True)
    if not event.contains(orm.Session, "after_flush", _after_flush):
        event.listen(orm.Session, "before_flush", _before_flush)
        event.listen(orm.Session, "after_flush", _after_flush)


def _counters_of(mapper: orm.Mapper[Any]) -> list[Counter]:
    found: list[Counter] = []
    for base in mapper.iterate_to_root():
        found.extend(_by_child.get(base, ()))
    return found


def _add(conn: sa.Connection, target: Any, counter: Counter, parent_id: Any, by: int) -> None:
    if parent_id is None:
        return
    session = orm.object_session(target)
    if session is None:  # pragma: no cover - flush events always have a session
        return
    pending: dict[tuple[sa.Connection, Counter, str], int] = session.info.setdefault(_PENDING, {})
    key = (conn, counter, row_id_text(parent_id))
    pending[key] = pending.get(key, 0) + by


def _fk_value(conn: sa.Connection, target: Any, counter: Counter, *, current: bool) -> Any:
    """The child's foreign key: its value in memory, else the stored one (read on `conn`)."""
    state = sa.inspect(target)
    key = counter.fk_key
    if current and key in state.dict:
        return state.dict[key]
    history = state.attrs[key].history
    if not current and history.deleted:
        return history.deleted[0]
    if not current and key in state.dict and not history.has_changes():
        return state.dict[key]
    # Expired or never loaded: the row still holds the value (before_update/before_delete) or
    # was just written (after_insert); reading it is plain SQL on the flush's connection.
    pk = counter.child.primary_key_from_instance(target)
    where = [c == v for c, v in zip(counter.child.primary_key, pk, strict=True)]
    return conn.execute(sa.select(counter.fk_column).where(*where)).scalar_one_or_none()


def _after_insert(mapper: orm.Mapper[Any], conn: sa.Connection, target: Any) -> None:
    for counter in _counters_of(mapper):
        _add(conn, target, counter, _fk_value(conn, target, counter, current=True), +1)


def _before_update(mapper: orm.Mapper[Any], conn: sa.Connection, target: Any) -> None:
    """Re-parenting moves one from the old parent's count to the new one's."""
    state = sa.inspect(target)
    for counter in _counters_of(mapper):
        history = state.attrs[counter.fk_key].history
        if not history.has_changes():
            continue
        new = state.dict.get(counter.fk_key)
        old = _fk_value(conn, target, counter, current=False)
        if old == new:
            continue
        _add(conn, target, counter, old, -1)
        _add(conn, target, counter, new, +1)


def _before_delete(mapper: orm.Mapper[Any], conn: sa.Connection, target: Any) -> None:
    for counter in _counters_of(mapper):
        _add(conn, target, counter, _fk_value(conn, target, counter, current=False), -1)


def _before_flush(session: orm.Session, flush_context: Any, instances: Any) -> None:
    # Deltas collected by a flush that failed were rolled back with it: forget them.
    session.info.pop(_PENDING, None)


def _after_flush(session: orm.Session, flush_context: Any) -> None:
    pending: dict[tuple[sa.Connection, Counter, str], int] = session.info.pop(_PENDING, {})
    by_conn: dict[sa.Connection, list[tuple[Counter, str, int]]] = {}
    for (conn, counter, row_id), delta in pending.items():
        if delta:
            by_conn.setdefault(conn, []).append((counter, row_id, delta))
    for conn, items in by_conn.items():
        write(
            conn,
            [
                Delta(c.parent_table.fullname, row_id, c.column, delta, c.queue)
                for c, row_id, delta in items
            ],
        )


# -- writing deltas ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Delta:
    """One change to one counter: `table.column` of row `row_id` moves by `delta`."""

    table: str
    row_id: str
    column: str
    delta: int
    queue: str = DEFAULT_QUEUE


def unique_key(table: str, row_id: str, column: str) -> str:
    """The flush task's unique_key: one queued flush per counter."""
    return f"counter:{table}:{row_id}:{column}"


def row_id_text(value: Any) -> str:
    """A parent's primary key as stored in `counter_deltas.row_id` (`flush` converts back)."""
    if isinstance(value, bool) or value is None:
        raise CounterCacheError(f"{value!r} is not a usable primary key value")
    text = str(value)
    problem = too_long(text, ROW_ID_LENGTH)
    if problem:  # the driver's "value too long" (PostgreSQL, MySQL) inside the writer's flush
        raise CounterCacheError(
            f"primary key {text[:60]!r}... is {problem} (counter_deltas.row_id)"
        )
    return text


def write(conn: sa.Connection, deltas: Sequence[Delta]) -> None:
    """Insert delta rows and make sure a flush is queued for each counter, all on `conn`.

    In inline mode (`dbqueue.inline()`) the deltas are applied here and now instead, in the
    writer's transaction, so tests see the counter without a worker.
    """
    if not deltas:
        return
    deltas = sorted(deltas, key=lambda d: (d.table, d.row_id, d.column))
    lock_shared(conn, [(d.table, d.row_id, d.column) for d in deltas])
    insert_deltas(conn, deltas)
    settings = config.current()
    for d in deltas:
        if settings.inline:
            table = _parent_table(conn, d.table, _models.get(d.table))
            apply(conn, table, d.row_id, d.column, take(conn, d.table, d.row_id, d.column)[0])
            continue
        _enqueue_flush(conn, d.table, d.row_id, d.column, d.queue)


def _enqueue_flush(conn: sa.Connection, table: str, row_id: str, column: str, queue: str) -> None:
    enqueue_task(
        flush,
        args=(table, row_id, column),
        kwargs={"queue": queue, "model": _models.get(table)},
        unique_key=unique_key(table, row_id, column),
        queue=queue,
        connection=conn,
    )


def lock_shared(conn: sa.Connection, counters: Iterable[tuple[str, str, str]]) -> None:
    """Mark this transaction as a writer of these counters, until it ends (PostgreSQL, MySQL).

    Writers share the lock, so they never wait for one another; a flush waits for them.
    """
    if upsert.is_mysql(conn):
        _lock_parents(conn, counters, exclusive=False)
        return
    if conn.dialect.name != "postgresql":
        return  # SQLite: the writer's write lock, held until commit, does the same
    for key in sorted({_lock_key(*c) for c in counters}):
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock_shared(_LOCK_NAMESPACE, key)))


def lock_exclusive(conn: sa.Connection, counters: Iterable[tuple[str, str, str]]) -> None:
    """Wait until no writer of these counters is in flight, and keep them out (PostgreSQL,
    MySQL).

    Held to the end of the transaction; gives up after LOCK_TIMEOUT_MS (LockNotAvailable).
    """
    if upsert.is_mysql(conn):
        _lock_parents(conn, counters, exclusive=True)
        return
    if conn.dialect.name != "postgresql":
        return  # SQLite: the transaction's write lock already excludes every writer
    conn.execute(sa.text(f"SET LOCAL lock_timeout = {int(LOCK_TIMEOUT_MS)}"))
    for key in sorted({_lock_key(*c) for c in counters}):
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_LOCK_NAMESPACE, key)))


def _lock_parents(
    conn: sa.Connection, counters: Iterable[tuple[str, str, str]], *, exclusive: bool
) -> None:
    """MySQL: lock the counters' parent rows, shared (writers) or for update (the flush, which
    gives up at once if a writer holds one: NOWAIT, error 1205 on MariaDB, 3572 on MySQL).

    Rows in primary-key order, tables in name order, so two lockers never wait in a cycle."""
    by_table: dict[str, set[str]] = {}
    for table_name, row_id, _column in counters:
        by_table.setdefault(table_name, set()).add(row_id)
    for table_name in sorted(by_table):
        table = _parent_table(conn, table_name, _models.get(table_name))
        pk = _pk_column(table)
        keys = sorted(pk_value(pk, r) for r in by_table[table_name])
        stmt = sa.select(pk).where(pk.in_(keys)).order_by(pk)
        if not exclusive:
            conn.execute(stmt.with_for_update(read=True))
            continue
        # Tries with NOWAIT, never a queued wait: InnoDB queues a writer's shared request
        # behind a waiting FOR UPDATE, so a flush waiting on one writer made the next writer
        # wait on the flush, and with the writers' own locks between them (the flush task's
        # unique key) InnoDB found a cycle and rolled back an application transaction (1213,
        # one run in five of the hot-counter test). So the flush never sits in the lock
        # queue: it asks again every few milliseconds until LOCK_TIMEOUT_MS, then gives up
        # (1205) and runs again later.
        deadline = time.monotonic() + LOCK_TIMEOUT_MS / 1000
        while True:
            try:
                with conn.begin_nested():
                    conn.execute(stmt.with_for_update(nowait=True))
                break
            except sa.exc.OperationalError as exc:
                if not _lock_timed_out(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)


def _lock_key(table: str, row_id: str, column: str) -> int:
    digest = hashlib.blake2b(f"{table}\0{row_id}\0{column}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def insert_deltas(conn: sa.Connection, deltas: Sequence[Delta]) -> None:
    """Add delta rows (one per counter change)."""
    conn.execute(
        sa.insert(counter_deltas).values(created_at=db_now()),
        [
            {"table_name": d.table, "row_id": d.row_id, "column_name": d.column, "delta": d.delta}
            for d in deltas
        ],
    )


def _remember_model(table: sa.Table, cls: type) -> None:
    """Note which class maps a parent table, so flush tasks can name it to the worker."""
    # A class of the main script (`__mp_main__` in multiprocessing children) is not importable
    # by a worker: the worker reflects the table instead.
    if cls.__module__ in ("__main__", "__mp_main__"):
        return
    _models.setdefault(table.fullname, serializer.handler_name(cls))


def _resolve(model: Any) -> sa.Table:
    """The table of a mapped class or a Table."""
    if isinstance(model, sa.Table):
        return model
    mapper = sa.inspect(model, raiseerr=False)
    if isinstance(mapper, orm.Mapper) and isinstance(mapper.local_table, sa.Table):
        _remember_model(mapper.local_table, mapper.class_)
        return mapper.local_table
    raise CounterCacheError(f"expected a mapped class or a Table, not {model!r}")


def increment(
    model: Any,
    row_id: Any,
    column: str,
    by: int = 1,
    *,
    session: orm.Session | None = None,
    connection: sa.Connection | None = None,
    queue: str = DEFAULT_QUEUE,
) -> None:
    """Add `by` to `model.column` of row `row_id`, through a delta row and a flush.

    For counters the ORM hooks do not see: Core inserts, bulk deletes, any other count.
    Inside `session`'s or `connection`'s transaction when given, else in its own.

    Args:
        model: the parent's mapped class or Table (`User`).
        row_id: the parent row's primary key.
        column: the counter column (`"logins_count"`).
        by: the change, an int; 0 writes nothing.
        session: a Session whose transaction the delta joins.
        connection: a Connection whose transaction the delta joins.
        queue: the queue of the flush task. Default `"counter_caches"`.

    Raises:
        CounterCacheError: a model that is not a mapped class or Table, a missing column, a
            `by` that is not an int, or a bad queue name.
    """
    table = _resolve(model)
    if column not in table.c:
        raise CounterCacheError(f"{table.fullname} has no column {column!r}")
    if isinstance(by, bool) or not isinstance(by, int):
        raise CounterCacheError(f"by must be an int, not {by!r}")
    _check_queue(queue)
    delta = Delta(table.fullname, row_id_text(row_id), column, by, queue)
    if by == 0:
        return
    if session is not None:
        write(session.connection(), [delta])
    elif connection is not None:
        write(connection, [delta])
    else:
        with config.current().get_engine().begin() as conn:
            write(conn, [delta])


def decrement(model: Any, row_id: Any, column: str, by: int = 1, **options: Any) -> None:
    """Subtract `by` from a counter: `increment(model, row_id, column, -by, ...)`.

    Args:
        model: the parent's mapped class or Table.
        row_id: the parent row's primary key.
        column: the counter column.
        by: how much to subtract.
        **options: `increment`'s `session`, `connection` or `queue`.

    Raises:
        CounterCacheError: as `increment`.
    """
    increment(model, row_id, column, -by, **options)


# -- the flush task ---------------------------------------------------------------------------


def flush(
    table: str, row_id: str, column: str, queue: str = DEFAULT_QUEUE, model: str | None = None
) -> int:
    """The task: apply a counter's pending deltas in one transaction; returns the sum applied.

    Takes the counter's lock (PostgreSQL; SQLite's BEGIN IMMEDIATE is the lock there), gives
    up this run's unique_key so later writers enqueue a new flush, then deletes the delta rows
    and adds their sum. When more than FLUSH_BATCH deltas wait, a successor is enqueued in the
    same transaction. Enqueued by the writers; you do not call it yourself.

    Args:
        table: the parent table's name.
        row_id: the parent's primary key, as text.
        column: the counter column.
        queue: the queue for a successor flush.
        model: the parent's mapped class as `module:qualname`, to convert `row_id` back.

    Raises:
        sqlalchemy.exc.OperationalError: on PostgreSQL, the lock wait ran past
            `LOCK_TIMEOUT_MS` behind a writer's open transaction; the task is retried a
            second or so later.
    """
    engine = config.current().get_engine()
    with engine.begin() as conn:
        lock_exclusive(conn, [(table, row_id, column)])
        store.release_unique_key(conn, unique_key(table, row_id, column))
        total, count = take(conn, table, row_id, column, FLUSH_BATCH)
        if total:
            apply(conn, _parent_table(conn, table, model), row_id, column, total)
        if count >= FLUSH_BATCH:
            _enqueue_flush(conn, table, row_id, column, queue)
    return total


def _flush_retry_delay(attempts: int, exc: BaseException) -> float:
    """A flush that timed out waiting for writers tries again soon, not after minutes."""
    return float(min(attempts, 30))


flush.retry_delay = _flush_retry_delay  # type: ignore[attr-defined]


def take(
    conn: sa.Connection, table: str, row_id: str, column: str, limit: int | None = None
) -> tuple[int, int]:
    """Delete a counter's delta rows, skipping rows another flush holds; (sum, rows taken)."""
    ids = (
        sa.select(counter_deltas.c.id)
        .where(
            counter_deltas.c.table_name == table,
            counter_deltas.c.row_id == row_id,
            counter_deltas.c.column_name == column,
        )
        .order_by(counter_deltas.c.id)
        .with_for_update(skip_locked=True)
    )
    if limit is not None:
        ids = ids.limit(limit)
    if upsert.is_mysql(conn):
        # MySQL deletes from no table its own subquery reads (1093), and MariaDB takes no LIMIT
        # in an IN subquery (1235): lock the rows, then delete them by id.
        rows = conn.execute(ids.add_columns(counter_deltas.c.delta)).all()
        if rows:
            conn.execute(
                sa.delete(counter_deltas).where(counter_deltas.c.id.in_([r[0] for r in rows]))
            )
        return sum(int(r[1]) for r in rows), len(rows)
    stmt = (
        sa.delete(counter_deltas)
        .where(counter_deltas.c.id.in_(ids.scalar_subquery()))
        .returning(counter_deltas.c.delta)
    )
    deltas = [int(r[0]) for r in conn.execute(stmt)]
    return sum(deltas), len(deltas)


def apply(conn: sa.Connection, table: sa.Table, row_id: str, column: str, total: int) -> bool:
    """Add `total` to the counter; False when the parent row no longer exists."""
    if not total:
        return True
    pk = _pk_column(table)
    counter = table.c[column]
    stmt = (
        sa.update(table)
        .where(pk == pk_value(pk, row_id))
        .values({column: sa.func.coalesce(counter, 0) + total})
    )
    if conn.execute(stmt).rowcount == 0:
        log.info("counter %s.%s: row %s no longer exists", table.fullname, column, row_id)
        return False
    return True


def pending(conn: sa.Connection, table: str | None = None) -> int:
    """How many delta rows wait to be applied (of one table, or all).

    Args:
        conn: a Connection to the database.
        table: a parent table's name; None counts every table's.
    """
    stmt = sa.select(sa.func.count()).select_from(counter_deltas)
    if table is not None:
        stmt = stmt.where(counter_deltas.c.table_name == table)
    return int(conn.execute(stmt).scalar_one())


def _pk_column(table: sa.Table) -> sa.Column[Any]:
    columns = list(table.primary_key.columns)
    if len(columns) != 1:
        raise CounterCacheError(f"{table.fullname} needs a single-column primary key")
    return columns[0]


def pk_value(column: sa.Column[Any], text: str) -> Any:
    """`row_id` text back to a value of the primary key's type (int, str, UUID, Decimal)."""
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        return text
    if python_type is str:
        return text
    if python_type in (int, uuid.UUID, decimal.Decimal):
        return python_type(text)
    raise CounterCacheError(
        f"{column.table.name}.{column.name}: primary keys of type {python_type.__name__} are "
        "not supported by counter caches"
    )


def _parent_table(conn: sa.Connection, name: str, model: str | None) -> sa.Table:
    """The parent's Table: from its mapped class (exact key types), else reflected."""
    if model is not None:
        return _resolve(serializer.import_handler(model))
    for counter in _counters.values():
        if counter.parent_table.fullname == name:
            return counter.parent_table
    schema, _, bare = name.rpartition(".")
    return sa.Table(bare, sa.MetaData(), schema=schema or None, autoload_with=conn)


# -- recounting -------------------------------------------------------------------------------


def counters_of(relationship: Any, column: str | None = None) -> list[Counter]:
    """The registered counters of a relationship attribute (one column, or all of them)."""
    prop = getattr(relationship, "property", None)
    found = [
        c
        for c in _counters.values()
        if isinstance(prop, orm.RelationshipProperty)
        and c.child is prop.parent
        and c.relationship == prop.key
        and (column is None or c.column == column)
    ]
    if not found:
        raise CounterCacheError(
            f"no counter cache is registered for {relationship!r}"
            + (f" with column {column!r}" if column else "")
            + ": call async_counter_cache() first (import the module that does)"
        )
    return found


def reconcile(
    relationship: Any,
    column: str | None = None,
    *,
    batch_size: int = RECONCILE_BATCH,
    engine: sa.Engine | None = None,
) -> int:
    """Recount every parent from the child rows; returns how many counters were wrong.

    Pending deltas of each recounted parent are deleted in the same transaction. On
    PostgreSQL each batch holds the counters' locks exclusively, so a writer in flight either
    committed before the recount (its child is counted, its delta deleted) or commits after it
    (its delta is applied later). `dbqueue counters reconcile` runs it for every counter.

    Args:
        relationship: the relationship attribute a counter was declared on (`Comment.post`).
        column: which of its counters, when it has several. Default: all of them.
        batch_size: parents recounted per transaction.
        engine: the Engine to use. Default: `dbqueue.configure()`'s.

    Returns:
        How many parent rows had a wrong count (now fixed).

    Raises:
        CounterCacheError: no counter is declared for `relationship` (import its module).
    """
    return sum(
        reconcile_counter(c, engine=engine, batch_size=batch_size)
        for c in counters_of(relationship, column)
    )


def reconcile_counter(
    counter: Counter, *, engine: sa.Engine | None = None, batch_size: int = RECONCILE_BATCH
) -> int:
    """Recount one counter, `batch_size` parents per transaction; returns how many were wrong."""
    engine = engine or config.current().get_engine()
    fixed = 0
    last: Any = None
    tries = 0
    while True:
        try:
            with engine.begin() as conn:
                pks = parent_ids(conn, counter, last, batch_size)
                if not pks:
                    return fixed
                fixed += recount(conn, counter, pks)
        except sa.exc.OperationalError as exc:
            tries += 1
            if not _lock_timed_out(exc) or tries > RECONCILE_TRIES:
                raise
            time.sleep(0.1 * tries)  # writers were in flight: let them commit, try the batch again
            continue
        tries = 0
        last = pks[-1]


def _lock_timed_out(exc: sa.exc.OperationalError) -> bool:
    if getattr(exc.orig, "sqlstate", None) == "55P03":  # PostgreSQL: lock_not_available
        return True
    args: tuple[Any, ...] = tuple(getattr(exc.orig, "args", ()))
    # MySQL/MariaDB: lock wait timeout exceeded (MariaDB's NOWAIT too), MySQL 8's NOWAIT
    return len(args) > 0 and args[0] in (1205, 3572)


def parent_ids(conn: sa.Connection, counter: Counter, after: Any, limit: int) -> list[Any]:
    """The next `limit` parent primary keys after `after`, in order."""
    pk = counter.pk_column
    stmt = sa.select(pk).order_by(pk).limit(limit)
    if after is not None:
        stmt = stmt.where(pk > after)
    return [r[0] for r in conn.execute(stmt)]


def recount(conn: sa.Connection, counter: Counter, pks: Sequence[Any]) -> int:
    """Set the counter of these parents from count(*) and drop their pending deltas."""
    table, column = counter.parent_table.fullname, counter.column
    row_ids = [row_id_text(pk) for pk in pks]
    lock_exclusive(conn, [(table, r, column) for r in row_ids])
    child_table = counter.fk_column.table
    actual = (
        sa.select(sa.func.count())
        .select_from(child_table)
        .where(counter.fk_column == counter.pk_column)
        .scalar_subquery()
    )
    target = counter.parent_table.c[column]
    stmt = (
        sa.update(counter.parent_table)
        .where(counter.pk_column.in_(list(pks)), target.is_distinct_from(actual))
        .values({column: actual})
    )
    fixed = int(conn.execute(stmt).rowcount)
    drop_deltas(conn, table, column, row_ids)
    return fixed


def drop_deltas(conn: sa.Connection, table: str, column: str, row_ids: Iterable[str]) -> int:
    """Delete the pending deltas of these rows of one counter (a recount replaced them)."""
    stmt = sa.delete(counter_deltas).where(
        counter_deltas.c.table_name == table,
        counter_deltas.c.column_name == column,
        counter_deltas.c.row_id.in_(list(row_ids)),
    )
    return int(conn.execute(stmt).rowcount)
