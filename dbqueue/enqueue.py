"""Putting tasks in the queue: enqueue, enqueue_many, schedule.

Owns validation of options, building the signed payload (with `reference`, how a callable is
named: a function, a model method by primary key, another object's method by pickle), choosing
the connection (the caller's Session/Connection, so the task commits or rolls back with their
data, or a short transaction of our own), and the one place that decides "store, or run
inline". The decorator and `delay` (decorator.py) come through here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import inspect
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import orm

from dbqueue import (
    config,
    database,
    errors,
    hooks,
    inline_mode,
    limits,
    retry,
    schema,
    serializer,
    store,
)
from dbqueue import task as task_module

P = ParamSpec("P")
R = TypeVar("R")

RunAt = dt.datetime | dt.timedelta | Callable[[], "dt.datetime | dt.timedelta"] | None
Bind = orm.Session | orm.scoped_session[orm.Session] | sa.Connection | None


class _Missing(enum.Enum):
    """The default of `enqueue`'s options: not given by the call, so a decorated function's
    own option applies, or else the built-in default (`_DEFAULTS`)."""

    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "<decorator's, else built-in default>"


_MISSING: Final = _Missing.MISSING

# An option given neither by the call nor by @handle_asynchronously is this.
_DEFAULTS: Final[dict[str, Any]] = {
    "priority": 0,
    "run_at": None,
    "queue": "default",
    "max_attempts": retry.DEFAULT_MAX_ATTEMPTS,
    "timeout": None,
    "unique_key": None,
    "on_conflict": "keep",
    "meta": None,
    "concurrency_key": None,
    "max_concurrency": None,
}

MAX_META_BYTES: Final = 4096  # meta is for a trace context or a tenant, not for data


def _options(func: Any, given: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The callable to store and all its options: built-in defaults < a decorated function's
    options < those `given` to the call (a `_MISSING` value is one the call did not give).

    One rule for every way in: `enqueue`, `enqueue_many`, `schedule`, and the decorated
    function's own call, `.enqueue` and `.map` (which are those). `enqueue` applies it to a
    plain function without this dict (its hot path), and so sees `_MISSING` values itself.
    """
    options = _DEFAULTS.copy()
    decorated = getattr(func, "__dbqueue_options__", None)
    if decorated is not None:
        options.update(decorated)
        func = serializer.undecorated(func)
    for name, value in given.items():
        if value is not _MISSING:
            options[name] = value
    return func, options


def _replace(on_conflict: Any) -> bool:
    """Whether a task whose unique_key is queued replaces that task's arguments and run_at."""
    if on_conflict is _MISSING:
        on_conflict = _DEFAULTS["on_conflict"]
    if on_conflict not in {"keep", "replace"}:
        raise errors.EnqueueError(f"on_conflict must be 'keep' or 'replace', not {on_conflict!r}")
    return bool(on_conflict == "replace")


def _run_at(run_at: RunAt) -> tuple[dt.datetime | None, float]:
    """(absolute time, or None) and seconds from the database's now."""
    if callable(run_at) and not isinstance(run_at, (dt.datetime, dt.timedelta)):
        run_at = run_at()
    if run_at is None:
        return None, 0.0
    if isinstance(run_at, dt.timedelta):
        seconds = run_at.total_seconds()
        if not math.isfinite(seconds):
            raise errors.EnqueueError(f"run_at={run_at!r} is not a finite delay")
        return None, seconds
    if isinstance(run_at, dt.datetime):
        if run_at.tzinfo is None:
            raise errors.EnqueueError(
                f"run_at={run_at.isoformat()} is a naive datetime; pass an aware one "
                "(datetime.now(timezone.utc) + ...) or a timedelta"
            )
        if run_at.year > 9000:
            raise errors.EnqueueError(f"run_at={run_at.isoformat()} is too far in the future")
        return run_at, 0.0
    raise errors.EnqueueError(
        f"run_at must be a datetime, a timedelta or a callable returning one, "
        f"not {type(run_at).__name__}"
    )


def _check_options(priority: Any, queue: Any, max_attempts: Any, timeout: Any) -> None:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise errors.EnqueueError(f"priority must be an int, not {priority!r}")
    if not -(2**31) <= priority < 2**31:
        raise errors.EnqueueError(f"priority {priority} is out of range (32-bit integer)")
    if not isinstance(queue, str) or not 0 < len(queue) <= 100:
        raise errors.EnqueueError(
            f"queue must be a non-empty string of at most 100 characters, not {queue!r}"
        )
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise errors.EnqueueError(f"max_attempts must be a positive int, not {max_attempts!r}")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
    ):
        raise errors.EnqueueError(f"timeout must be a positive number of seconds, not {timeout!r}")


def reference(func: Any) -> tuple[str, tuple[Any, ...]]:
    """(handler, reference) for a callable: a function by name, a model method by primary key.

    A bound method of an SQLAlchemy model instance is stored as (class, primary key, method)
    and reloaded in a fresh session by the worker; of any other object, the object is pickled;
    of a class (a classmethod), it is named `module:Class.method`, the class it was called on.
    """
    owner = getattr(func, "__self__", None)
    if owner is not None and not inspect.ismodule(owner) and inspect.ismethod(func):
        method = func.__name__
        if inspect.isclass(owner):
            return f"{serializer.handler_name(owner)}.{method}", ("func",)
        cls = type(owner)
        class_handler = serializer.handler_name(cls)
        handler = f"{class_handler}.{method}"
        state = sa.inspect(owner, raiseerr=False)
        if state is not None and isinstance(state, orm.InstanceState):
            if state.identity is None:
                raise errors.EnqueueError(
                    f"{cls.__name__} instance has no primary key yet: flush or commit it "
                    "before enqueueing its method"
                )
            return handler, ("model", class_handler, tuple(state.identity), method)
        return handler, ("object", owner, method)
    return serializer.handler_name(func), ("func",)


@dataclasses.dataclass(slots=True)  # not frozen: a frozen init costs a setattr call per field
class _Recipe:
    """What every task of one call shares: the callable's reference and the checked options.

    Worked out once per `enqueue_many` batch, not once per item (measured: the checks and
    the reference cost as much as pickling a small argument tuple)."""

    func: Any
    handler: str
    ref: tuple[Any, ...]
    keyring: Any
    max_payload_bytes: int
    queue: str
    priority: int
    run_at: dt.datetime | None
    delay: float
    max_attempts: int
    timeout: float | None
    unique_key: str | None
    meta: dict[str, Any] | None
    concurrency_key: limits.KeyOption = None
    max_concurrency: int | None = None

    def task(self, args: Sequence[Any], kwargs: dict[str, Any] | None) -> store.NewTask:
        """Sign one task's arguments; raises EnqueueError naming what cannot be stored."""
        args = tuple(args)
        kwargs = dict(kwargs or {})
        handler = self.handler
        meta = self.meta
        if hooks.active:  # on_enqueue hooks may add to this task's meta
            view = hooks.TaskView(
                None, handler, self.queue, self.priority, 0, args, kwargs, dict(meta or {})
            )
            hooks.fire("on_enqueue", view)
            meta = _check_meta(view.meta, handler) if view.meta else None
        try:
            payload = serializer.dumps(self.keyring, "payload", handler, (self.ref, args, kwargs))
        except errors.DbqueueError:
            raise
        except Exception as exc:
            serializer.pickle_args(handler, args, kwargs, self.func)
            # every argument pickles, so the reference does: the object whose method this is
            raise errors.EnqueueError(
                f"the object bound to {handler} cannot be pickled: {type(exc).__name__}: {exc}"
            ) from exc
        if len(payload) > self.max_payload_bytes:
            raise errors.EnqueueError(
                f"payload of {handler} is {_size(len(payload))}, limit is "
                f"{_size(self.max_payload_bytes)}; store large data elsewhere and pass a "
                "reference"
            )
        return store.NewTask(
            handler=handler,
            payload=payload,
            queue=self.queue,
            priority=self.priority,
            run_at=self.run_at,
            delay=self.delay,
            max_attempts=self.max_attempts,
            timeout=self.timeout,
            unique_key=self.unique_key,
            meta=meta,
            concurrency_key=limits.key_for(self.concurrency_key, args, kwargs, handler),
            max_concurrency=self.max_concurrency,
        )


def _check_meta(meta: Any, handler: str) -> dict[str, Any] | None:
    """`meta` if it is a small JSON object with string keys; else EnqueueError saying why."""
    if meta is None:
        return None
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise errors.EnqueueError(
            f"meta of {handler} must be a dict with string keys, not {type(meta).__name__}"
        )
    try:
        size = len(json.dumps(meta, allow_nan=False).encode())
    except (TypeError, ValueError) as exc:
        raise errors.EnqueueError(
            f"meta of {handler} must be JSON (str, int, float, bool, None, list, dict): {exc}"
        ) from exc
    if size > MAX_META_BYTES:
        raise errors.EnqueueError(
            f"meta of {handler} is {size} bytes, limit is {MAX_META_BYTES}: keep meta for "
            "small context (a trace id, a tenant); pass data as arguments"
        )
    return meta or None


def _recipe(
    settings: config.Settings,
    func: Any,
    *,
    priority: int = _DEFAULTS["priority"],
    run_at: RunAt = _DEFAULTS["run_at"],
    queue: str = _DEFAULTS["queue"],
    max_attempts: int = _DEFAULTS["max_attempts"],
    timeout: float | None = _DEFAULTS["timeout"],
    unique_key: str | None = _DEFAULTS["unique_key"],
    meta: dict[str, Any] | None = _DEFAULTS["meta"],
    concurrency_key: limits.KeyOption = _DEFAULTS["concurrency_key"],
    max_concurrency: int | None = _DEFAULTS["max_concurrency"],
) -> _Recipe:
    if not callable(func):
        raise errors.EnqueueError(f"{func!r} is not callable")
    _check_options(priority, queue, max_attempts, timeout)
    if unique_key is not None and not isinstance(unique_key, str):
        raise errors.EnqueueError(f"unique_key must be a string, not {unique_key!r}")
    if unique_key is not None and (
        problem := schema.too_long(unique_key, schema.UNIQUE_KEY_BYTES, "bytes")
    ):
        raise errors.EnqueueError(f"unique_key {unique_key[:60]!r}... is {problem} (UTF-8)")
    handler, ref = reference(func)
    limits.check(concurrency_key, max_concurrency, handler)
    absolute, delay = _run_at(run_at)
    return _Recipe(
        func=func,
        handler=handler,
        ref=ref,
        keyring=settings.keyring(),
        max_payload_bytes=settings.max_payload_bytes,
        queue=queue,
        priority=priority,
        run_at=absolute,
        delay=delay,
        max_attempts=max_attempts,
        timeout=None if timeout is None else float(timeout),
        unique_key=unique_key,
        meta=_check_meta(meta, handler),
        concurrency_key=concurrency_key,
        max_concurrency=max_concurrency,
    )


def build(
    settings: config.Settings,
    func: Any,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None,
    **options: Any,
) -> store.NewTask:
    """Validate and sign one task; raises EnqueueError before anything touches the database."""
    return _recipe(settings, func, **options).task(args, kwargs)


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB" if n >= 1024 * 1024 else f"{n / 1024:.1f} KiB"


def caller_bind(session: Bind, connection: Bind) -> Any:
    """The caller's Session or Connection, if they gave one (a scoped_session resolved)."""
    bind = session if session is not None else connection
    if isinstance(bind, orm.scoped_session):  # Flask-SQLAlchemy's db.session, for one
        return bind()
    return bind


@contextmanager
def _connection(
    settings: config.Settings, session: Bind, connection: Bind
) -> Iterator[sa.Connection]:
    """The caller's connection (their transaction), or a transaction of our own.

    (A lone task of our own on PostgreSQL and MySQL skips this: store.insert_alone.)
    """
    bind = caller_bind(session, connection)
    if isinstance(bind, orm.Session):
        yield bind.connection()
    elif isinstance(bind, sa.Connection):
        yield bind
    elif bind is None:
        with database.errors_translated(settings), settings.get_engine().begin() as conn:
            yield conn
    else:
        raise errors.EnqueueError(
            f"session= takes an SQLAlchemy Session and connection= a Connection, not {bind!r}"
        )


def _stored(
    settings: config.Settings,
    session: Bind,
    connection: Bind,
    new: list[store.NewTask],
    replace: bool,
) -> list[int]:
    """store.insert in the caller's transaction, or in our own, which is run again when
    MySQL/MariaDB ends it over a lock conflict (a deadlock or lock wait on a unique key);
    in the caller's, such a conflict is a LockConflict telling them to run theirs again."""

    def insert(conn: sa.Connection) -> list[int]:
        return store.insert(conn, new, replace=replace, notify=settings.notify)

    if session is None and connection is None:
        return database.in_own_transaction(settings, insert)
    with _connection(settings, session, connection) as conn, database.conflicts_named("enqueue"):
        return insert(conn)


def enqueue(
    func: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    priority: int | _Missing = _MISSING,
    run_at: RunAt | _Missing = _MISSING,
    queue: str | _Missing = _MISSING,
    max_attempts: int | _Missing = _MISSING,
    timeout: float | _Missing | None = _MISSING,
    unique_key: str | _Missing | None = _MISSING,
    on_conflict: str | _Missing = _MISSING,
    meta: dict[str, Any] | _Missing | None = _MISSING,
    concurrency_key: limits.KeyOption | _Missing = _MISSING,
    max_concurrency: int | _Missing | None = _MISSING,
    session: orm.Session | orm.scoped_session[orm.Session] | None = None,
    connection: sa.Connection | None = None,
    settings: config.Settings | None = None,
) -> task_module.Task:
    """Store one task and return its handle; inside `session`/`connection`'s transaction if given.

    An option not given is the decorator's when `func` is an @handle_asynchronously function,
    else its default. Everything is validated and the arguments pickled and signed before the
    database is touched, so a refused task stores nothing.

    Args:
        func: the function (or bound method) a worker will call: importable by the workers, so
            module-level; not a lambda, a local function or one defined in `__main__`. A
            method of an SQLAlchemy model instance is stored as its class and primary key, and
            the worker reloads the row.
        args: positional arguments, pickled now.
        kwargs: keyword arguments, pickled now.
        priority: lower runs first (delayed_job's rule); a 32-bit integer. Default 0.
        run_at: not run before this: an aware datetime, a timedelta from now on the database
            clock, or a callable returning either. Default: now.
        queue: the queue's name; workers choose queues with `dbqueue work -q`. Default
            `"default"`.
        max_attempts: runs before the task is `failed` for good. Default 25.
        timeout: seconds a run may take before `TaskTimeout` is raised inside it. Default: the
            worker's `--timeout`, else none.
        unique_key: at most one queued-or-running task per key: a task whose key is taken is
            not stored twice.
        on_conflict: with `unique_key`, `"keep"` (default) returns the existing task;
            `"replace"` updates its arguments and run_at if it has not started.
        meta: a small JSON dict stored in its own column (not pickled, not signed), readable
            as `Task.meta` and by hooks (trace context, tenant).
        concurrency_key: a string, or a callable of the task's arguments (called here), naming
            a group of tasks of which at most `max_concurrency` run at once, fleet-wide.
        max_concurrency: the limit for `concurrency_key` (an int >= 1); both or neither.
        session: an SQLAlchemy Session (or scoped_session) whose transaction the task joins:
            it exists only if that transaction commits.
        connection: an SQLAlchemy Connection whose transaction the task joins.
        settings: the database and keys to use. Default: `dbqueue.configure()`'s.

    Returns:
        The task's handle (`Task`), whose `id` names the row; with `unique_key`, possibly the
        task that was already queued.

    Raises:
        EnqueueError: the task cannot be stored: an argument that does not pickle (named), a
            payload over `DBQUEUE_MAX_PAYLOAD_BYTES`, a callable workers could not import, a
            naive datetime or bad `run_at`, an option of the wrong type or out of range, a
            unique key over 64 KiB of UTF-8, a concurrency key without a limit (or the
            reverse), a `session` that is not a Session. Nothing was stored.
        DatabaseUnavailable: dbqueue's own transaction could not reach the database.
        SchemaError: the database has no dbqueue tables, or older ones (run `dbqueue migrate`).
    """
    if hasattr(func, "__dbqueue_options__"):  # decorated (decorator.py)
        # Its options where this call gives none, then the plain path with every option given.
        func, options = _options(
            func,
            {
                "priority": priority,
                "run_at": run_at,
                "queue": queue,
                "max_attempts": max_attempts,
                "timeout": timeout,
                "unique_key": unique_key,
                "on_conflict": on_conflict,
                "meta": meta,
                "concurrency_key": concurrency_key,
                "max_concurrency": max_concurrency,
            },
        )
        return enqueue(
            func, args, kwargs, session=session, connection=connection, settings=settings, **options
        )
    # A plain function: `_options`' rule without its middle layer, written out because this is
    # the benchmarked path (measured: the dict round trip cost 0.7 us of 7, these checks 0.1).
    replace = _replace(on_conflict)
    settings = settings or config.current()
    new = build(
        settings,
        func,
        args,
        kwargs,
        priority=_DEFAULTS["priority"] if priority is _MISSING else priority,
        run_at=_DEFAULTS["run_at"] if run_at is _MISSING else run_at,
        queue=_DEFAULTS["queue"] if queue is _MISSING else queue,
        max_attempts=_DEFAULTS["max_attempts"] if max_attempts is _MISSING else max_attempts,
        timeout=_DEFAULTS["timeout"] if timeout is _MISSING else timeout,
        unique_key=_DEFAULTS["unique_key"] if unique_key is _MISSING else unique_key,
        meta=None if meta is _MISSING else meta,
        concurrency_key=None if concurrency_key is _MISSING else concurrency_key,
        max_concurrency=None if max_concurrency is _MISSING else max_concurrency,
    )
    one_statement = new.unique_key is None and not settings.inline
    own = session is None and connection is None
    if one_statement and own:
        alone = database.retried(
            settings, lambda: store.insert_alone(settings.get_engine(), new, notify=settings.notify)
        )
        if alone is not None:
            return task_module.Task(alone, settings=settings)
    (task_id,) = _stored(settings, session, connection, [new], replace)
    if settings.inline:
        inline_mode.after_commit(settings, caller_bind(session, connection), [task_id])
    return task_module.Task(task_id, settings=settings)


def enqueue_many(
    func: Callable[..., Any],
    items: Iterable[Any],
    *,
    session: orm.Session | orm.scoped_session[orm.Session] | None = None,
    connection: sa.Connection | None = None,
    settings: config.Settings | None = None,
    **options: Any,
) -> list[int]:
    """Store many tasks of one function in one round trip; returns their ids.

    Args:
        func: the function, as for `enqueue`.
        items: one per task: a tuple of positional arguments, a dict of keyword arguments, or
            a single argument.
        session: an SQLAlchemy Session whose transaction the tasks join.
        connection: an SQLAlchemy Connection whose transaction the tasks join.
        settings: the database and keys to use. Default: `dbqueue.configure()`'s.
        **options: `enqueue`'s options (priority, queue, run_at, ...), the same for every
            task; a decorated function's own apply unless given. A callable `run_at` is
            called once.

    Returns:
        The ids of the tasks, in the order of `items`.

    Raises:
        EnqueueError: as `enqueue`, for any item: nothing is stored.
        DatabaseUnavailable: dbqueue's own transaction could not reach the database.
        SchemaError: the database has no dbqueue tables, or older ones (run `dbqueue migrate`).
    """
    func, options = _options(func, options)
    replace = _replace(options.pop("on_conflict"))
    settings = settings or config.current()
    recipe = _recipe(settings, func, **options)  # once: a callable `run_at` is asked once too
    new = []
    for item in items:
        if isinstance(item, tuple):
            new.append(recipe.task(item, None))
        elif isinstance(item, dict):
            new.append(recipe.task((), item))
        else:
            new.append(recipe.task((item,), None))
    ids = _stored(settings, session, connection, new, replace)
    if settings.inline:
        inline_mode.after_commit(settings, caller_bind(session, connection), ids)
    return ids


def schedule(
    when: RunAt,
    func: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> task_module.Task:
    """`enqueue` with `run_at=when` first: `schedule(timedelta(hours=1), send_report)`.

    Args:
        when: an aware datetime, a timedelta from now (database clock), or a callable
            returning either. It overrides a decorated function's `run_at`.
        func: the function, as for `enqueue`.
        args: positional arguments.
        kwargs: keyword arguments.
        **options: `enqueue`'s other options (priority, queue, session, ...).

    Returns:
        The task's handle.

    Raises:
        EnqueueError: as `enqueue` (a naive datetime among others).
        DatabaseUnavailable: dbqueue's own transaction could not reach the database.
    """
    return enqueue(func, args, kwargs, run_at=when, **options)
