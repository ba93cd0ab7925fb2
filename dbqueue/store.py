"""Every SQL statement on `tasks` and `workers`: one function per state transition.

    insert    (new)              -> queued
    claim     queued             -> running    (SKIP LOCKED on PostgreSQL and MySQL,
                                                BEGIN IMMEDIATE on SQLite: engines/)
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

import datetime as dt
import functools
import itertools
import logging
import operator
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from dbqueue import engines, loose_scan
from dbqueue.engines import base
from dbqueue.engines import postgresql as _postgresql
from dbqueue.engines import sqlite as _sqlite  # noqa: F401 (its INDEXED BY compiles for stats.py)
from dbqueue.engines.base import CLAIM_COLUMNS, NewTask, Outcome
from dbqueue.schema import FINISHED, Status, UTCDateTime, db_now, status_is, tasks, workers

__all__ = ["CLAIM_COLUMNS", "NewTask", "Outcome"]

log = logging.getLogger("dbqueue.store")

NOTIFY_CHANNEL = _postgresql.NOTIFY_CHANNEL


def insert_alone(engine: sa.Engine, task: NewTask, *, notify: bool = True) -> int | None:
    """A lone task of our own in one self-committing statement where the engine has that
    path (engines' `insert_alone`); None where it has not."""
    return engines.of(engine).insert_alone(engine, task, notify)


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
    engine = engines.of(conn)
    ids: list[int]
    if len(new) == 1 and new[0].unique_key is None:
        ids = [engine.insert_one(conn, new[0], notify)]
        notify = False  # carried by this statement, or not due (the limiter said so)
    elif all(t.unique_key is None for t in new):
        ids = engine.insert_many(conn, new)
    else:
        ids = [_insert_unique(conn, engine, t, replace) for t in new]
    if notify:
        notify_queues(conn, {t.queue for t in new if t.run_at is None and t.delay <= 0})
    return ids


def _insert_unique(conn: sa.Connection, engine: base.Engine, task: NewTask, replace: bool) -> int:
    if task.unique_key is None:
        return engine.insert_one(conn, task)
    inserted = engine.insert_if_absent(conn, task)
    if inserted is not None:
        return inserted
    existing = conn.execute(
        sa.select(tasks.c.id, tasks.c.status).where(
            engine.unique_key_is(task.unique_key),
            status_is(Status.QUEUED, Status.RUNNING),
        )
    ).one_or_none()
    if existing is None:  # finished between our insert and select: try once more
        return _insert_unique(conn, engine, task, replace)
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


def notify_queues(conn: sa.Connection, queues: Iterable[str]) -> None:
    """Wake listening workers (PostgreSQL; elsewhere workers poll); at most one NOTIFY per
    queue per interval from this process (engines.postgresql.NotifyLimiter)."""
    engines.of(conn).notify(conn, queues)


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
    they would run twice.

    `exclude`: queues not to claim from when `queues` is None (the paused ones). A worker
    given queues drops paused ones from its list instead, which keeps its index reads exact.

    Which rows a claim reads is `engines.base.claimable`; how it locks and takes them is
    each engine's `claim` (PostgreSQL: one UPDATE over a `FOR UPDATE SKIP LOCKED` CTE;
    SQLite: the caller's transaction began with BEGIN IMMEDIATE, so one claimer at a time).
    """
    rows = engines.of(conn).claim(
        conn,
        worker,
        limit,
        tuple(queues) if queues else None,
        registered,
        tuple(sorted(exclude)),
        limited,
    )
    rows.sort(key=_CLAIM_ORDER)  # RETURNING comes in no particular order
    return rows


_CLAIM_ORDER = operator.itemgetter(2, 3, 0)  # priority, run_at, id in CLAIM_COLUMNS


def claim_by_id(conn: sa.Connection, worker: str, task_id: int) -> list[sa.Row[Any]]:
    """queued -> running for one given task whatever its run_at (inline mode)."""
    now = db_now()
    values = {
        "status": Status.RUNNING.value,
        "locked_by": worker,
        "locked_at": now,
        "started_at": now,
        "attempts": tasks.c.attempts + 1,
    }
    where = sa.and_(tasks.c.id == task_id, status_is(Status.QUEUED))
    return engines.of(conn).update_returning(conn, where, values, *CLAIM_COLUMNS)


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
    values = {
        "status": Status.QUEUED.value,
        "locked_by": None,
        "locked_at": None,
        "attempts": tasks.c.attempts - 1,
        "snoozes": tasks.c.snoozes + 1,
        "run_at": db_now(sa.bindparam("retry_in", type_=sa.Float)),
    }
    engine = engines.of(conn)
    landed: set[int] = set()
    for params in _params(outcomes, fence_worker=worker):
        rows = engine.update_returning(conn, _fence(), values, tasks.c.id, params=params)
        landed.update(r[0] for r in rows)
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


def complete(conn: sa.Connection, worker: str, outcomes: Sequence[Outcome]) -> int:
    """running -> succeeded, storing each result.

    Several at once: the engine's one fenced statement where it has one (PostgreSQL's
    arrays: a batch of executemany UPDATEs costs the server one statement each).
    """
    if len(outcomes) > 1:
        landed = engines.of(conn).complete_many(conn, worker, outcomes)
        if landed is not None:
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
    engine = engines.of(conn)
    where = sa.and_(engine.unique_key_is(unique_key), status_is(Status.RUNNING))
    rows = engine.update_returning(conn, where, {"unique_key": None}, tasks.c.id)
    return [int(r[0]) for r in rows]


def rescue(conn: sa.Connection, dead_workers: Sequence[str], reason: str) -> list[int]:
    """running -> queued (or failed when out of attempts) for tasks held by dead workers."""
    if not dead_workers:
        return []
    out_of_attempts = tasks.c.attempts >= tasks.c.max_attempts
    cancelled = tasks.c.cancel_requested_at.is_not(None)  # asked to stop: it stops here
    ends = sa.or_(cancelled, out_of_attempts)
    values = {
        "status": sa.case(
            (cancelled, Status.CANCELLED.value),
            (out_of_attempts, Status.FAILED.value),
            else_=Status.QUEUED.value,
        ),
        "error": sa.literal(reason),
        "locked_by": None,
        "locked_at": None,
        # run_at stays: the task keeps its place in the queue (priority, run_at, id)
        # instead of waiting behind everything enqueued while it ran
        "finished_at": sa.case((ends, db_now()), else_=None),
    }
    where = sa.and_(status_is(Status.RUNNING), tasks.c.locked_by.in_(list(dead_workers)))
    return [r[0] for r in engines.of(conn).update_returning(conn, where, values, tasks.c.id)]


def cancel(conn: sa.Connection, task_ids: Sequence[int], *, returning: bool = False) -> Any:
    """queued -> cancelled; how many (or, `returning`, which ids) were."""
    where = sa.and_(tasks.c.id.in_(list(task_ids)), status_is(Status.QUEUED))
    values = {"status": Status.CANCELLED.value, "finished_at": db_now()}
    if returning:
        rows = engines.of(conn).update_returning(conn, where, values, tasks.c.id)
        return sorted(r[0] for r in rows)
    return int(conn.execute(sa.update(tasks).where(where).values(values)).rowcount)


def request_cancel(conn: sa.Connection, task_ids: Sequence[int]) -> list[int]:
    """running -> running with `cancel_requested_at` set: its worker stops the run."""
    where = sa.and_(tasks.c.id.in_(list(task_ids)), status_is(Status.RUNNING))
    values = {"cancel_requested_at": sa.func.coalesce(tasks.c.cancel_requested_at, db_now())}
    rows = engines.of(conn).update_returning(conn, where, values, tasks.c.id)
    return sorted(r[0] for r in rows)


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
    )
    return engines.of(conn).delete_ids(conn, doomed)


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
    run_at of each priority present (`earliest_run_at`).
    """
    named: list[str | None] = list(queues) if queues else [None]
    earliest, now = earliest_run_at(conn, named)
    found = [e for e in earliest.values() if e is not None]
    if not found:
        return None
    return max(0.0, float((min(found) - now).total_seconds()))


#: Queues whose walks one statement carries (each a recursive CTE): on MySQL/MariaDB one.
#: MariaDB's memory for a statement selecting several walks' results side by side grows
#: exponentially with them (measured, 10.11: 4 walks 5 MB, 8 walks 1.9 GB, 10 walks killed by
#: the OOM killer at 24 GB; as a UNION of one walk per member, 12 took 3 MB), and it takes at
#: most 64 CTEs in a WITH clause (error 4003).
QUEUES_PER_STATEMENT = 50


def earliest_run_at(
    conn: sa.Connection, queues: Sequence[str | None]
) -> tuple[dict[str | None, dt.datetime | None], dt.datetime]:
    """The earliest run_at of each queue's queued rows (None: of every queue's), and the
    database clock. A loose index scan over the claim index's priorities: one index lookup per
    distinct priority, however many rows each holds, `loose_scan.WALK` priorities per queue
    in one statement with up to QUEUES_PER_STATEMENT queues (one statement in all, unless a
    queue has more priorities than that or there are more queues; on MySQL, one per queue)."""
    earliest: dict[str | None, dt.datetime | None] = dict.fromkeys(queues)
    pending: dict[str | None, Any] = dict.fromkeys(queues)  # walk on after this priority
    now: dt.datetime | None = None
    per_statement = 1 if conn.dialect.name in {"mysql", "mariadb"} else QUEUES_PER_STATEMENT
    while pending:
        batch = list(itertools.islice(pending.items(), per_statement))
        columns = []
        for i, (queue, after) in enumerate(batch):
            levels = loose_scan.walk(functools.partial(_next_priority, queue), f"prio_{i}", after)
            columns += [_earliest_at(queue, levels), loose_scan.resume_after(levels)]
        row = conn.execute(sa.select(db_now(), *columns)).one()
        now = now or row[0]
        for i, (queue, _) in enumerate(batch):
            found, resume = row[1 + 2 * i], row[2 + 2 * i]
            if isinstance(found, str):  # SQLite, through a scalar subquery
                found = UTCDateTime().process_result_value(found, conn.dialect)
            current = earliest[queue]
            if found is not None and (current is None or found < current):
                earliest[queue] = found
            del pending[queue]
            if resume is not None:
                pending[queue] = resume  # walked on in a later statement
    assert now is not None
    return earliest, now


def _queued(queue: str | None) -> sa.Select[Any]:
    """Queued rows' priorities (of `queue`, or every queue), through its claim index."""
    index = "ix_tasks_claimable" if queue is None else "ix_tasks_queue_claimable"
    stmt = sa.select(tasks.c.priority).where(status_is(Status.QUEUED))
    if queue is not None:
        stmt = stmt.where(tasks.c.queue == sa.literal(queue))
    return stmt.with_hint(tasks, f"INDEXED BY {index}", "sqlite")


def _next_priority(queue: str | None, previous: Any) -> Any:
    stmt = _queued(queue)
    if previous is not None:
        stmt = stmt.where(tasks.c.priority > previous)
    return stmt.order_by(tasks.c.priority).limit(1).scalar_subquery()


def _earliest_at(queue: str | None, levels: sa.CTE) -> Any:
    """The earliest run_at over a walk's priorities: the first entry of each in run_at order."""
    first_at_level = (
        _queued(queue)
        .with_only_columns(tasks.c.run_at)
        .where(tasks.c.priority == levels.c.value)
        .order_by(tasks.c.run_at)
        .limit(1)
        .scalar_subquery()
    )
    return (
        sa.select(sa.type_coerce(sa.func.min(first_at_level), UTCDateTime()))
        .where(levels.c.value.is_not(None))
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
    network lies between the worker and the database. Each engine's `limit_idle`.
    """
    engines.of(conn).limit_idle(conn, seconds)


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
