"""MySQL 8.0+ and MariaDB 10.6+ (InnoDB, READ COMMITTED; config.py sets up the connection).

What differs from PostgreSQL:
- No UPDATE ... RETURNING (MariaDB has it for INSERT and DELETE only, MySQL for nothing), and
  MySQL cannot UPDATE a table from a subquery that reads it with LIMIT. So the claim is a
  transaction of two statements: a locking read of the candidates and their columns (`FOR
  UPDATE SKIP LOCKED`, one read per queue through `ix_tasks_queue_claimable (status, queue,
  priority, run_at, id)`, as on PostgreSQL), then the UPDATE of the ids taken, which also
  checks the worker's row (the limited claim reads the rows it took in a third). The
  worker's claim is therefore a transaction, never autocommit.
- A lone enqueue is one INSERT in autocommit (`_insert_alone`).
- No partial unique index: `unique_live`, a stored generated column (the key's hash while the
  task is queued or running, NULL after), carries the unique index; a duplicate key is the
  server's error 1062 on that index, which ends that statement only.
- No LISTEN/NOTIFY: workers poll (`--sleep-delay`, and the next run_at at the latest).
- No advisory locks: the limited claims serialise on the row of dbqueue's alembic version
  table, locked `FOR UPDATE` until the claim's transaction ends.
- Deadlocks (1213) and lock wait timeouts (1205) end the transaction's work: the worker runs
  the whole transaction again (`is_transient`).
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from dbqueue.engines import base
from dbqueue.engines.base import CLAIM_COLUMNS, NewTask, Outcome
from dbqueue.schema import UNIQUE_LIVE, Status, status_is, tasks

DEADLOCK = 1213
LOCK_WAIT_TIMEOUT = 1205
DUPLICATE_KEY = 1062
UNIQUE_INDEX = "ix_tasks_unique_key"


BATCH_ROWS = 1000  # rows per multi-row INSERT (enqueue_many's batches)
BATCH_BYTES = 4 << 20  # payload bytes per INSERT, well under max_allowed_packet (16 MiB)
_ROW = (
    "(%s, %s, COALESCE(%s, TIMESTAMPADD(MICROSECOND, ROUND(%s * 1000000), UTC_TIMESTAMP(6))), "
    "'queued', %s, %s, 0, %s, %s, UTC_TIMESTAMP(6))"
)


_INSERT = (
    "INSERT INTO tasks (queue, priority, run_at, status, handler, payload, attempts, "
    "max_attempts, timeout, created_at) VALUES "
)
_INSERT_ONE = _INSERT + _ROW
#: A task to run now (no run_at, no delay: most enqueues) as the lone enqueue sends it: run_at
#: is the server's clock itself, where _ROW's COALESCE of two parameters and a shifted clock
#: cost the server time (hand-sent, 0.79x the raw INSERT against 0.85x, interleaved).
_INSERT_NOW = _INSERT + "(%s, %s, UTC_TIMESTAMP(6), 'queued', %s, %s, 0, %s, %s, UTC_TIMESTAMP(6))"
_ENCODED = {sql: sql.encode() for sql in (_INSERT_NOW, _INSERT_ONE)}  # ASCII: any encoding


def _row_params(t: NewTask) -> tuple[Any, ...]:
    """The parameters of one `_ROW` (a task without meta or concurrency key)."""
    run_at = t.run_at.astimezone(dt.timezone.utc).replace(tzinfo=None) if t.run_at else None
    return (t.queue, t.priority, run_at, float(t.delay), t.handler, t.payload, t.max_attempts,
            t.timeout)  # fmt: skip


def _insert_rows(conn: sa.Connection, new: Sequence[NewTask]) -> list[int]:
    """One multi-row INSERT ... RETURNING id (MariaDB); the ids in the tasks' order (drawn
    in VALUES order within the statement, so sorted they are in order)."""
    params = tuple(p for t in new for p in _row_params(t))
    sql = f"{_INSERT}{', '.join([_ROW] * len(new))} RETURNING id"
    return sorted(int(r[0]) for r in conn.exec_driver_sql(sql, params))


def _insert_alone(engine: sa.Engine, task: NewTask) -> int | None:
    """The INSERT sent to the mysqlclient connection of a pooled connection in autocommit:
    one round trip, as a hand-written single-row INSERT. (In a transaction it is INSERT, then
    COMMIT; SQLAlchemy's execution path around it cost as much client time again.) The
    statement goes to the connection's `query` with the parameters quoted by its `literal`,
    as a cursor's `execute` would send it, without the cursor: its creation, result handling
    and close were a tenth of a lone enqueue's client time.

    Turning autocommit on is a round trip of its own, so the connection is left in it and
    only the next transaction's begin turns it off (config._create_mysql's "begin" hook,
    which reads AUTOCOMMIT_LEFT): enqueue after enqueue pays it once. Only on connections
    of an Engine dbqueue made (where that hook is) and through mysqlclient."""
    from dbqueue import config

    if engine.dialect.driver != "mysqldb":
        return None
    if task.run_at is None and task.delay == 0:
        sql = _INSERT_NOW
        params: tuple[Any, ...] = (task.queue, task.priority, task.handler, task.payload,
                                   task.max_attempts, task.timeout)  # fmt: skip
    else:
        sql, params = _INSERT_ONE, _row_params(task)
    with base.pooled_driver(engine, sql, params) as pooled:
        if not pooled.info.get(config.MYSQL_OWN):
            return None
        driver: Any = pooled.dbapi_connection  # a MySQLdb connection
        if not driver.get_autocommit():  # the session's flag as last reported: no round trip
            driver.autocommit(True)
            pooled.info[config.MYSQL_AUTOCOMMIT_LEFT] = True
        literal = driver.literal
        driver.query(_ENCODED[sql] % tuple([literal(p) for p in params]))
        return int(driver.insert_id())


@functools.lru_cache(maxsize=1)
def _insert_statement() -> Any:
    """One row; its id is the connection's last insert id (no RETURNING on MySQL)."""
    return sa.insert(tasks).values(base.insert_columns())


def _error_code(exc: BaseException) -> int | None:
    orig = getattr(exc, "orig", exc)
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _in_transaction(conn: sa.Connection, what: str) -> None:
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        raise ValueError(f"{what} on MySQL needs a transaction: its row locks end with it")


class MySQL(base.Engine):
    name = "mysql"

    def insert_one(self, conn: sa.Connection, task: NewTask, notify: bool = False) -> int:
        result = conn.execute(_insert_statement(), base.insert_values(task))
        return int(result.lastrowid)

    def insert_alone(self, engine: sa.Engine, task: NewTask, notify: bool = False) -> int | None:
        if task.meta is not None or task.concurrency_key is not None:
            return None  # SQLAlchemy's INSERT, in a transaction (JSON, the key's columns)
        return _insert_alone(engine, task)

    def insert_many(self, conn: sa.Connection, new: Sequence[NewTask]) -> list[int]:
        """MariaDB (INSERT ... RETURNING): multi-row INSERTs written here with the driver's
        placeholders, at most BATCH_BYTES of payload each (SQLAlchemy's, with its type
        processing of 14 columns a row, ran at a tenth of the raw executemany's rate);
        tasks with meta or a concurrency key go through SQLAlchemy's. MySQL: one INSERT per
        task (no RETURNING; a multi-row INSERT's ids are consecutive only under
        innodb_autoinc_lock_mode 0 or 1, and MySQL 8 defaults to 2)."""
        if not conn.dialect.insert_returning:
            return [self.insert_one(conn, task) for task in new]
        if any(t.meta is not None or t.concurrency_key is not None for t in new):
            return super().insert_many(conn, new)
        ids: list[int] = []
        chunk: list[NewTask] = []
        size = 0
        for task in new:
            chunk.append(task)
            size += len(task.payload)
            if size >= BATCH_BYTES or len(chunk) >= BATCH_ROWS:
                ids += _insert_rows(conn, chunk)
                chunk, size = [], 0
        if chunk:
            ids += _insert_rows(conn, chunk)
        return ids

    def insert_if_absent(self, conn: sa.Connection, task: NewTask) -> int | None:
        try:
            return self.insert_one(conn, task)
        except sa.exc.IntegrityError as exc:
            if _error_code(exc) == DUPLICATE_KEY and UNIQUE_INDEX in str(exc.orig):
                return None  # the key is held; only this statement was undone
            raise

    def unique_key_is(self, key: str) -> sa.ColumnElement[bool]:
        """Through `unique_live`'s index (the key's hash), then the key itself."""
        return sa.and_(
            sa.literal_column(UNIQUE_LIVE) == sa.func.sha2(sa.literal(key), 256),
            tasks.c.unique_key == key,
        )

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
        _in_transaction(conn, "a claim")
        if limited:
            self.lock_limited_claims(conn)
        values = {"claim_limit": limit}
        found: list[Any] = []
        for queue in queues or (None,):
            found.extend(conn.execute(_candidates(queue, exclude, limited), values).all())
        found.sort(key=_ORDER)  # merged in claim order; the rest is left to others at commit
        if limited:
            found = _trimmed(found)
        taken = found[:limit]
        ids = [r.id for r in taken]
        if not ids:
            return []
        claim = _CLAIM_REGISTERED if registered else _CLAIM
        if not conn.execute(claim, {"claim_worker": worker, "claimed_ids": ids}).rowcount:
            return []  # presumed dead: its row is gone (a rescue deleting it waited for us)
        if limited:  # its candidates carry the limits' columns: read the rows taken
            return list(conn.execute(_CLAIMED, {"claimed_ids": ids}).all())
        # the locking read returned the claim's columns; only `attempts` changed since
        a = _ATTEMPTS  # (a namedtuple's _replace per row cost more than the rest here)
        return [Claimed._make((*r[:a], r[a] + 1, *r[a + 1 :])) for r in taken]

    @functools.lru_cache(maxsize=32)  # noqa: B019 (one instance per engine, never freed)
    def claim_statement(
        self,
        queues: tuple[str, ...] | None,
        registered: bool = False,
        exclude: tuple[str, ...] = (),
        limited: bool = False,
    ) -> Any:
        """The locking read of one queue's candidates (the claim's first statement)."""
        return _candidates(queues[0] if queues else None, exclude, limited)

    def complete_many(
        self, conn: sa.Connection, worker: str, outcomes: Sequence[Outcome]
    ) -> set[int] | None:
        """One UPDATE for the batch, each row's values picked by `CASE id`, fenced on the
        worker and each row's attempt; the ids written, read back only when some were not.

        Its text is written here with the driver's placeholders, not built from SQLAlchemy
        constructs: a CASE of n literals was n expression objects per batch (measured: an
        eighth of a MariaDB drain's client time). The primary key is named (FORCE INDEX):
        MariaDB otherwise walked a status-led index of every running row."""
        ids = [o.id for o in outcomes]
        marks = ", ".join(["%s"] * len(ids))
        params: list[Any] = []
        assignments = []
        for column, values in (
            ("result", [o.result for o in outcomes]),
            ("error", [o.error for o in outcomes]),
        ):
            if all(v is None for v in values):
                assignments.append(f"{column} = NULL")
                continue
            assignments.append(f"{column} = CASE id{' WHEN %s THEN %s' * len(ids)} END")
            for task_id, value in zip(ids, values, strict=True):
                params += (task_id, value)
        attempts = {o.attempts for o in outcomes}
        if len(attempts) == 1:
            attempt_fence = "attempts = %s"
            fence_params: list[Any] = [attempts.pop()]
        else:
            attempt_fence = f"attempts = CASE id{' WHEN %s THEN %s' * len(ids)} END"
            fence_params = [x for o in outcomes for x in (o.id, o.attempts)]
        sql = (
            "UPDATE tasks FORCE INDEX (PRIMARY) SET status = 'succeeded', "
            f"{', '.join(assignments)}, locked_by = NULL, locked_at = NULL, "
            f"finished_at = UTC_TIMESTAMP(6) WHERE id IN ({marks}) AND status = 'running' "
            f"AND locked_by = %s AND {attempt_fence}"
        )
        count = conn.exec_driver_sql(sql, (*params, *ids, worker, *fence_params)).rowcount
        if count == len(outcomes):
            return set(ids)
        held = sa.select(tasks.c.id, tasks.c.attempts).where(
            tasks.c.id.in_(ids), status_is(Status.SUCCEEDED), tasks.c.locked_by.is_(None)
        )
        mine = {(o.id, o.attempts) for o in outcomes}
        return {r.id for r in conn.execute(held) if (r.id, r.attempts) in mine}

    def update_returning(
        self,
        conn: sa.Connection,
        where: Any,
        values: dict[str, Any],
        *columns: Any,
        params: dict[str, Any] | None = None,
    ) -> list[Any]:
        """The rows locked `FOR UPDATE`, updated by id (the condition checked again), then
        their `columns` read: three statements in the caller's transaction."""
        params = params or {}
        locked = sa.select(tasks.c.id).where(where).with_for_update()
        ids = [r[0] for r in conn.execute(locked, params)]
        if not ids:
            return []
        by_id = tasks.c.id.in_(ids)
        conn.execute(sa.update(tasks).where(by_id, where).values(values), params)
        if [c.key for c in columns] == ["id"]:
            return [(i,) for i in ids]
        return list(conn.execute(sa.select(*columns).where(by_id)))

    def delete_ids(self, conn: sa.Connection, ids: sa.Select[Any]) -> int:
        """Read the ids first: MySQL takes no LIMIT in an IN subquery."""
        found = list(conn.execute(ids).scalars())
        if not found:
            return 0
        return int(conn.execute(sa.delete(tasks).where(tasks.c.id.in_(found))).rowcount)

    def lock_limited_claims(self, conn: sa.Connection) -> None:
        _in_transaction(conn, "a limited claim")
        from dbqueue.database import VERSION_TABLE

        conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE} FOR UPDATE"))

    def limit_idle(self, conn: sa.Connection, seconds: float) -> None:
        """MariaDB's `idle_transaction_timeout` (whole seconds). It is the session's, not the
        transaction's: only on connections of an Engine dbqueue made, whose pool sets it back
        to none when the connection is returned (config._create_mysql). MySQL has none."""
        from dbqueue import config

        info = conn.connection.info
        if getattr(conn.dialect, "is_mariadb", False) and info.get(config.MYSQL_OWN):
            conn.exec_driver_sql(f"SET SESSION idle_transaction_timeout = {max(1, round(seconds))}")
            info[config.MYSQL_IDLE_LIMITED] = True

    def is_transient(self, exc: BaseException) -> bool:
        return _error_code(exc) in (DEADLOCK, LOCK_WAIT_TIMEOUT)


_OWN_ROW = base.own_worker_row().with_for_update(read=True)

_CLAIM = (
    sa.update(tasks)
    .where(
        tasks.c.id.in_(sa.bindparam("claimed_ids", expanding=True)),
        status_is(Status.QUEUED),
    )
    .values(base.claimed_values())
)

#: A registered worker claims only while its row in `workers` exists: the UPDATE reads it
#: `LOCK IN SHARE MODE`, so a rescue deleting the row waits for the claim's commit, or the
#: claim for the rescue's (and then takes nothing). In the UPDATE rather than a statement of
#: its own: one round trip less per claim.
_CLAIM_REGISTERED = _CLAIM.where(sa.exists(_OWN_ROW))

_CLAIMED = sa.select(*CLAIM_COLUMNS).where(
    tasks.c.id.in_(sa.bindparam("claimed_ids", expanding=True))
)


@functools.lru_cache(maxsize=64)
def _candidates(queue: str | None, exclude: tuple[str, ...], limited: bool) -> Any:
    """`SELECT id, priority, run_at ... ORDER BY priority, run_at, id LIMIT n FOR UPDATE SKIP
    LOCKED` for one queue (or every queue): base.ready_rows, built once. (A locking read
    cannot be a derived table of the UPDATE, as PostgreSQL's CTE is.)"""
    stmt = base.ready_rows(queue, sa.bindparam("claim_limit", type_=sa.Integer), exclude, limited)
    if not limited:  # the rows' own columns, so that no read follows the UPDATE
        stmt = stmt.with_only_columns(*CLAIM_COLUMNS)
    return stmt


#: A claimed row as the claim returns it (CLAIM_COLUMNS' names, read by attribute).
Claimed = collections.namedtuple(
    "Claimed",
    "id queue priority run_at handler payload attempts max_attempts timeout meta",
)
assert Claimed._fields == tuple(c.key for c in CLAIM_COLUMNS)
_ATTEMPTS = Claimed._fields.index("attempts")


def _ORDER(row: Any) -> tuple[Any, ...]:
    return (row.priority, row.run_at, row.id)


def _trimmed(candidates: list[Any]) -> list[Any]:
    """limits.trimmed in Python, on the locked candidates in claim order: a row is taken when
    it is the first of its key (or has none) and the first of its queue (or the queue has no
    cap), each rank counted over every candidate, as row_number() does there."""
    keys: set[Any] = set()
    queues: set[Any] = set()
    kept = []
    for row in candidates:
        first_of_key = row.concurrency_key is None or row.concurrency_key not in keys
        first_of_queue = not row.capped or row.queue not in queues
        keys.add(row.concurrency_key)
        queues.add(row.queue)
        if first_of_key and first_of_queue:
            kept.append(row)
    return kept


ENGINE = MySQL()
