"""The dashboard's read-only statements: overview, task lists, workers, counters, metrics.

Owns only SELECTs; every state change the dashboard makes goes through `store.py` (requeue,
cancel, delete, clear), and the bus page reads through `bus.list_subscriptions`. Times come
from the database clock (`schema.db_now`), like the rest of dbqueue, so ages are right however
far the web host's clock drifts.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from dbqueue import schema
from dbqueue.schema import Status, counter_deltas, db_now, tasks, workers

THROUGHPUT_WINDOW = 300.0  # seconds: "finished in the last 5 minutes" on the overview
SCHEDULED = "scheduled"  # a filter, not a stored status: queued with run_at in the future
FILTERS = (*schema.STATUSES, SCHEDULED)


@dataclasses.dataclass
class QueueSummary:
    """One row of the overview."""

    queue: str
    ready: int
    scheduled: int
    running: int
    failed: int
    succeeded: int
    cancelled: int
    oldest_ready_age: float | None
    recent_finished: int

    @property
    def throughput_per_minute(self) -> float:
        return self.recent_finished / (THROUGHPUT_WINDOW / 60.0)


def _count_if(condition: Any) -> Any:
    return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)


def now(conn: sa.Connection) -> dt.datetime:
    """The database clock."""
    value: dt.datetime = conn.execute(sa.select(db_now())).scalar_one()
    return value


def overview(conn: sa.Connection) -> list[QueueSummary]:
    """Per queue: counts by state, the oldest ready task's age, tasks finished recently."""
    current = now(conn)
    is_queued = tasks.c.status == Status.QUEUED.value
    ready = sa.and_(is_queued, tasks.c.run_at <= current)
    stmt = (
        sa.select(
            tasks.c.queue,
            _count_if(ready).label("ready"),
            _count_if(sa.and_(is_queued, tasks.c.run_at > current)).label("scheduled"),
            _count_if(tasks.c.status == Status.RUNNING.value).label("running"),
            _count_if(tasks.c.status == Status.FAILED.value).label("failed"),
            _count_if(tasks.c.status == Status.SUCCEEDED.value).label("succeeded"),
            _count_if(tasks.c.status == Status.CANCELLED.value).label("cancelled"),
            sa.type_coerce(
                sa.func.min(sa.case((ready, tasks.c.run_at), else_=None)), schema.UTCDateTime()
            ).label("oldest_ready"),
            _count_if(
                sa.and_(
                    tasks.c.status.in_((Status.SUCCEEDED.value, Status.FAILED.value)),
                    tasks.c.finished_at > current - dt.timedelta(seconds=THROUGHPUT_WINDOW),
                )
            ).label("recent"),
        )
        .group_by(tasks.c.queue)
        .order_by(tasks.c.queue)
    )
    return [
        QueueSummary(
            queue=row.queue,
            ready=int(row.ready),
            scheduled=int(row.scheduled),
            running=int(row.running),
            failed=int(row.failed),
            succeeded=int(row.succeeded),
            cancelled=int(row.cancelled),
            oldest_ready_age=(
                None
                if row.oldest_ready is None
                else max(0.0, (current - row.oldest_ready).total_seconds())
            ),
            recent_finished=int(row.recent),
        )
        for row in conn.execute(stmt)
    ]


def with_idle_queues(summaries: list[QueueSummary], queues: Iterable[str]) -> list[QueueSummary]:
    """The overview's rows plus an empty row for each of `queues` (paused ones) without tasks,
    so a paused queue is shown, and can be resumed, before anything is enqueued into it."""
    known = {s.queue for s in summaries}
    empty = [
        QueueSummary(q, 0, 0, 0, 0, 0, 0, None, 0) for q in sorted(set(queues)) if q not in known
    ]
    return sorted([*summaries, *empty], key=lambda s: s.queue)


@dataclasses.dataclass(frozen=True)
class TaskFilter:
    """What the task list shows and a bulk action acts on.

    `search`: a task id (digits, `#` allowed in front) or else a piece of the handler's
    name (`module:qualname`), matched case-insensitively on both databases, `%` and `_`
    taken literally.
    """

    status: str | None = None
    queue: str | None = None
    search: str | None = None

    @property
    def task_id(self) -> int | None:
        text = (self.search or "").strip().removeprefix("#")
        return int(text) if text.isdigit() and len(text) < 19 else None

    def params(self) -> dict[str, str]:
        """The non-empty fields, as the list page's query parameters."""
        named = (("status", self.status), ("queue", self.queue), ("q", self.search))
        return {k: v for k, v in named if v}


def _filtered(stmt: Any, f: TaskFilter, current: dt.datetime) -> Any:
    if f.status == SCHEDULED:
        stmt = stmt.where(tasks.c.status == Status.QUEUED.value, tasks.c.run_at > current)
    elif f.status:
        stmt = stmt.where(tasks.c.status == f.status)
    if f.queue:
        stmt = stmt.where(tasks.c.queue == f.queue)
    if f.task_id is not None:
        stmt = stmt.where(tasks.c.id == f.task_id)
    elif f.search and f.search.strip():
        stmt = stmt.where(tasks.c.handler.icontains(f.search.strip(), autoescape=True))
    return stmt


LIST_COLUMNS = (
    tasks.c.id,
    tasks.c.queue,
    tasks.c.priority,
    tasks.c.status,
    tasks.c.handler,
    tasks.c.attempts,
    tasks.c.max_attempts,
    tasks.c.run_at,
    tasks.c.created_at,
    tasks.c.finished_at,
)


def list_tasks(
    conn: sa.Connection, f: TaskFilter, limit: int, offset: int
) -> tuple[list[sa.Row[Any]], int, dt.datetime]:
    """One page of tasks (newest first), the total matching, and the database's now."""
    current = now(conn)
    rows = conn.execute(
        _filtered(sa.select(*LIST_COLUMNS), f, current)
        .order_by(tasks.c.id.desc())
        .limit(limit)
        .offset(offset)
    )
    total = conn.execute(
        _filtered(sa.select(sa.func.count()).select_from(tasks), f, current)
    ).scalar_one()
    return list(rows), int(total), current


def bulk_extent(conn: sa.Connection, f: TaskFilter, statuses: Sequence[str]) -> tuple[int, int]:
    """(how many tasks match `f` and are in one of `statuses`, the highest such id): what a
    bulk action's confirmation shows, and the id it stops at."""
    stmt = sa.select(sa.func.count(), sa.func.coalesce(sa.func.max(tasks.c.id), 0))
    row = conn.execute(
        _filtered(stmt.select_from(tasks), f, now(conn)).where(tasks.c.status.in_(statuses))
    ).one()
    return int(row[0]), int(row[1])


def bulk_targets(
    conn: sa.Connection, f: TaskFilter, statuses: Sequence[str], up_to: int
) -> dict[int, str]:
    """id -> status of the tasks a confirmed bulk action acts on: matching `f`, in one of
    `statuses`, and no newer than the confirmation (`up_to`, the highest id it counted)."""
    stmt = sa.select(tasks.c.id, tasks.c.status).where(
        tasks.c.status.in_(statuses), tasks.c.id <= up_to
    )
    return {r.id: r.status for r in conn.execute(_filtered(stmt, f, now(conn)))}


def queue_names(conn: sa.Connection) -> list[str]:
    """Every queue that has a task, for the filter form."""
    stmt = sa.select(tasks.c.queue).distinct().order_by(tasks.c.queue)
    return [r[0] for r in conn.execute(stmt)]


def list_workers(conn: sa.Connection) -> tuple[list[sa.Row[Any]], dt.datetime]:
    """Registered workers with how many tasks each holds, and the database's now."""
    held = (
        sa.select(sa.func.count())
        .where(tasks.c.status == Status.RUNNING.value, tasks.c.locked_by == workers.c.name)
        .scalar_subquery()
    )
    rows = conn.execute(sa.select(workers, held.label("running")).order_by(workers.c.name))
    return list(rows), now(conn)


def pending_counters(conn: sa.Connection, limit: int = 500) -> list[sa.Row[Any]]:
    """Unflushed counter deltas summed per (table, row, column), the largest backlog first."""
    stmt = (
        sa.select(
            counter_deltas.c.table_name,
            counter_deltas.c.row_id,
            counter_deltas.c.column_name,
            sa.func.sum(counter_deltas.c.delta).label("pending"),
            sa.func.count().label("rows"),
            sa.type_coerce(sa.func.min(counter_deltas.c.created_at), schema.UTCDateTime()).label(
                "oldest"
            ),
        )
        .group_by(
            counter_deltas.c.table_name, counter_deltas.c.row_id, counter_deltas.c.column_name
        )
        .order_by(sa.func.count().desc(), counter_deltas.c.table_name, counter_deltas.c.row_id)
        .limit(limit)
    )
    return list(conn.execute(stmt))


# -- metrics -----------------------------------------------------------------------------------


def gauges(conn: sa.Connection) -> tuple[list[sa.Row[Any]], list[sa.Row[Any]], dt.datetime]:
    """(queue, status, count) rows, (queue, scheduled, oldest ready run_at) rows, and now."""
    current = now(conn)
    by_status = conn.execute(
        sa.select(tasks.c.queue, tasks.c.status, sa.func.count().label("n"))
        .group_by(tasks.c.queue, tasks.c.status)
        .order_by(tasks.c.queue, tasks.c.status)
    )
    is_queued = tasks.c.status == Status.QUEUED.value
    ready = sa.and_(is_queued, tasks.c.run_at <= current)
    waiting = conn.execute(
        sa.select(
            tasks.c.queue,
            _count_if(tasks.c.run_at > current).label("scheduled"),
            sa.type_coerce(
                sa.func.min(sa.case((ready, tasks.c.run_at), else_=None)), schema.UTCDateTime()
            ).label("oldest_ready"),
        )
        .where(is_queued)
        .group_by(tasks.c.queue)
    )
    return list(by_status), list(waiting), current


def _duration_seconds(conn: sa.Connection) -> Any:
    if conn.dialect.name == "postgresql":
        return sa.func.extract("epoch", tasks.c.finished_at - tasks.c.started_at)
    # SQLite stores UTC text; julianday() parses it, in days.
    days = sa.func.julianday(tasks.c.finished_at) - sa.func.julianday(tasks.c.started_at)
    return days * 86400.0


def finished_between(
    conn: sa.Connection,
    after: dt.datetime | None,
    until: dt.datetime,
    buckets: Sequence[float],
) -> list[sa.Row[Any]]:
    """Tasks that finished (succeeded or failed) in (after, until], aggregated per queue,
    handler and status: count, summed duration and one cumulative count per bucket bound.
    """
    duration = _duration_seconds(conn)
    columns = [
        tasks.c.queue,
        tasks.c.handler,
        tasks.c.status,
        sa.func.count().label("n"),
        sa.func.coalesce(sa.func.sum(duration), 0.0).label("duration_sum"),
        *(_count_if(duration <= bound).label(f"le_{i}") for i, bound in enumerate(buckets)),
    ]
    stmt = (
        sa.select(*columns)
        .where(
            tasks.c.status.in_((Status.SUCCEEDED.value, Status.FAILED.value)),
            tasks.c.finished_at <= until,
            tasks.c.started_at.is_not(None),
        )
        .group_by(tasks.c.queue, tasks.c.handler, tasks.c.status)
    )
    if after is not None:
        stmt = stmt.where(tasks.c.finished_at > after)
    return list(conn.execute(stmt))


def clock_minus(conn: sa.Connection, seconds: float) -> dt.datetime:
    """The database clock, `seconds` ago."""
    value: dt.datetime = conn.execute(sa.select(db_now(-seconds))).scalar_one()
    return value
