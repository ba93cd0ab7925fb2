"""Concurrency limits: at most N tasks of a `concurrency_key`, or of a capped queue, run at
once across every worker. Enforced by the claim itself; no lock is held while a task runs.

    @handle_asynchronously(concurrency_key=lambda account_id: f"sync:{account_id}",
                           max_concurrency=1)
    dbqueue.configure_queue("mail", max_concurrency=5)      # or `dbqueue queue-limit mail 5`

A task's key (a string, or a callable of the task's arguments evaluated at enqueue) and its
limit are stored in `tasks.concurrency_key` / `tasks.max_concurrency`; a queue's cap in
`queue_settings.max_concurrency`. A slot is a row in `running`: a claimed task holds its slot
until its outcome is recorded, and a dead worker's slots come back with the rescue that
returns its rows to `queued`.

Two claims (store.py):
- the unlimited claim, the usual one, takes only rows without a key from queues without a
  cap (`free_of_limits`): a filter on rows it reads anyway, so it costs what it did;
- the limited claim (`fits` and `trimmed`), taken by a worker while tasks with a key wait
  in its queues or its queues have a cap (the worker's heart reads both every second,
  `limited_waiting`), claims every kind of row, each limited one only while its key and its
  queue have a free slot, counted in the same statement. Rows of a key or queue at its limit
  are skipped, not waited on: the rows behind them are claimed (no head-of-line blocking).

Concurrent claimers. PostgreSQL, READ COMMITTED: a statement counts the running rows of its
snapshot, taken when it starts, so two workers claiming the last slot of a key at once would
each count the slot free and each take a task (SKIP LOCKED keeps them from the same row, not
from the same key). So the limited claim runs in a transaction that first takes one
transaction-scoped advisory lock (`CLAIM_LOCK`): limited claims run one at a time fleet-wide,
and each one's snapshot, taken after the lock, sees every earlier limited claim committed
(the lock is released only after the commit is visible). The lock is held for the claim
statement alone (about a millisecond), never while a task runs; finishing, retrying and
rescuing tasks take no lock (they only free slots, and a snapshot that missed a freed slot
under-claims, never over-claims). Unlimited claims never take it. One lock rather than one
per key: the keys a claim will take are known only inside its statement, after its snapshot.
SQLite: every claim is a BEGIN IMMEDIATE transaction, one writer at a time, which serialises
them already.

Each limited claim takes at most one task per key and one per capped queue: a worker runs its
batch one task after another, and a batch holding several slots of one key would hold them
while running them in turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

from dbqueue import errors
from dbqueue.schema import Status, db_now, queue_settings, status_is, tasks

# pg_advisory_xact_lock's key for limited claims ("dbqLIMIT" as 8 bytes, read as a bigint).
CLAIM_LOCK = int.from_bytes(b"dbqLIMIT", "big") - 2**63
MAX_KEY_LENGTH = 500

KeyOption = str | Callable[..., str] | None


def check(concurrency_key: Any, max_concurrency: Any, where: str) -> None:
    """Refuse a bad pair at decoration or enqueue; `where` names the function (for the error)."""
    if concurrency_key is None and max_concurrency is None:
        return
    if concurrency_key is None:
        raise errors.EnqueueError(
            f"{where}: max_concurrency={max_concurrency!r} limits tasks sharing a "
            "concurrency_key; give concurrency_key too (a queue's cap is "
            "dbqueue.configure_queue(queue, max_concurrency=N))"
        )
    if max_concurrency is None:
        raise errors.EnqueueError(
            f"{where}: concurrency_key={concurrency_key!r} needs max_concurrency=N (how many "
            "tasks with one key may run at once)"
        )
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
        raise errors.EnqueueError(
            f"{where}: max_concurrency must be a positive int, not {max_concurrency!r}"
        )
    if not 1 <= max_concurrency < 2**31:
        raise errors.EnqueueError(
            f"{where}: max_concurrency must be at least 1, not {max_concurrency} (to stop "
            "tasks from running, pause their queue: dbqueue.pause(queue))"
        )
    if not callable(concurrency_key):
        _check_key(concurrency_key, where)


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not key:
        raise errors.EnqueueError(
            f"{where}: concurrency_key must be a non-empty string or a callable of the "
            f"task's arguments returning one, not {key!r}"
        )
    if len(key) > MAX_KEY_LENGTH:
        raise errors.EnqueueError(
            f"{where}: concurrency_key is {len(key)} characters, limit is {MAX_KEY_LENGTH}"
        )
    return key


def key_for(
    concurrency_key: KeyOption, args: Sequence[Any], kwargs: dict[str, Any], where: str
) -> str | None:
    """The key stored for one task: the string, or what the callable returns for the task's
    arguments (called as the task will be, at enqueue)."""
    if concurrency_key is None or isinstance(concurrency_key, str):
        return concurrency_key
    try:
        key = concurrency_key(*args, **kwargs)
    except Exception as exc:
        raise errors.EnqueueError(
            f"{where}: concurrency_key {getattr(concurrency_key, '__name__', concurrency_key)!r}"
            f" raised {type(exc).__name__}: {exc} for this task's arguments; nothing was stored"
        ) from exc
    if not isinstance(key, str) or not key:
        raise errors.EnqueueError(
            f"{where}: concurrency_key returned {key!r} for this task's arguments; it must "
            "return a non-empty string"
        )
    return _check_key(key, where)


# -- SQL pieces of the two claims (store._claimable) -------------------------------------------


def free_of_limits() -> sa.ColumnElement[bool]:
    """The unlimited claim's filter: no key (caps are left out by queue, as paused queues)."""
    return tasks.c.concurrency_key.is_(None)


def _running_of_key(candidate: Any) -> Any:
    running = tasks.alias("running_of_key")
    return (
        sa.select(sa.func.count())
        .select_from(running)
        .where(
            running.c.status == sa.literal_column("'running'"),
            running.c.concurrency_key == candidate.c.concurrency_key,
        )
        .scalar_subquery()
    )


def saturated_keys() -> sa.Select[Any]:
    """Keys whose running rows fill the largest limit among them (uncorrelated: evaluated
    once per claim, then a hash probe per candidate). Tasks of one key share a limit, so a
    candidate whose key is here cannot fit; one carrying a larger limit than its running
    siblings (the code changed) is not here and is counted row by row, as every other is."""
    running = tasks.alias("running_keys")
    return (
        sa.select(running.c.concurrency_key)
        .where(
            running.c.status == sa.literal_column("'running'"),
            running.c.concurrency_key.is_not(None),
        )
        .group_by(running.c.concurrency_key)
        .having(sa.func.count() >= sa.func.max(running.c.max_concurrency))
    )


def saturated_queues() -> sa.Select[Any]:
    """Capped queues with no free slot now (uncorrelated: evaluated once per claim)."""
    running = tasks.alias("running_of_queue")
    in_queue = (
        sa.select(sa.func.count())
        .select_from(running)
        .where(
            running.c.status == sa.literal_column("'running'"),
            running.c.queue == queue_settings.c.queue,
        )
        .scalar_subquery()
    )
    return sa.select(queue_settings.c.queue).where(
        queue_settings.c.max_concurrency.is_not(None),
        queue_settings.c.max_concurrency <= in_queue,
    )


def fits(queue: str | None) -> sa.ColumnElement[bool]:
    """The limited claim's filter on a candidate row: its key and its queue have a free slot.
    `queue`: the one queue being read (its cap is then checked once, not per row)."""
    key_free = sa.case(
        (tasks.c.concurrency_key.is_(None), sa.true()),
        # a blocked row costs a hash probe, not a count (measured: 2,000 blocked rows ahead
        # took 31 ms per claim with the count alone)
        (tasks.c.concurrency_key.in_(saturated_keys()), sa.false()),
        else_=_running_of_key(tasks) < tasks.c.max_concurrency,
    )
    subject: Any = tasks.c.queue if queue is None else sa.literal(queue)
    return sa.and_(subject.not_in(saturated_queues()), key_free)


def capped() -> Any:
    """1 when the candidate's queue has a cap, else 0 (a column of the limited candidates)."""
    cap = (
        sa.select(queue_settings.c.max_concurrency)
        .where(queue_settings.c.queue == tasks.c.queue)
        .scalar_subquery()
    )
    return sa.case((cap.is_(None), 0), else_=1).label("capped")


def trimmed(candidates: Any, limit: Any) -> sa.Select[Any]:
    """The ids to claim among locked candidates (id, priority, run_at, queue, concurrency_key,
    capped): in claim order, at most one per key and one per capped queue."""
    order = (candidates.c.priority, candidates.c.run_at, candidates.c.id)
    per_key = sa.func.row_number().over(partition_by=candidates.c.concurrency_key, order_by=order)
    per_queue = sa.func.row_number().over(partition_by=candidates.c.queue, order_by=order)
    ranked = sa.select(
        candidates.c.id,
        candidates.c.priority,
        candidates.c.run_at,
        sa.case((candidates.c.concurrency_key.is_(None), 1), else_=per_key).label("key_rank"),
        sa.case((candidates.c.capped == 0, 1), else_=per_queue).label("queue_rank"),
    ).subquery("ranked")
    return (
        sa.select(ranked.c.id)
        .where(ranked.c.key_rank == 1, ranked.c.queue_rank == 1)
        .order_by(ranked.c.priority, ranked.c.run_at, ranked.c.id)
        .limit(limit)
    )


# -- what the worker's heart and /metrics read -------------------------------------------------


def limited_waiting(conn: sa.Connection, queues: Sequence[str] | None) -> bool:
    """Whether queued tasks with a key wait in `queues` (None: any queue): one probe of
    ix_tasks_concurrency_queued, which holds only such rows."""
    stmt = sa.select(tasks.c.id).where(
        status_is(Status.QUEUED), tasks.c.concurrency_key.is_not(None)
    )
    if queues:
        stmt = stmt.where(tasks.c.queue.in_([sa.literal(q) for q in queues]))
    return conn.execute(stmt.limit(1)).first() is not None


def waiting_on_limits(conn: sa.Connection, cap: int = 100_000) -> dict[str, int]:
    """Per queue, ready tasks a claim would not take now because their key or their queue is
    at its limit (the /metrics gauge).

    Two steps, so the cost follows what is limited, never the backlog: the queued rows with a
    key are read through their own index; the capped queues at their cap are found first
    (queue_settings is small) and only their ready rows are then counted, at most `cap` per
    queue (a saturated queue with a larger backlog reports `cap`: "at least"). One statement
    joining both made PostgreSQL plan a merge join over the whole claim index (estimated cost
    in the millions: 0.35 s of JIT compilation alone on a 1,000,000-task backlog)."""
    candidate = tasks.alias("candidate")
    ready = sa.and_(
        candidate.c.status == sa.literal_column("'queued'"), candidate.c.run_at <= db_now()
    )
    key_full = sa.and_(
        candidate.c.concurrency_key.is_not(None),
        _running_of_key(candidate) >= candidate.c.max_concurrency,
    )
    blocked = sa.select(candidate.c.queue, sa.func.count()).where(ready, key_full)
    waiting = {row[0]: int(row[1]) for row in conn.execute(blocked.group_by(candidate.c.queue))}
    for queue in conn.execute(saturated_queues()).scalars():
        rows = (
            sa.select(candidate.c.id)
            .where(ready, candidate.c.queue == sa.literal(queue), sa.not_(key_full))
            .limit(cap)
            .subquery()
        )
        n = int(conn.execute(sa.select(sa.func.count()).select_from(rows)).scalar_one())
        if n:
            waiting[queue] = waiting.get(queue, 0) + n
    return waiting
