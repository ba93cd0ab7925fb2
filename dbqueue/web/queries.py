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

from dbqueue import schema, stats
from dbqueue.schema import Status, counter_deltas, db_now, tasks, workers

THROUGHPUT_WINDOW = 300.0  # seconds: "finished in the last 5 minutes" on the overview
SCHEDULED = "scheduled"  # a filter, not a stored status: queued with run_at in the future
FILTERS = (*schema.STATUSES, SCHEDULED)


@dataclasses.dataclass
class QueueSummary:
    """One row of the overview; `estimated`, `queued_estimated`: the finished, the queued
    counts are estimates (stats.py)."""

    queue: str
    ready: int
    scheduled: int
    running: int
    failed: int
    succeeded: int
    cancelled: int
    oldest_ready_age: float | None
    recent_finished: int
    estimated: bool = False
    queued_estimated: bool = False

    @property
    def throughput_per_minute(self) -> float:
        return self.recent_finished / (THROUGHPUT_WINDOW / 60.0)


def now(conn: sa.Connection) -> dt.datetime:
    """The database clock."""
    value: dt.datetime = conn.execute(sa.select(db_now())).scalar_one()
    return value


def overview(conn: sa.Connection) -> list[QueueSummary]:
    """Per queue: counts by state, the oldest ready task's age, tasks finished recently.

    Running counts are exact, queued ones past 100,000 in a queue and finished ones on a
    large history estimated (stats.py); the recent ones are read by finished_at through
    ix_tasks_finished.
    """
    current = now(conn)
    summaries: dict[str, QueueSummary] = {}

    def summary(queue: str) -> QueueSummary:
        return summaries.setdefault(queue, QueueSummary(queue, 0, 0, 0, 0, 0, 0, None, 0))

    for q in stats.queued(conn, current):
        row = summary(q.queue)
        row.ready, row.scheduled, row.queued_estimated = q.ready, q.scheduled, q.estimated
        if q.oldest_ready is not None:
            row.oldest_ready_age = max(0.0, (current - q.oldest_ready).total_seconds())
    for queue, n in stats.running(conn).items():
        summary(queue).running = n
    for count in stats.finished(conn):
        row = summary(count.queue)
        setattr(row, count.status, count.count)
        row.estimated = row.estimated or count.estimated
    recent = conn.execute(
        sa.select(tasks.c.queue, sa.func.count())
        .where(
            finished_as(Status.SUCCEEDED, Status.FAILED),
            tasks.c.finished_at > current - dt.timedelta(seconds=THROUGHPUT_WINDOW),
        )
        .group_by(tasks.c.queue)
    )
    for queue, n in recent:
        summary(queue).recent_finished = int(n)
    return [summaries[q] for q in sorted(summaries)]


def finished_as(*statuses: Status) -> sa.ColumnElement[bool]:
    """`status IN (...)` for finished statuses, written so SQLite uses ix_tasks_finished: its
    planner takes a partial index only when the query repeats the index's own predicate
    (`status IN ('succeeded', 'failed')` alone scanned the whole table)."""
    return sa.and_(schema.status_is(*schema.FINISHED), schema.status_is(*statuses))


BucketCount = tuple[str, str, int, int]  # queue, status, bucket number, tasks


@dataclasses.dataclass
class Throughput:
    """Tasks finished per time bucket, per queue: `succeeded[queue][i]` and `failed[queue][i]`
    count the tasks whose finished_at is in [start + i * step, start + (i + 1) * step)."""

    start: dt.datetime
    step: int
    buckets: int
    now: dt.datetime
    succeeded: dict[str, list[int]]
    failed: dict[str, list[int]]


def _bucket_of(conn: sa.Connection, step: int) -> Any:
    """finished_at's bucket number: whole seconds since 1970 divided by `step`, rounded down."""
    if conn.dialect.name == "postgresql":
        # date_part is double precision (EXTRACT's numeric is slower to divide)
        epoch = sa.func.date_part("epoch", tasks.c.finished_at)
        return sa.cast(sa.func.floor(epoch / step), sa.BigInteger)
    if conn.dialect.name in {"mysql", "mariadb"}:
        # TIMESTAMPDIFF, not UNIX_TIMESTAMP: that reads the DATETIME in the session's time zone
        return _seconds_since_1970(tasks.c.finished_at).op("DIV")(sa.literal_column(str(int(step))))
    # SQLite keeps UTC text; strftime('%s') reads it as whole seconds, and `/` of two integers
    # floors (SQLAlchemy's `/` would add 0.0: a group per second, 8 times slower on 32,000 rows).
    seconds = sa.cast(sa.func.strftime(sa.literal_column("'%s'"), tasks.c.finished_at), sa.Integer)
    return seconds.op("/")(sa.literal_column(str(int(step))))


def _seconds_since_1970(column: Any) -> Any:
    """MySQL: whole seconds from 1970 to a UTC DATETIME, whatever the session's time zone."""
    epoch: Any = sa.literal_column("'1970-01-01 00:00:00'")
    return sa.func.timestampdiff(sa.literal_column("SECOND"), epoch, column)


def first_bucket(current: dt.datetime, step: int, buckets: int) -> int:
    """The number of the first of `buckets` buckets of `step` seconds ending with the one
    that holds `current` (aligned on the clock: minutes, quarter hours)."""
    return int(current.timestamp()) // step - buckets + 1


def finished_per_bucket(conn: sa.Connection, step: int, from_bucket: int) -> list[BucketCount]:
    """(queue, status, bucket number, count) of the tasks that succeeded or failed since
    bucket `from_bucket` began: one grouped statement bounded by time, reading those rows by
    finished_at through ix_tasks_finished whatever the size of the history before them."""
    start = dt.datetime.fromtimestamp(from_bucket * step, dt.timezone.utc)
    bucket = _bucket_of(conn, step).label("bucket")
    stmt = (
        sa.select(tasks.c.queue, tasks.c.status, bucket, sa.func.count().label("n"))
        .where(finished_as(Status.SUCCEEDED, Status.FAILED), tasks.c.finished_at >= start)
        .group_by(tasks.c.queue, tasks.c.status, bucket)
    )
    return [(r.queue, r.status, int(r.bucket), int(r.n)) for r in conn.execute(stmt)]


def assemble(
    current: dt.datetime, step: int, buckets: int, counts: Iterable[BucketCount]
) -> Throughput:
    """The chart's series from bucket counts (those outside the window are left out)."""
    first = first_bucket(current, step, buckets)
    start = dt.datetime.fromtimestamp(first * step, dt.timezone.utc)
    chart = Throughput(start, step, buckets, current, {}, {})
    for queue, status, bucket, n in counts:
        i = bucket - first
        if not 0 <= i < buckets:  # finished after `current`: the next refresh's
            continue
        for queue_series in (chart.succeeded, chart.failed):
            queue_series.setdefault(queue, [0] * buckets)
        series = chart.succeeded if status == Status.SUCCEEDED.value else chart.failed
        series[queue][i] += n
    return chart


def throughput(conn: sa.Connection, step: int, buckets: int) -> Throughput:
    """Succeeded and failed tasks per queue in the last `buckets` buckets of `step` seconds,
    ending with the current, partial one, read in one statement."""
    current = now(conn)
    counts = finished_per_bucket(conn, step, first_bucket(current, step, buckets))
    return assemble(current, step, buckets, counts)


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


def _list_order(status: str | None) -> tuple[Any, ...]:
    """A task list's order, the one an index gives for that filter (a list of queued tasks
    ordered by id walked every finished row first): queued tasks in the order they will run
    (the claim indexes), finished ones latest finished first (ix_tasks_finished), the rest
    newest first (the primary key)."""
    if status == Status.QUEUED.value:
        return (tasks.c.priority, tasks.c.run_at, tasks.c.id)
    if status in schema.FINISHED:
        return (tasks.c.finished_at.desc(), tasks.c.id.desc())
    return (tasks.c.id.desc(),)


COUNT_UP_TO = 10_000  # a task list's total is counted this far, then shown as "more than"


def list_tasks(
    conn: sa.Connection, f: TaskFilter, limit: int, offset: int
) -> tuple[list[sa.Row[Any]], int, dt.datetime]:
    """One page of tasks (order: `_list_order`), the total matching (at most COUNT_UP_TO + 1: past
    that, "more than COUNT_UP_TO"; counting a history of millions took seconds) and the
    database's now."""
    current = now(conn)
    rows = conn.execute(
        _filtered(sa.select(*LIST_COLUMNS), f, current)
        .order_by(*_list_order(f.status))
        .limit(limit)
        .offset(offset)
    )
    matching = _filtered(sa.select(tasks.c.id), f, current)
    capped = matching.limit(max(COUNT_UP_TO, offset + limit) + 1).subquery()
    total = conn.execute(sa.select(sa.func.count()).select_from(capped)).scalar_one()
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
    """Every queue that has a task, for the filter form, without counting the queued ones (a
    queue with only a few finished tasks in a large history may be missed by the sample of
    stats.finished)."""
    names = set(stats.waiting_queues(conn)) | set(stats.running(conn))
    return sorted(names | {c.queue for c in stats.finished(conn)})


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


def gauges(conn: sa.Connection) -> tuple[list[stats.Count], list[stats.Queued], dt.datetime]:
    """Tasks per queue and status (finished ones estimated on a large history, stats.py),
    queued tasks per queue (ready, scheduled, oldest ready run_at), and now."""
    current = now(conn)
    waiting = stats.queued(conn, current)
    return stats.counts(conn, waiting), waiting, current


def _duration_seconds(conn: sa.Connection) -> Any:
    if conn.dialect.name == "postgresql":
        return sa.func.extract("epoch", tasks.c.finished_at - tasks.c.started_at)
    if conn.dialect.name in {"mysql", "mariadb"}:
        micros = sa.func.timestampdiff(
            sa.literal_column("MICROSECOND"), tasks.c.started_at, tasks.c.finished_at
        )
        return micros / 1_000_000.0
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
        *(stats.count_if(duration <= bound).label(f"le_{i}") for i, bound in enumerate(buckets)),
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


def finished_beyond(conn: sa.Connection, n: int) -> bool:
    """Whether more than `n` finished (succeeded or failed) rows exist, counting no further."""
    beyond = (
        sa.select(tasks.c.id)
        .where(schema.status_is(Status.SUCCEEDED, Status.FAILED))
        .limit(n + 1)
        .subquery()
    )
    return int(conn.execute(sa.select(sa.func.count()).select_from(beyond)).scalar_one()) > n


def clock_minus(conn: sa.Connection, seconds: float) -> dt.datetime:
    """The database clock, `seconds` ago."""
    value: dt.datetime = conn.execute(sa.select(db_now(-seconds))).scalar_one()
    return value
