"""`/metrics`: the queue as Prometheus sees it, read from the tables at each scrape.

Gauges (tasks per queue and status, scheduled tasks, oldest ready task's age) are exact reads
of the `tasks` table; `dbqueue_queue_paused` reads `queue_settings`. Totals and the duration
histogram need monotonic values, which a table that is pruned cannot give directly; so this
process keeps them: the first scrape counts every finished task in the table, and each later
scrape adds the tasks that finished since the last one (a watermark on `finished_at`, kept
`SETTLE_SECONDS` behind the database clock so a row stamped just before its transaction
committed is not missed). A restart of the dashboard is a counter reset, which Prometheus'
rate() and increase() handle. When the table holds more than `HISTORY_UP_TO` finished rows,
the first scrape does not add them up (1,000,000 took 10 s): the totals start at 0 and count
what finishes from then on, which is all rate() needs.

The `dbqueue_tasks` gauge of finished statuses is an estimate past
`stats.EXACT_FINISHED_UP_TO` finished rows, and of a queue's queued tasks (and
`dbqueue_tasks_scheduled`) past `stats.EXACT_QUEUED_UP_TO` (the help text says so); running
counts and the oldest ready age are exact.

Duration is `finished_at - started_at`. `started_at` is stamped at claim, and a worker claims
a batch, so a task's duration includes the time it waited behind the earlier tasks of its
batch: an upper bound of the run time, exact for batches of one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client import registry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from dbqueue import control, limits, stats
from dbqueue.schema import STATUSES, Status
from dbqueue.web import queries

SETTLE_SECONDS = 5.0
HISTORY_UP_TO = 100_000  # finished rows the first scrape adds up; past that it starts at 0
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclasses.dataclass
class _Histogram:
    buckets: list[int] = dataclasses.field(default_factory=lambda: [0] * len(BUCKETS))
    count: int = 0
    total: float = 0.0


class Totals:
    """Monotonic totals accumulated scrape by scrape (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.watermark: dt.datetime | None = None
        self.processed: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.durations: dict[str, _Histogram] = {}

    def advance(self, conn: sa.Connection) -> None:
        """Add the tasks that finished since the previous call."""
        with self._lock:
            until = queries.clock_minus(conn, SETTLE_SECONDS)
            if self.watermark is not None and until <= self.watermark:
                return
            if self.watermark is None and queries.finished_beyond(conn, HISTORY_UP_TO):
                self.watermark = until  # a long history: count from now on (module doc)
                return
            for row in queries.finished_between(conn, self.watermark, until, BUCKETS):
                self.processed[row.queue] = self.processed.get(row.queue, 0) + row.n
                if row.status == Status.FAILED.value:
                    self.failed[row.queue] = self.failed.get(row.queue, 0) + row.n
                histogram = self.durations.setdefault(row.handler, _Histogram())
                histogram.count += row.n
                histogram.total += float(row.duration_sum or 0.0)
                for i in range(len(BUCKETS)):
                    histogram.buckets[i] += int(getattr(row, f"le_{i}"))
            self.watermark = until


class QueueCollector(registry.Collector):
    """A prometheus_client collector that reads the database on every scrape."""

    def __init__(self, engine: sa.Engine, totals: Totals | None = None) -> None:
        self.engine = engine
        self.totals = totals or Totals()

    def collect(self) -> Iterator[Metric]:
        with self.engine.connect() as conn:
            stats.without_jit(conn)
            by_status, waiting, now = queries.gauges(conn)
            settings = control.read_settings(conn)
            on_limits = limits.waiting_on_limits(conn)
            self.totals.advance(conn)
            conn.rollback()
        tasks = GaugeMetricFamily(
            "dbqueue_tasks",
            "Tasks in the table per queue and status (estimated from a sample past "
            f"{stats.EXACT_FINISHED_UP_TO} finished rows, or {stats.EXACT_QUEUED_UP_TO} "
            "queued in a queue)",
            labels=["queue", "status"],
        )
        seen: dict[str, dict[str, int]] = {}
        for count in by_status:
            seen.setdefault(count.queue, {})[count.status] = count.count
        for queue, counts in sorted(seen.items()):
            for status in STATUSES:
                tasks.add_metric([queue, status], counts.get(status, 0))
        yield tasks
        scheduled = GaugeMetricFamily(
            "dbqueue_tasks_scheduled",
            "Queued tasks whose run_at is still in the future",
            labels=["queue"],
        )
        oldest = GaugeMetricFamily(
            "dbqueue_oldest_queued_age_seconds",
            "Age of the oldest task that is ready to run but not yet claimed (0 if none)",
            labels=["queue"],
        )
        for waits in waiting:
            scheduled.add_metric([waits.queue], waits.scheduled)
            ready = waits.oldest_ready
            age = 0.0 if ready is None else (now - ready).total_seconds()
            oldest.add_metric([waits.queue], max(0.0, age))
        yield scheduled
        yield oldest
        yield _paused(settings, seen)
        limited = GaugeMetricFamily(
            "dbqueue_tasks_waiting_on_limit",
            "Ready tasks not claimed because their concurrency_key or their queue is at its "
            "max_concurrency (a capped queue's counted up to 100000)",
            labels=["queue"],
        )
        for queue, waiting_n in sorted(on_limits.items()):
            limited.add_metric([queue], waiting_n)
        yield limited
        yield from self._totals()

    def _totals(self) -> Iterator[Metric]:
        with self.totals._lock:
            processed = dict(self.totals.processed)
            failed = dict(self.totals.failed)
            durations = {
                k: dataclasses.replace(v, buckets=list(v.buckets))
                for k, v in self.totals.durations.items()
            }
        processed_metric = CounterMetricFamily(
            "dbqueue_tasks_processed",
            "Tasks that finished (succeeded or failed for good), seen by this process",
            labels=["queue"],
        )
        failed_metric = CounterMetricFamily(
            "dbqueue_tasks_failed",
            "Tasks that failed for good (out of attempts), seen by this process",
            labels=["queue"],
        )
        for queue in sorted(processed):
            processed_metric.add_metric([queue], processed[queue])
            failed_metric.add_metric([queue], failed.get(queue, 0))
        yield processed_metric
        yield failed_metric
        histogram = HistogramMetricFamily(
            "dbqueue_task_duration_seconds",
            "finished_at - started_at of finished tasks, per handler",
            labels=["handler"],
        )
        for handler in sorted(durations):
            h = durations[handler]
            buckets = [(_bound(b), float(n)) for b, n in zip(BUCKETS, h.buckets, strict=True)]
            buckets.append(("+Inf", float(h.count)))
            histogram.add_metric([handler], buckets, sum_value=h.total)
        yield histogram


def _paused(settings: list[sa.Row[Any]], with_tasks: Iterable[str]) -> Metric:
    """1 for a paused queue, 0 for every other queue that has tasks or settings."""
    paused = {row.queue: int(bool(row.paused)) for row in settings}
    gauge = GaugeMetricFamily(
        "dbqueue_queue_paused",
        "1 while the queue is paused (workers claim none of its tasks), else 0",
        labels=["queue"],
    )
    for queue in sorted(set(with_tasks) | set(paused)):
        gauge.add_metric([queue], paused.get(queue, 0))
    return gauge


def _bound(value: float) -> str:
    return repr(float(value))


def make_registry(engine: sa.Engine) -> registry.CollectorRegistry:
    """A registry of its own (not prometheus_client's global one), so two apps never clash."""
    reg = registry.CollectorRegistry(auto_describe=False)
    reg.register(QueueCollector(engine))
    return reg
