"""Publish/subscribe between applications that share a database, not code (resque-bus's idea).

Owns the in-code subscription registry (`subscribe`), the app key, every statement on
`bus_subscriptions` (`sync`, `list_subscriptions`, the read in `publish`), the fan-out of one
event into one task per matching subscription, and `dispatch`, the task every delivery runs.

    app B, C:  @bus.subscribe("user_created")  --bus.sync()-->  bus_subscriptions rows
    app A:     bus.publish("user_created", {...})  reads the rows, inserts one task per match
               (queue `<app_key>_<queue>`, callable `dbqueue.bus:dispatch`) on A's connection
    B's worker: dispatch("app_b.events:on_user_created", attributes) imports and calls it

The publisher never imports subscriber code: a subscription row names its handler as
`module:qualname`, and only the subscriber's worker imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import orm

from dbqueue import config, errors, executor, inline_mode, serializer, store, upsert
from dbqueue.enqueue import (  # `dbqueue.enqueue` is the function
    RunAt,
    _connection,
    build,
    caller_bind,
)
from dbqueue.schema import BUS_TEXT_LENGTH, bus_subscriptions, db_now, too_long

log = logging.getLogger("dbqueue.bus")

F = TypeVar("F", bound=Callable[..., Any])

RESERVED = ("bus_event_type", "bus_published_at", "bus_app_key")
_FLAG_LETTERS = {re.IGNORECASE: "i", re.MULTILINE: "m", re.DOTALL: "s", re.VERBOSE: "x"}


class PublishError(errors.EnqueueError):
    """An event that cannot be published: a bad event name, attributes that are not a JSON
    dict (the message names the attribute), or a reserved `bus_*` key. Nothing was stored.
    An `EnqueueError`."""


@dataclasses.dataclass(frozen=True)
class Subscription:
    """One `@bus.subscribe` in this process's code; `queue` is the suffix, before the app key.

    A `sync` one runs in the publisher's transaction, in this process only: it is never
    stored in `bus_subscriptions`, so no task delivers it.

    Attributes:
        matcher: the event name, or the regex's pattern (flags as an inline `(?i)` prefix).
        is_regex: whether `matcher` is a regex, matched with `re.search`.
        queue: the queue suffix: deliveries go to `<app_key>_<queue>`.
        handler: the handler as `module:qualname`.
        sync: run in the publisher's transaction instead of as a task.
    """

    matcher: str
    is_regex: bool
    queue: str
    handler: str
    sync: bool = False

    def matches(self, event_type: str) -> bool:
        """Whether an event of this type is delivered to this subscription."""
        return matches(self.matcher, self.is_regex, event_type)


@dataclasses.dataclass(frozen=True)
class SyncResult:
    """What `sync()` did: the application, subscriptions added and removed, and how many it
    has now."""

    app_key: str
    added: int
    removed: int
    total: int


@dataclasses.dataclass(frozen=True)
class Published:
    """An event whose publish committed, as `recording()` saw it: its type and its
    attributes (JSON-decoded)."""

    event_type: str
    attributes: dict[str, Any]


@dataclasses.dataclass
class _State:
    app_key: str | None = None
    inline: bool | None = None
    registry: list[Subscription] = dataclasses.field(default_factory=list)


_state = _State()
_recording: list[Published] | None = None  # `recording()`: the pytest fixtures' log


def configure(*, app_key: str | None = None, inline: bool | None = None) -> None:
    """Name this application (default: DBQUEUE_APP_KEY) and/or switch inline dispatch.

    Args:
        app_key: this application's name on the bus: its deliveries go to queues
            `<app_key>_<queue>` and its rows of `bus_subscriptions` carry it. 1-60 letters,
            digits, `_`, `.` or `-`.
        inline: True runs this process's own subscribers at publish (as `inline()`), False
            switches that off, None leaves it.

    Raises:
        ConfigurationError: an app key that is not 1-60 letters, digits, `_`, `.` or `-`.
    """
    if app_key is not None:
        _check_app_key(app_key)
        _state.app_key = app_key
    if inline is not None:
        _state.inline = inline


def app_key() -> str | None:
    """This application's key: `configure(app_key=...)`, else DBQUEUE_APP_KEY, else None."""
    return _state.app_key or os.environ.get("DBQUEUE_APP_KEY") or None


def _require_app_key(why: str) -> str:
    key = app_key()
    if key is None:
        raise errors.ConfigurationError(
            f"{why} needs an application key: set DBQUEUE_APP_KEY or call "
            "dbqueue.bus.configure(app_key='my_app')"
        )
    _check_app_key(key)
    return key


def _check_app_key(key: str) -> None:
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,60}", key):
        raise errors.ConfigurationError(
            f"bus app key {key!r} must be 1-60 letters, digits, '_', '.' or '-'"
        )


def _inline_enabled() -> bool:
    if _state.inline is not None:
        return _state.inline
    return config._env_bool("DBQUEUE_BUS_INLINE")


@contextlib.contextmanager
def recording() -> Iterator[list[Published]]:
    """Within the block, every event whose publish commits is appended to the list yielded,
    whether anyone subscribes or not (the `assert_published` / `refute_published` fixtures).

    Yields:
        The list of `Published` events, growing as publishes commit.
    """
    global _recording
    before, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = before


@contextlib.contextmanager
def inline(enabled: bool = True) -> Iterator[None]:
    """Within the block, `publish` runs this process's subscribers once it commits (tests).

    No `bus_subscriptions` row is read (no sync needed); each delivery is recorded as a task
    row as `dbqueue.inline()` does, and a failing handler leaves its task queued for a retry
    instead of raising. `DBQUEUE_BUS_INLINE=1` does the same for a whole process.

    Args:
        enabled: False switches inline delivery off within the block.
    """
    before = _state.inline
    _state.inline = enabled
    try:
        yield
    finally:
        _state.inline = before


# -- subscribing, in code --------------------------------------------------------------


def _matcher(event: str | re.Pattern[str]) -> tuple[str, bool]:
    """(stored text, is_regex); a compiled pattern's flags become an inline `(?i)` prefix."""
    if isinstance(event, re.Pattern):
        if not isinstance(event.pattern, str):
            raise errors.ConfigurationError(f"bus.subscribe: {event!r} is a bytes pattern")
        flags = event.flags & ~re.UNICODE
        letters = "".join(c for flag, c in _FLAG_LETTERS.items() if flags & flag)
        if flags & re.ASCII:
            letters += "a"
        unknown = flags & ~(re.ASCII | sum(_FLAG_LETTERS))
        if unknown:
            raise errors.ConfigurationError(
                f"bus.subscribe: regex flags {re.RegexFlag(unknown)!r} cannot be stored"
            )
        return (f"(?{letters})" if letters else "") + event.pattern, True
    if isinstance(event, str) and event:
        return event, False
    raise errors.ConfigurationError(
        f"bus.subscribe takes an event name or a compiled regex, not {event!r}"
    )


def subscribe(
    event: str | re.Pattern[str], *, queue: str = "default", sync: bool = False
) -> Callable[[F], F]:
    """Run the decorated `handler(attributes)` for every event named `event` (or matching it).

    Deliveries go to the queue `<app_key>_<queue>`. The function is returned unchanged, and
    can be decorated several times (a name and a regex: each matching subscription delivers).
    Subscriptions reach other applications' publishes once stored by `sync()` (which
    `dbqueue work --import` runs).

    Args:
        event: an event name (matched exactly) or a compiled regex (matched with
            `re.search`; anchor it with `^`/`$`).
        queue: the queue suffix, 1-35 letters, digits, `_`, `.` or `-`. Default `"default"`.
        sync: this process's `publish` calls the handler at once, in the publisher's
            transaction (a `session` parameter receives the publisher's Session, or
            Connection), and raises what it raises; other applications never see this
            subscription.

    Returns:
        The decorator, which registers the handler and returns it unchanged.

    Raises:
        ConfigurationError: an event that is neither a non-empty name nor a str regex, regex
            flags that cannot be stored, an event or a handler's `module:qualname` over 300
            characters, a bad queue name, or the same handler subscribed to the same event on
            two queues.
        EnqueueError: (at decoration) a handler workers could not import (a lambda, a local
            function).
    """
    matcher, is_regex = _matcher(event)
    _check_length("event", matcher)
    if not isinstance(queue, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,35}", queue):
        raise errors.ConfigurationError(
            f"bus.subscribe queue {queue!r} must be 1-35 letters, digits, '_', '.' or '-'"
        )

    def decorate(func: F) -> F:
        handler = serializer.handler_name(func)
        _check_length("handler", handler)
        sub = Subscription(matcher, is_regex, queue, handler, sync)
        for other in _state.registry:
            if (other.matcher, other.is_regex, other.handler) == (matcher, is_regex, handler):
                if (other.queue, other.sync) != (queue, sync):
                    raise errors.ConfigurationError(
                        f"{handler} subscribes to {matcher!r} twice, on queues "
                        f"{other.queue!r} (sync={other.sync}) and {queue!r} (sync={sync})"
                    )
                return func  # the same module imported twice (e.g. as __main__ and by name)
        _state.registry.append(sub)
        return func

    return decorate


def _check_length(what: str, text: str) -> None:
    """Refuse at subscribe time what `bus_subscriptions` could not store whole (MySQL/MariaDB:
    VARCHAR(300) columns in the unique key), on every engine, so that code that subscribes on
    one database subscribes on all of them."""
    problem = too_long(text, BUS_TEXT_LENGTH)
    if problem:
        raise errors.ConfigurationError(
            f"bus.subscribe: the {what} {text[:60]!r}... is {problem} "
            f"(bus_subscriptions.{'matcher' if what == 'event' else what})"
        )


def subscriptions() -> list[Subscription]:
    """The subscriptions this process's code has registered (`@subscribe`), in
    registration order, sync ones included."""
    return list(_state.registry)


def queue_name(key: str, queue: str) -> str:
    return f"{key}_{queue}"


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error as exc:
        log.error("bus: ignoring subscription with invalid regex %r: %s", pattern, exc)
        return None


def matches(matcher: str, is_regex: bool, event_type: str) -> bool:
    """Name equality, or `re.search` for a regex."""
    if not is_regex:
        return matcher == event_type
    pattern = _compiled(matcher)
    return pattern is not None and pattern.search(event_type) is not None


# -- statements on bus_subscriptions ---------------------------------------------------


def _lock_app(conn: sa.Connection, key: str) -> None:
    """Serialise syncs of one application (PostgreSQL; SQLite's BEGIN IMMEDIATE already does,
    MySQL's `upsert.named_lock` around the transaction)."""
    if conn.dialect.name == "postgresql":
        conn.execute(
            sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(f"dbqueue.bus:{key}")))
        )


def _stored(conn: sa.Connection, key: str) -> list[sa.Row[Any]]:
    """The application's rows: (id, matcher, is_regex, handler)."""
    cols = bus_subscriptions.c
    stmt = sa.select(cols.id, cols.matcher, cols.is_regex, cols.handler).where(cols.app_key == key)
    return list(conn.execute(stmt))


def _delete(conn: sa.Connection, ids: Sequence[int]) -> None:
    """Delete subscription rows by id."""
    if ids:
        conn.execute(sa.delete(bus_subscriptions).where(bus_subscriptions.c.id.in_(list(ids))))


def _upsert(conn: sa.Connection, key: str, subs: Sequence[Subscription]) -> None:
    """Insert the application's subscriptions, or update queue and updated_at of existing ones."""
    if not subs:
        return
    columns = ["app_key", "queue", "matcher", "is_regex", "handler"]
    upsert.insert_or_update(
        conn,
        bus_subscriptions,
        {c: sa.bindparam(c) for c in columns},
        key=["app_key", "matcher", "is_regex", "handler"],
        update=["queue"],
        touch={"updated_at": db_now()},
        params=[
            {
                "app_key": key,
                "queue": queue_name(key, s.queue),
                "matcher": s.matcher,
                "is_regex": s.is_regex,
                "handler": s.handler,
            }
            for s in subs
        ],
    )


def list_subscriptions(conn: sa.Connection) -> list[sa.Row[Any]]:
    """Every application's subscriptions, by app key, queue and matcher."""
    cols = bus_subscriptions.c
    stmt = sa.select(
        cols.app_key, cols.queue, cols.matcher, cols.is_regex, cols.handler, cols.updated_at
    ).order_by(cols.app_key, cols.queue, cols.matcher, cols.handler)
    return list(conn.execute(stmt))


_CANDIDATES = (
    sa.select(
        bus_subscriptions.c.app_key,
        bus_subscriptions.c.queue,
        bus_subscriptions.c.matcher,
        bus_subscriptions.c.is_regex,
        bus_subscriptions.c.handler,
        db_now().label("now"),
    )
    .where(
        sa.or_(
            bus_subscriptions.c.is_regex,
            bus_subscriptions.c.matcher == sa.bindparam("event_type", type_=sa.Text),
        )
    )
    .order_by(bus_subscriptions.c.id)
)


def _candidates(conn: sa.Connection, event_type: str) -> list[sa.Row[Any]]:
    """Subscriptions that may match: every regex, and names equal to the event; with now().

    The database clock comes back on each row, so a publish costs one read, not two.
    """
    return list(conn.execute(_CANDIDATES, {"event_type": event_type}))


def _database_now(conn: sa.Connection) -> Any:
    """The database clock (inline mode, which reads no subscription rows)."""
    return conn.execute(sa.select(db_now())).scalar_one()


# -- sync ------------------------------------------------------------------------------


def sync(
    *, settings: config.Settings | None = None, connection: sa.Connection | None = None
) -> SyncResult:
    """Replace this application's rows in `bus_subscriptions` with its in-code subscriptions.

    One transaction: a handler removed from the code disappears, a new one appears, a changed
    queue is updated. Run by `dbqueue work`/`workoff` after `--import`, and `dbqueue bus sync`.
    The process must have imported all of the application's subscriptions: the ones it has
    not imported are removed.

    Args:
        settings: the database to use. Default: `dbqueue.configure()`'s.
        connection: a Connection whose transaction the change joins.

    Returns:
        A `SyncResult`: the application's key, subscriptions added, removed, and in all.

    Raises:
        ConfigurationError: no application key (`DBQUEUE_APP_KEY` or `configure(app_key=)`).
        DatabaseUnavailable: dbqueue's own transaction could not reach the database.
    """
    settings = settings or config.current()
    key = _require_app_key("bus.sync()")
    wanted = {(s.matcher, s.is_regex, s.handler): s for s in _state.registry if not s.sync}
    engine = connection.engine if connection is not None else settings.get_engine()
    with upsert.named_lock(engine, f"bus:{key}"), _connection(settings, None, connection) as conn:
        _lock_app(conn, key)
        stored = _stored(conn, key)
        gone = [r.id for r in stored if (r.matcher, r.is_regex, r.handler) not in wanted]
        _delete(conn, gone)
        _upsert(conn, key, list(wanted.values()))
    added = len(set(wanted) - {(r.matcher, r.is_regex, r.handler) for r in stored})
    log.info(
        "bus: %s has %d subscription(s) (%d added, %d removed)",
        key,
        len(wanted),
        added,
        len(gone),
        extra={"event": "bus_sync", "app_key": key},
    )
    return SyncResult(key, added, len(gone), len(wanted))


# -- publishing ------------------------------------------------------------------------


def _json_problem(value: Any, path: str) -> str | None:
    """Where and why `value` is not plain JSON, or None when it is."""
    if value is None or isinstance(value, (str, bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is {value!r}, which JSON cannot hold"
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{path} has a key {k!r} that is not a string"
            problem = _json_problem(v, f"{path}[{k!r}]")
            if problem:
                return problem
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            problem = _json_problem(v, f"{path}[{i}]")
            if problem:
                return problem
        return None
    return (
        f"{path} is a {type(value).__name__}, which is not JSON: convert it to a string, "
        "number, boolean, list or dict first (a datetime: .isoformat())"
    )


def message(event_type: str, attributes: Any, published_at: str, publisher: str | None) -> Any:
    """The JSON-decoded attributes plus the bus fields: what a handler receives."""
    decoded = json.loads(json.dumps(attributes, allow_nan=False))
    decoded.update(bus_event_type=event_type, bus_published_at=published_at, bus_app_key=publisher)
    return decoded


def _validate(event_type: Any, attributes: Any) -> None:
    if not isinstance(event_type, str) or not event_type:
        raise PublishError(
            f"bus.publish: event type must be a non-empty string, not {event_type!r}"
        )
    where = f"bus.publish({event_type!r})"
    if not isinstance(attributes, Mapping):
        raise PublishError(f"{where}: attributes must be a dict, not {type(attributes).__name__}")
    for key in RESERVED:
        if key in attributes:
            raise PublishError(f"{where}: attribute {key!r} is reserved; the bus sets it")
    for key, value in attributes.items():
        if not isinstance(key, str):
            raise PublishError(f"{where}: attribute key {key!r} is not a string")
        problem = _json_problem(value, f"attribute {key!r}")
        if problem:
            raise PublishError(f"{where}: {problem}")


def _targets(conn: sa.Connection, event_type: str) -> tuple[list[tuple[str, str]], Any]:
    """[(queue, handler)] to deliver to, one per (application, handler), and the db time."""
    seen: set[tuple[str, str]] = set()
    targets: list[tuple[str, str]] = []
    now = None
    if _inline_enabled():
        matched = [s for s in _state.registry if not s.sync and s.matches(event_type)]
        if matched:
            key = _require_app_key("bus inline mode")
            rows = [(key, queue_name(key, s.queue), s.handler) for s in matched]
            now = _database_now(conn)
        else:
            rows = []
    else:
        candidates = _candidates(conn, event_type)
        rows = [
            (r.app_key, r.queue, r.handler)
            for r in candidates
            if matches(r.matcher, r.is_regex, event_type)
        ]
        now = candidates[0].now if candidates else None
    for key, queue, handler in rows:
        if (key, handler) not in seen:
            seen.add((key, handler))
            targets.append((queue, handler))
    return targets, now


def publish(
    event_type: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    session: orm.Session | None = None,
    connection: sa.Connection | None = None,
    run_at: RunAt = None,
    settings: config.Settings | None = None,
) -> list[int]:
    """Deliver an event to every application subscribed to it; returns the task ids.

    One task per matching subscription (an application's handler matched by both a name and a
    regex gets the event once), inserted on `session`/`connection` when given, so the event
    exists only if the caller's transaction commits. Nobody subscribed: one read, no insert.
    A handler receives the JSON-decoded attributes plus `bus_event_type`, `bus_app_key` (the
    publisher's) and `bus_published_at` (ISO 8601, database clock).

    Args:
        event_type: the event's name, a non-empty string.
        attributes: a dict with string keys and JSON values (strings, numbers, booleans,
            None, lists, dicts); not the reserved `bus_*` keys.
        session: an SQLAlchemy Session whose transaction the deliveries join.
        connection: a Connection whose transaction the deliveries join.
        run_at: deliver at this time (an aware datetime, a timedelta, or a callable).
        settings: the database and keys to use. Default: `dbqueue.configure()`'s.

    Returns:
        The ids of the delivery tasks (empty when nobody subscribes).

    Raises:
        PublishError: a bad event type or attributes; nothing stored.
        ConfigurationError: inline mode with matching subscribers but no application key.
        DatabaseUnavailable: dbqueue's own transaction could not reach the database.
        Exception: whatever a `sync=True` subscriber raises, in the publisher's transaction.
    """
    attributes = {} if attributes is None else attributes
    _validate(event_type, attributes)
    settings = settings or config.current()
    bind = caller_bind(session, connection)
    ids: list[int] = []
    with _connection(settings, session, connection) as conn:
        targets, now = _targets(conn, event_type)
        handlers = sorted({s.handler for s in _state.registry if s.sync and s.matches(event_type)})
        if handlers:
            now = now if now is not None else _database_now(conn)
            for handler in handlers:
                _call_sync(
                    handler,
                    message(event_type, attributes, now.isoformat(), app_key()),
                    bind or conn,
                )
        if targets:
            body = message(event_type, attributes, now.isoformat(), app_key())
            new = [
                build(settings, dispatch, (handler, body), None, queue=queue, run_at=run_at)
                for queue, handler in targets
            ]
            ids = store.insert(conn, new, notify=settings.notify)
    if _recording is not None:
        seen = Published(event_type, json.loads(json.dumps(attributes)))
        inline_mode.on_commit(bind, functools.partial(_recording.append, seen))
    if ids and (settings.inline or _inline_enabled()):
        inline_mode.after_commit(settings, bind, ids)
    return ids


def _call_sync(handler: str, attributes: dict[str, Any], bind: Any) -> None:
    """Call a sync subscriber in the publisher's transaction, with `session=` if it takes one."""
    func = serializer.import_handler(handler)
    if "session" in inspect.signature(func).parameters:
        func(attributes, session=bind)
    else:
        func(attributes)


def publish_at(
    when: RunAt,
    event_type: str,
    attributes: Mapping[str, Any] | None = None,
    **options: Any,
) -> list[int]:
    """`publish` delivered at `when` (a datetime, or a timedelta from the database's now).

    Args:
        when: an aware datetime, a timedelta from now (database clock), or a callable.
        event_type: the event's name.
        attributes: the event's JSON attributes.
        **options: `publish`'s other arguments (session, connection, settings).

    Returns:
        The ids of the delivery tasks.

    Raises:
        PublishError: a bad event type or attributes, as `publish`.
    """
    return publish(event_type, attributes, run_at=when, **options)


# -- delivering ------------------------------------------------------------------------


def dispatch(handler: str, attributes: dict[str, Any]) -> Any:
    """The task of every delivery: import the subscriber's handler by name and call it.

    Runs in the subscriber's worker; its result, exception and retries are the task's.

    Args:
        handler: the handler as `module:qualname`.
        attributes: the message: attributes plus the `bus_*` fields.

    Returns:
        What the handler returns.

    Raises:
        HandlerNotAllowed: the handler's module is outside `DBQUEUE_ALLOWED_MODULES`.
        HandlerImportError: the handler cannot be imported (retried, in case a deploy is
            still rolling).
    """
    allowed = config.current().allowed_modules
    if not serializer.module_allowed(handler, allowed):
        raise errors.HandlerNotAllowed(
            f"bus handler {handler} is not allowed (DBQUEUE_ALLOWED_MODULES={','.join(allowed)})"
        )
    try:
        func = serializer.import_handler(handler)
    except (ImportError, AttributeError) as exc:
        raise executor.HandlerImportError(
            f"cannot import bus handler {handler!r} ({type(exc).__name__}: {exc})"
        ) from exc
    return func(attributes)
