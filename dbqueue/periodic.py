"""Periodic tasks: `@periodic(cron=...)` and `@periodic(every=...)`, enqueued by the workers.

Owns the registry of periodic tasks, their slots (the times they are due), and the SQL on
`periodic_slots`. It does not run anything: every worker loop calls `Scheduler.tick()`, which
enqueues the tasks whose slot has come, and the queue runs them like any other task.

Exactly once per slot, however many workers tick: `periodic_slots` holds one row per periodic
task with the latest slot already enqueued. A worker enqueues a slot only if its compare-and-set
`UPDATE ... WHERE last_slot = <what it read>` changed the row, in the same transaction as the
insert; a concurrent worker's update then matches no row (PostgreSQL re-checks the WHERE after
the winner commits; SQLite runs one writer at a time). The task also carries the unique key
`periodic:<handler>:<slot>` as a second guard. The row survives pruning, so a finished slot is
never enqueued again.

A periodic task seen for the first time starts at its next slot. Slots missed while no worker
ran are enqueued once (the latest), or each of them with `catch_up=True`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import threading
import time
import zoneinfo
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa

from dbqueue import config, errors, retry, serializer, upsert

# Names, not the module: `dbqueue.enqueue` is the function once the package is imported.
from dbqueue.enqueue import build, enqueue
from dbqueue.schema import PERIODIC_NAME_LENGTH, db_now, periodic_slots, too_long

log = logging.getLogger("dbqueue.periodic")

F = TypeVar("F", bound=Callable[..., Any])

MAX_CATCH_UP = 1000  # slots enqueued at most per tick with catch_up=True
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
# Signs nothing that is stored: lets the decorator check arguments and options at import.
_VALIDATION = config.Settings(secret_key="periodic-validation-only-" + "x" * 32)


@dataclasses.dataclass(frozen=True)
class Periodic:
    """One periodic task: what to call, when, and the enqueue options of each run."""

    func: Callable[..., Any]
    name: str
    cron: str | None
    every: dt.timedelta | None
    tz: zoneinfo.ZoneInfo
    catch_up: bool = False
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def schedule(self) -> str:
        """The schedule as people write it: `cron 0 3 * * * (Europe/Paris)` or `every 0:00:30`."""
        if self.cron is not None:
            return f"cron {self.cron} ({self.tz.key})"
        return f"every {self.every}"

    def latest_slot(self, now: dt.datetime) -> dt.datetime:
        """The latest slot at or before `now` (UTC)."""
        if self.every is not None:
            step = self.every.total_seconds()
            count = math.floor((now - EPOCH).total_seconds() / step)
            return EPOCH + dt.timedelta(seconds=count * step)
        assert self.cron is not None
        from croniter import croniter  # here: a worker with no cron schedule never loads it

        # get_prev excludes its start, so start just after `now` to include a slot at `now`.
        start = (now + dt.timedelta(microseconds=1)).astimezone(self.tz)
        slot: dt.datetime = croniter(self.cron, start).get_prev(dt.datetime)
        return slot.astimezone(dt.timezone.utc)

    def next_slot(self, now: dt.datetime) -> dt.datetime:
        """The first slot after `now` (UTC)."""
        if self.every is not None:
            return self.latest_slot(now) + self.every
        assert self.cron is not None
        from croniter import croniter

        slot: dt.datetime = croniter(self.cron, now.astimezone(self.tz)).get_next(dt.datetime)
        return slot.astimezone(dt.timezone.utc)

    def slots_between(self, after: dt.datetime, until: dt.datetime) -> list[dt.datetime]:
        """The slots in (after, until], oldest first, at most MAX_CATCH_UP (the latest ones)."""
        slots: list[dt.datetime] = []
        slot = self.next_slot(after)
        while slot <= until:
            slots.append(slot)
            if len(slots) > MAX_CATCH_UP:
                slots.pop(0)
            slot = self.next_slot(slot)
        return slots

    def unique_key(self, slot: dt.datetime) -> str:
        return f"periodic:{self.name}:{slot.astimezone(dt.timezone.utc).isoformat()}"


registry: dict[str, Periodic] = {}
_registry_lock = threading.Lock()


def periodic(
    cron: str | None = None,
    *,
    every: dt.timedelta | None = None,
    tz: str = "UTC",
    catch_up: bool = False,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    queue: str = "default",
    priority: int = 0,
    max_attempts: int = retry.DEFAULT_MAX_ATTEMPTS,
    timeout: float | None = None,
) -> Callable[[F], F]:
    """Run the decorated function on a schedule: `@periodic(cron="0 3 * * *", tz="Europe/Paris")`
    or `@periodic(every=timedelta(seconds=30))`. The function is returned unchanged.

    Workers that import the module enqueue each slot once, however many run (the database
    decides, through `periodic_slots`); the queue then runs it like any task. A periodic task
    seen for the first time starts at its next slot.

    Args:
        cron: a cron expression (minute hour day-of-month month day-of-week), whose slots
            follow the wall clock of `tz`, daylight saving included. Exactly one of `cron` and
            `every`.
        every: an interval of at least a second; its slots are multiples of it since
            1970-01-01 UTC, so all workers agree on them.
        tz: an IANA time zone name for `cron`. Default UTC.
        catch_up: enqueue every slot missed while no worker ran (at most 1,000), instead of
            only the latest.
        args: positional arguments of every run (pickled now).
        kwargs: keyword arguments of every run.
        queue: the tasks' queue. Default `"default"`.
        priority: the tasks' priority. Default 0.
        max_attempts: the tasks' attempts. Default 25.
        timeout: the tasks' timeout in seconds.

    Returns:
        The decorator, which registers the function in this process and returns it unchanged.

    Raises:
        ConfigurationError: neither or both of `cron` and `every`, an invalid cron
            expression, an unknown time zone, `every` under a second, or a function whose
            `module:qualname` is over 300 characters.
        EnqueueError: (at decoration) arguments that do not pickle, a bad option, or a
            function workers could not import.
    """
    if (cron is None) == (every is None):
        raise errors.ConfigurationError("@periodic needs exactly one of cron=... or every=...")
    try:
        zone = zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        raise errors.ConfigurationError(
            f"@periodic: unknown time zone {tz!r} (expected an IANA name like 'Europe/Paris')"
        ) from None
    if cron is not None:
        from croniter import croniter

        if not isinstance(cron, str) or not croniter.is_valid(cron):
            raise errors.ConfigurationError(
                f"@periodic: invalid cron expression {cron!r} (expected e.g. '0 3 * * *': "
                "minute hour day-of-month month day-of-week)"
            )
    if every is not None and (not isinstance(every, dt.timedelta) or every.total_seconds() < 1):
        raise errors.ConfigurationError(
            f"@periodic: every= takes a timedelta of at least one second, not {every!r}"
        )
    options: dict[str, Any] = {
        "queue": queue,
        "priority": priority,
        "max_attempts": max_attempts,
        "timeout": timeout,
    }

    def decorate(func: F) -> F:
        target = getattr(func, "__dbqueue_func__", func)  # also on top of @handle_asynchronously
        name = serializer.handler_name(target)
        problem = too_long(name, PERIODIC_NAME_LENGTH)
        if problem:  # periodic_slots.name could not hold it
            raise errors.ConfigurationError(f"@periodic: the name {name[:60]!r}... is {problem}")
        entry = Periodic(
            func=target,
            name=name,
            cron=cron,
            every=every,
            tz=zone,
            catch_up=catch_up,
            args=tuple(args),
            kwargs=dict(kwargs or {}),
            options=options,
        )
        # Fail at import, not at 3 a.m.: the arguments must pickle and the options be valid.
        build(_VALIDATION, target, entry.args, dict(entry.kwargs), **options)
        with _registry_lock:
            registry[name] = entry
        return func

    return decorate


def database_now(conn: sa.Connection) -> dt.datetime:
    """The database clock: slots are decided by it, never by a worker's clock."""
    now: dt.datetime = conn.execute(sa.select(db_now())).scalar_one()
    return now


def last_slot(conn: sa.Connection, name: str) -> dt.datetime | None:
    """The latest slot already enqueued for `name` (None: never seen)."""
    value: dt.datetime | None = conn.execute(
        sa.select(periodic_slots.c.last_slot).where(periodic_slots.c.name == name)
    ).scalar_one_or_none()
    return value


def first_seen(conn: sa.Connection, name: str, slot: dt.datetime) -> None:
    """Record a periodic task seen for the first time at `slot` (a concurrent insert wins)."""
    values = {"name": name, "last_slot": slot, "updated_at": db_now()}
    upsert.insert_or_ignore(conn, periodic_slots, values, key=["name"])


def advance(conn: sa.Connection, name: str, seen: dt.datetime, slot: dt.datetime) -> bool:
    """Move `name` from slot `seen` to `slot`; False if another worker moved it first."""
    result = conn.execute(
        sa.update(periodic_slots)
        .where(periodic_slots.c.name == name, periodic_slots.c.last_slot == seen)
        .values(last_slot=slot, updated_at=db_now())
    )
    return result.rowcount == 1


def enqueue_due(
    conn: sa.Connection,
    *,
    now: dt.datetime | None = None,
    entries: Mapping[str, Periodic] | None = None,
    settings: config.Settings | None = None,
) -> list[int]:
    """Enqueue every periodic task whose slot has come, in the caller's transaction.

    Returns the ids of the tasks enqueued. `now` defaults to the database clock (tests pin it).
    """
    entries = registry if entries is None else entries
    now = database_now(conn) if now is None else now
    ids: list[int] = []
    for entry in list(entries.values()):
        slot = entry.latest_slot(now)
        seen = last_slot(conn, entry.name)
        if seen is None:
            first_seen(conn, entry.name, slot)
            continue
        if seen >= slot or not advance(conn, entry.name, seen, slot):
            continue
        slots = entry.slots_between(seen, slot) if entry.catch_up else [slot]
        for due in slots:
            task = enqueue(
                entry.func,
                entry.args,
                dict(entry.kwargs),
                unique_key=entry.unique_key(due),
                connection=conn,
                settings=settings,
                **entry.options,
            )
            ids.append(task.id)
        log.info(
            "periodic %s: enqueued %d slot(s), latest %s",
            entry.name,
            len(slots),
            slot.isoformat(),
            extra={"event": "periodic_enqueued", "handler": entry.name},
        )
    return ids


class Scheduler:
    """What a worker loop holds: `tick()` enqueues due periodic tasks at most every `interval`."""

    def __init__(self, settings: config.Settings, interval: float = 1.0) -> None:
        self.settings = settings
        self.interval = interval
        self._last = -math.inf

    def tick(self) -> list[int]:
        """Enqueue what is due; never raises (a failure is logged and retried next tick)."""
        if not registry or time.monotonic() - self._last < self.interval:
            return []
        self._last = time.monotonic()
        try:
            with self.settings.get_engine().begin() as conn:
                return enqueue_due(conn, settings=self.settings)
        except Exception as exc:
            log.error(
                "could not enqueue periodic tasks: %s",
                exc,
                extra={"event": "periodic_failed"},
            )
            return []


def upcoming(conn: sa.Connection) -> list[tuple[Periodic, dt.datetime | None, dt.datetime]]:
    """(periodic task, latest slot enqueued, next run) for each registered task, by name."""
    now = database_now(conn)
    rows = []
    for name in sorted(registry):
        entry = registry[name]
        seen = last_slot(conn, name)
        due = entry.latest_slot(now)
        next_run = due if seen is not None and seen < due else entry.next_slot(now)
        rows.append((entry, seen, next_run))
    return rows
