"""The charts' finished buckets, kept by the dashboard process so a refresh reads only the
rows of the buckets still filling.

A bucket that ended more than `SETTLE_SECONDS` ago is sealed: its counts are kept and never
read again, and each later read of the chart asks the database only for the rows finished
since the first unsealed bucket began. Without this, every reload of the 24-hour chart would
read a whole day of finished rows (2 s on PostgreSQL, 5 s on SQLite for 1,000,000 in a day);
with it, only the first view does. Sealed counts are what finished then: a failed task
retried later, or a pruned row, stays counted, as it does in the /metrics totals. The settle
time covers a row stamped just before its transaction committed (as metrics.py does).
"""

from __future__ import annotations

import threading

import sqlalchemy as sa

from dbqueue.web import queries

SETTLE_SECONDS = 5.0


class ThroughputHistory:
    """Sealed bucket counts per bucket size, for one dashboard process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sealed: dict[int, dict[int, list[queries.BucketCount]]] = {}
        self._unsealed_from: dict[int, int] = {}  # step -> first bucket not sealed

    def read(self, conn: sa.Connection, step: int, buckets: int) -> queries.Throughput:
        """The chart of the last `buckets` buckets of `step` seconds (queries.throughput's),
        reading from the database only the buckets not sealed yet."""
        with self._lock:
            current = queries.now(conn)
            first = queries.first_bucket(current, step, buckets)
            sealed = self._sealed.setdefault(step, {})
            for old in [b for b in sealed if b < first]:
                del sealed[old]
            since = max(first, self._unsealed_from.get(step, first))
            fresh = queries.finished_per_bucket(conn, step, since)
            # A bucket b ends at (b + 1) * step: sealed once that is SETTLE_SECONDS past.
            seal_below = int((current.timestamp() - SETTLE_SECONDS) // step)
            for bucket in range(since, seal_below):
                sealed[bucket] = [c for c in fresh if c[2] == bucket]
            self._unsealed_from[step] = max(since, seal_below)
            kept = [c for counts in sealed.values() for c in counts]
            recent = [c for c in fresh if c[2] >= seal_below]
            return queries.assemble(current, step, buckets, kept + recent)
