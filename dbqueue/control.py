"""Operator controls kept in the database, so they reach every worker on every host and
survive restarts: pausing queues and per-queue settings (`queue_settings`), and cancelling
tasks (a queued task at once, a running one by asking its worker).

    pause("mail")               workers stop claiming from mail within a second
    resume("mail")
    paused_queues()             {"mail"}
    configure_queue("mail", max_concurrency=5)
    cancel([12, 13])            queued: cancelled now; running: asked to stop

Every statement on `queue_settings` lives here; task transitions stay in store.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from dbqueue import config, database, errors, store, upsert
from dbqueue.schema import Status, db_now, queue_settings

_UNSET: Any = object()


def _upsert(conn: sa.Connection, queue: str, **values: Any) -> None:
    row = {"queue": queue, "paused": False, "max_concurrency": None, **values}
    upsert.insert_or_update(
        conn,
        queue_settings,
        row,
        key=["queue"],
        update=list(values),
        touch={"updated_at": db_now()},
    )


def _check_queues(queues: Sequence[str]) -> list[str]:
    if not queues:
        raise errors.ConfigurationError("name at least one queue")
    bad = [q for q in queues if not isinstance(q, str) or not q or len(q) > 100]
    if bad:
        raise errors.ConfigurationError(
            f"queue names are non-empty strings of at most 100 characters, not {bad[0]!r}"
        )
    return list(dict.fromkeys(queues))


def set_paused(conn: sa.Connection, queues: Sequence[str], paused: bool) -> None:
    for queue in _check_queues(queues):
        _upsert(conn, queue, paused=paused)


def read_paused(conn: sa.Connection) -> set[str]:
    """The paused queues (one indexed read of a table with a row per configured queue)."""
    stmt = sa.select(queue_settings.c.queue).where(queue_settings.c.paused.is_(True))
    return {row[0] for row in conn.execute(stmt)}


def read_settings(conn: sa.Connection) -> list[sa.Row[Any]]:
    """Every configured queue's settings, by name."""
    return list(conn.execute(sa.select(queue_settings).order_by(queue_settings.c.queue)))


def pause(*queues: str, settings: config.Settings | None = None) -> None:
    """Pause `queues` fleet-wide: workers stop claiming from them within a second.

    Tasks already running finish; enqueueing into a paused queue still works. The pause is a
    row of `queue_settings`, so it holds for every worker, including ones started later,
    until `resume`.

    Args:
        *queues: the queue names (a queue need not exist yet).
        settings: the database to use. Default: `dbqueue.configure()`'s.

    Raises:
        ConfigurationError: no queue named, or a name that is not a non-empty string of at
            most 100 characters.
        DatabaseUnavailable: the database cannot be reached.
    """
    settings = settings or config.current()
    with database.errors_translated(settings), settings.get_engine().begin() as conn:
        set_paused(conn, queues, True)


def resume(*queues: str, settings: config.Settings | None = None) -> None:
    """Resume paused `queues`: workers claim from them again within a second.

    Args:
        *queues: the queue names; resuming a queue that is not paused does nothing.
        settings: the database to use. Default: `dbqueue.configure()`'s.

    Raises:
        ConfigurationError: no queue named, or a name that is not a non-empty string.
        DatabaseUnavailable: the database cannot be reached.
    """
    settings = settings or config.current()
    with database.errors_translated(settings), settings.get_engine().begin() as conn:
        set_paused(conn, queues, False)


def paused_queues(settings: config.Settings | None = None) -> set[str]:
    """The names of the paused queues.

    Args:
        settings: the database to read. Default: `dbqueue.configure()`'s.

    Raises:
        DatabaseUnavailable: the database cannot be reached.
    """
    settings = settings or config.current()
    with database.errors_translated(settings), settings.get_engine().connect() as conn:
        return read_paused(conn)


def configure_queue(
    queue: str, *, max_concurrency: int | None = _UNSET, settings: config.Settings | None = None
) -> None:
    """Store a queue's settings, fleet-wide (`dbqueue queue-limit QUEUE N` does the same).

    Args:
        queue: the queue's name.
        max_concurrency: at most this many of the queue's tasks run at once across every
            worker; None removes the cap.
        settings: the database to use. Default: `dbqueue.configure()`'s.

    Raises:
        ConfigurationError: no setting given, `max_concurrency` not a positive int or None,
            or a bad queue name.
        DatabaseUnavailable: the database cannot be reached.
    """
    (queue,) = _check_queues([queue])
    values: dict[str, Any] = {}
    if max_concurrency is not _UNSET:
        if max_concurrency is not None and (
            not isinstance(max_concurrency, int)
            or isinstance(max_concurrency, bool)
            or max_concurrency < 1
        ):
            raise errors.ConfigurationError(
                f"max_concurrency must be a positive integer or None, not {max_concurrency!r}"
            )
        values["max_concurrency"] = max_concurrency
    if not values:
        raise errors.ConfigurationError("configure_queue: give a setting (max_concurrency=N)")
    settings = settings or config.current()
    with database.errors_translated(settings), settings.get_engine().begin() as conn:
        _upsert(conn, queue, **values)


@dataclasses.dataclass
class Cancelled:
    """What `cancel` did: ids cancelled at once, ids whose worker was asked to stop them."""

    cancelled: list[int] = dataclasses.field(default_factory=list)
    requested: list[int] = dataclasses.field(default_factory=list)


def cancel_tasks(conn: sa.Connection, task_ids: Iterable[int]) -> Cancelled:
    """Cancel tasks: queued ones now, running ones by request; TaskNotFound for an id that
    does not exist and InvalidOperation for a finished one (nothing is changed then)."""
    ids = sorted({int(i) for i in task_ids})
    statuses = store.statuses(conn, ids)
    missing = [i for i in ids if i not in statuses]
    if missing:
        raise errors.TaskNotFound(f"task {missing[0]} does not exist (it may have been pruned)")
    finished = [i for i in ids if statuses[i] not in (Status.QUEUED.value, Status.RUNNING.value)]
    if finished:
        raise errors.InvalidOperation(
            f"task {finished[0]} is already {statuses[finished[0]]}: only queued or running "
            "tasks can be cancelled (`dbqueue retry` queues a finished one again)"
        )
    return cancel_unfinished(conn, statuses)


def cancel_unfinished(conn: sa.Connection, statuses: Mapping[int, str]) -> Cancelled:
    """Cancel the queued tasks of `statuses` (id -> status as read) and ask the workers of
    the running ones to stop them; a task that finished since it was read is left as it is
    (the dashboard's bulk cancel of a filtered list)."""
    ids = sorted(statuses)
    done = Cancelled()
    queued = [i for i in ids if statuses[i] == Status.QUEUED.value]
    done.cancelled = store.cancel(conn, queued, returning=True) if queued else []
    running = [i for i in ids if statuses[i] == Status.RUNNING.value]
    # a queued task claimed meanwhile is running now: ask its worker instead
    running += [i for i in queued if i not in done.cancelled]
    done.requested = store.request_cancel(conn, running) if running else []
    return done


def cancel(task_ids: Iterable[int], *, settings: config.Settings | None = None) -> Cancelled:
    """Cancel tasks by id (see `cancel_tasks`)."""
    settings = settings or config.current()
    with database.errors_translated(settings), settings.get_engine().begin() as conn:
        return cancel_tasks(conn, task_ids)
