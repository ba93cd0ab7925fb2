"""Running one claimed task, as a sequence of named steps, into an Outcome.

    verify & unpickle the payload -> check the allow-list -> resolve the callable
    -> call it (awaiting coroutines, under the timeout) -> capture result or exception
    -> decide retry or fail (retry.py)

Owns no SQL and no transactions: the worker claims, and records what this returns. Nothing
here lets an exception escape: a bad task becomes a failed Outcome, never a dead worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import inspect
import logging
import os
import pickle
import signal
import threading
import traceback
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from dbqueue import config, errors, hooks, retry, serializer, store
from dbqueue.schema import Status

log = logging.getLogger("dbqueue.worker")


class PayloadError(errors.DbqueueError):
    """The stored arguments could not be turned back into a call (not retried)."""


class HandlerImportError(errors.DbqueueError):
    """The task's callable cannot be imported here (retried: a deploy may still be rolling)."""


class ModelNotFound(errors.DbqueueError):
    """The model instance whose method was enqueued no longer exists (not retried)."""


retry.NOT_RETRIED = (*retry.NOT_RETRIED, PayloadError, ModelNotFound)


@dataclasses.dataclass
class Prepared:
    """A claimed row decoded as far as it can be without the database: its callable (for
    functions and objects; a model's instance is loaded when its run starts), its arguments,
    and whether it is a coroutine function (the worker's event loop runs those), or why it
    cannot run (the run then fails with `error`)."""

    row: Any
    ref: tuple[Any, ...] = ()
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    func: Callable[..., Any] | None = None
    is_async: bool = False
    error: Exception | None = None


def prepare(settings: config.Settings, row: Any) -> Prepared:
    """Decode `row` and find out whether it is an `async def` task. Never raises."""
    try:
        ref, args, kwargs = _unpack(settings, row)
        prepared = Prepared(row, ref, args, kwargs)
        kind = ref[0]
        if kind == "func":
            prepared.func = _import(row.handler, "handler")
            prepared.is_async = inspect.iscoroutinefunction(prepared.func)
        elif kind == "object":
            _, obj, method = ref
            prepared.func = serializer.undecorated(getattr(obj, method))
            prepared.is_async = inspect.iscoroutinefunction(prepared.func)
        elif kind == "model":
            cls = _import(ref[1], "model")
            prepared.is_async = inspect.iscoroutinefunction(
                serializer.undecorated(getattr(cls, ref[3], None))
            )
        else:
            raise PayloadError(f"malformed task row: unknown reference kind {kind!r}")
        return prepared
    except Exception as exc:
        return Prepared(row, error=exc)


def _unpack(settings: config.Settings, row: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    if not serializer.module_allowed(row.handler, settings.allowed_modules):
        raise errors.HandlerNotAllowed(
            f"handler {row.handler} is not allowed (DBQUEUE_ALLOWED_MODULES="
            f"{','.join(settings.allowed_modules)})"
        )
    if not row.payload:
        raise PayloadError("malformed task row: payload is empty")
    body = serializer.verify(settings.keyring(), "payload", row.handler, row.payload)
    try:
        ref, args, kwargs = pickle.loads(body)
    except (ImportError, AttributeError) as exc:
        raise HandlerImportError(
            f"arguments of {row.handler} could not be unpickled: {type(exc).__name__}: {exc}"
        ) from exc
    except Exception as exc:
        raise PayloadError(
            f"arguments of {row.handler} could not be unpickled: {type(exc).__name__}: {exc}"
        ) from exc
    return ref, args, kwargs


def _import(name: str, what: str) -> Any:
    try:
        return serializer.import_handler(name)
    except (ImportError, AttributeError) as exc:
        module = name.partition(":")[0]
        missing = getattr(exc, "name", None) or ""
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and f"{module}.".startswith(f"{missing}."):
            # The task's own module, not one it imports: usually a worker started elsewhere.
            hint = (
                f": not on this worker's path (working directory {os.getcwd()}); start the "
                "worker where the application's code is, or set PYTHONPATH"
            )
        raise HandlerImportError(
            f"cannot import {what} {name!r} ({type(exc).__name__}: {exc}){hint}"
        ) from exc


def load(
    settings: config.Settings, prepared: Prepared, bind: sa.Engine | sa.Connection | None = None
) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], orm.Session | None]:
    """(callable, args, kwargs, session to commit) of a prepared row; raises on a bad row.

    A model's instance is read here, when its run starts, so that it sees what the tasks
    before it in the batch wrote."""
    if prepared.error is not None:
        raise prepared.error
    if prepared.func is not None:
        return prepared.func, prepared.args, prepared.kwargs, None
    _, class_handler, identity, method = prepared.ref
    cls = _import(class_handler, "model")
    session = orm.Session(bind if bind is not None else settings.get_engine())
    pk = identity[0] if len(identity) == 1 else identity
    instance = session.get(cls, pk)
    if instance is None:
        session.close()
        raise ModelNotFound(f"{cls.__name__} id={pk!r} no longer exists")
    func = serializer.undecorated(getattr(instance, method))
    return func, prepared.args, prepared.kwargs, session


def load_call(
    settings: config.Settings, row: Any, bind: sa.Engine | sa.Connection | None = None
) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], orm.Session | None]:
    """(callable, args, kwargs, session to commit) for a claimed row; raises on a bad row."""
    return load(settings, prepare(settings, row), bind)


class _Alarm:
    """Raise TaskTimeout in the main thread when a task runs past its timeout (SIGALRM).

    Only the soft stop: a task stuck in C code ignores it, and the worker's watchdog then
    ends the whole process (the process boundary is the hard limit).
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.active = seconds is not None and threading.current_thread() is threading.main_thread()

    def _fire(self, signum: int, frame: Any) -> None:
        raise errors.TaskTimeout(f"timed out after {self.seconds:g}s")

    def __enter__(self) -> None:
        if self.active:
            self._previous = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, float(self.seconds or 0))

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)


def call(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
) -> Any:
    """Call the task, awaiting it in a fresh event loop when it is a coroutine."""
    with _Alarm(timeout):
        result = func(*args, **kwargs)
        if inspect.isawaitable(result):
            result = _run_coroutine(result, timeout)
    if inspect.isgenerator(result):
        raise TypeError("task returned a generator, which cannot be stored; return a list instead")
    return result


def _run_coroutine(awaitable: Any, timeout: float | None) -> Any:
    """Await in a fresh event loop; in a thread of its own if this thread already runs one
    (inline mode under `enqueue_async`, where asyncio.run would refuse)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_await(awaitable, timeout))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _await(awaitable, timeout)).result()


async def _await(awaitable: Any, timeout: float | None) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        raise errors.TaskTimeout(f"timed out after {timeout:g}s") from None


def describe(exc: BaseException) -> str:
    """The readable `error` text: class, message and traceback."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


def _store_exception(
    settings: config.Settings, handler: str, exc: BaseException
) -> tuple[bytes | None, str | None]:
    """Signed pickle of the exception if it survives a round trip, else a note why not.

    An exception that pickles but does not unpickle (a custom __init__) would crash every
    reader later; the round trip catches it here.
    """
    try:
        body = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(body)
    except Exception as why:
        return None, f"(the exception could not be stored: {type(why).__name__}: {why})"
    if len(body) > settings.max_payload_bytes:
        return None, f"(the exception was not stored: {len(body)} bytes is over the limit)"
    return serializer.sign(settings.keyring(), "exception", handler, body), None


def _store_result(
    settings: config.Settings, handler: str, value: Any
) -> tuple[bytes | None, str | None]:
    """Signed pickle of the return value; None for None (most tasks return nothing), which the
    row stores as NULL and Task.result reads back as None, so there is nothing to sign."""
    if value is None:
        return None, None
    try:
        body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as why:
        return None, f"result could not be stored: {type(why).__name__}: {why}"
    if len(body) > settings.max_payload_bytes:
        return None, (
            f"result could not be stored: {len(body)} bytes is over the limit of "
            f"{settings.max_payload_bytes}"
        )
    return serializer.sign(settings.keyring(), "result", handler, body), None


def execute(
    settings: config.Settings,
    row: Any,
    default_timeout: float | None = None,
    bind: sa.Engine | sa.Connection | None = None,
    prepared: Prepared | None = None,
) -> store.Outcome:
    """Run one claimed task and say how it ended. Never raises for the task's sake.

    Hooks (hooks.py) run around the call only when some are registered: without any, this
    is the same few calls it always was.
    """
    timeout = row.timeout if row.timeout is not None else default_timeout
    view: hooks.TaskView | None = None
    own: dict[str, Any] | None = None
    func: Any = None
    try:
        func, args, kwargs, session = load(settings, prepared or prepare(settings, row), bind)
        own = hooks.own_hooks(func)
        try:
            if hooks.active or own:
                view = task_view(row, args, kwargs)
                hooks.fire_strict("before_task", view, extra=own)
                value = hooks.around(view, lambda: call(func, args, kwargs, timeout), extra=own)
            else:
                value = call(func, args, kwargs, timeout)
            if session is not None:
                session.commit()
        finally:
            if session is not None:
                session.close()
    except Exception as exc:
        return _raised(settings, row, exc, view, own, func)
    return _returned(settings, row, value, view, own)


class Interrupted(errors.DbqueueError):
    """An async task cancelled because its worker stopped (SIGTERM) and the grace period ran
    out: the run is given back to the queue, as the rescue of a killed worker's task is."""


class Running:
    """An async task on the worker's event loop, as the worker sees it: what to cancel (the
    asyncio task of its call, once started) and why (`reason`: 'cancel' for an operator's
    request, 'stop' at the end of the grace period)."""

    def __init__(self, row: Any, timeout: float | None) -> None:
        self.row = row
        self.timeout = timeout
        self.started: float | None = None  # monotonic; None while it waits for a slot
        self.reason: str | None = None
        self.current: asyncio.Task[Any] | None = None
        self.ended = False  # its outcome is ready (recorded by the worker's next look)

    def stop_exception(self) -> Exception:
        if self.reason == "stop":
            return Interrupted(
                f"task {self.row.id} was cancelled: its worker stopped and the grace period "
                "ran out (returned to the queue)"
            )
        return errors.TaskCancelled(f"task {self.row.id} was cancelled while running")

    def cancel(self, reason: str) -> None:
        """Cancel the run (called on the loop's thread)."""
        self.reason = self.reason or reason
        if self.current is not None:
            self.current.cancel()


async def execute_async(
    settings: config.Settings,
    prepared: Prepared,
    running: Running,
    hook_pool: Callable[[], concurrent.futures.Executor],
) -> store.Outcome:
    """`execute` for an `async def` task, on the worker's event loop: the same steps, hooks
    and outcomes; the timeout is asyncio's, a cancel request cancels the coroutine.

    around_task hooks are synchronous middleware (`return call_next()`): for an async task
    each chain runs in a thread of `hook_pool()` whose call_next waits for the coroutine,
    which runs on the loop in the hook's context (so a span or a contextvar it sets is the
    coroutine's too). Without around hooks no thread is involved.
    """
    row = prepared.row
    view: hooks.TaskView | None = None
    own: dict[str, Any] | None = None
    func: Any = None
    running.current = asyncio.current_task()
    try:
        func, args, kwargs, session = load(settings, prepared)
        own = hooks.own_hooks(func)
        try:
            if hooks.active or own:
                view = task_view(row, args, kwargs)
                hooks.fire_strict("before_task", view, extra=own)
                if hooks.registered("around_task", own):
                    value = await _around_in_thread(
                        view, own, lambda: _await_call(func, args, kwargs, running), hook_pool()
                    )
                else:
                    value = await _await_call(func, args, kwargs, running)
            else:
                value = await _await_call(func, args, kwargs, running)
            if session is not None:
                session.commit()
        finally:
            if session is not None:
                session.close()
    except asyncio.CancelledError:
        if running.reason is None:
            raise
        # cancelled outside the call itself (in a hook, or before it started)
        return _raised(settings, row, running.stop_exception(), view, own, func)
    except Exception as exc:
        return _raised(settings, row, exc, view, own, func)
    return _returned(settings, row, value, view, own)


async def _await_call(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], running: Running
) -> Any:
    """Await the task's coroutine under its timeout; a cancel becomes TaskCancelled (or
    Interrupted at shutdown), which the run records as a sync task's would be."""
    running.current = asyncio.current_task()
    if running.reason is not None:
        raise running.stop_exception()
    try:
        result = await asyncio.wait_for(func(*args, **kwargs), running.timeout)
    except asyncio.TimeoutError:
        if running.reason is not None:
            raise running.stop_exception() from None
        raise errors.TaskTimeout(f"timed out after {running.timeout:g}s") from None
    except asyncio.CancelledError:
        if running.reason is None:
            raise
        raise running.stop_exception() from None
    if inspect.isgenerator(result) or inspect.isasyncgen(result):
        raise TypeError("task returned a generator, which cannot be stored; return a list instead")
    return result


async def _around_in_thread(
    view: hooks.TaskView,
    own: dict[str, Any] | None,
    start: Callable[[], Any],
    pool: concurrent.futures.Executor,
) -> Any:
    loop = asyncio.get_running_loop()

    def innermost() -> Any:  # in the hook's thread: run the call on the loop, wait for it
        context = contextvars.copy_context()
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def finished(task: asyncio.Task[Any]) -> None:
            if task.cancelled():
                done.set_exception(asyncio.CancelledError())
            elif task.exception() is not None:
                done.set_exception(task.exception())
            else:
                done.set_result(task.result())

        def begin() -> None:
            loop.create_task(start(), context=context).add_done_callback(finished)

        loop.call_soon_threadsafe(begin)
        return done.result()

    context = contextvars.copy_context()
    return await loop.run_in_executor(pool, context.run, hooks.around, view, innermost, own)


def _raised(
    settings: config.Settings,
    row: Any,
    exc: Exception,
    view: hooks.TaskView | None,
    own: dict[str, Any] | None,
    func: Any,
) -> store.Outcome:
    """The Outcome of a run that raised (or was stopped), its hooks fired."""
    if isinstance(exc, (errors.Snooze, errors.TaskCancelled, Interrupted)):
        return _stopped(row, exc, view, own)
    outcome = failure(settings, row, exc, func=func)
    if view is not None or hooks.active:
        view = view or task_view(row, (), {})
        ended = "retrying" if outcome.status is Status.QUEUED else "failed"
        hooks.fire("on_retry" if ended == "retrying" else "on_failure", view, exc, extra=own)
        hooks.fire("after_task", view, hooks.Outcome(ended, exception=exc), extra=own)
    return outcome


def _returned(
    settings: config.Settings,
    row: Any,
    value: Any,
    view: hooks.TaskView | None,
    own: dict[str, Any] | None,
) -> store.Outcome:
    """The Outcome of a run that returned, its hooks fired."""
    if isinstance(value, errors.Snooze):
        return _stopped(row, value, view, own)
    if view is not None:
        hooks.fire("on_success", view, value, extra=own)
        hooks.fire("after_task", view, hooks.Outcome("succeeded", result=value), extra=own)
    result, note = _store_result(settings, row.handler, value)
    return store.Outcome(
        id=row.id, attempts=row.attempts, status=Status.SUCCEEDED, result=result, error=note
    )


def _stopped(
    row: Any,
    signal: errors.Snooze | errors.TaskCancelled | Interrupted,
    view: hooks.TaskView | None,
    own: dict[str, Any] | None,
) -> store.Outcome:
    """A run that ended neither in success nor in failure: snoozed (back to the queue, the
    attempt given back, no error) or cancelled (final, with how it was stopped)."""
    if isinstance(signal, errors.Snooze):
        outcome = store.Outcome(
            id=row.id,
            attempts=row.attempts,
            status=Status.QUEUED,
            retry_in=signal.seconds,
            snooze=True,
        )
        ended = "snoozed"
    elif isinstance(signal, Interrupted):
        outcome = interrupted(row, describe(signal))
        ended = "retrying" if outcome.status is Status.QUEUED else "failed"
    else:
        outcome = store.Outcome(
            id=row.id, attempts=row.attempts, status=Status.CANCELLED, error=describe(signal)
        )
        ended = "cancelled"
    if view is not None or hooks.active:
        view = view or task_view(row, (), {})
        hooks.fire("after_task", view, hooks.Outcome(ended, exception=signal), extra=own)
    return outcome


def interrupted(row: Any, error: str) -> store.Outcome:
    """A run stopped by its worker's shutdown: back to the queue at once, the attempt spent
    (as the rescue of a killed worker's task), or failed when it was the last one."""
    if row.attempts < row.max_attempts:
        return store.Outcome(id=row.id, attempts=row.attempts, status=Status.QUEUED, error=error)
    return store.Outcome(id=row.id, attempts=row.attempts, status=Status.FAILED, error=error)


def cancelled(row: Any, message: str) -> store.Outcome:
    """The Outcome of a run stopped by a cancel request (final, not retried)."""
    return store.Outcome(
        id=row.id, attempts=row.attempts, status=Status.CANCELLED, error=f"TaskCancelled: {message}"
    )


def task_view(row: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> hooks.TaskView:
    """The read-only view hooks get of a claimed row."""
    return hooks.TaskView(
        id=row.id,
        handler=row.handler,
        queue=row.queue,
        priority=row.priority,
        attempts=row.attempts,
        args=tuple(args),
        kwargs=dict(kwargs),
        meta=dict(getattr(row, "meta", None) or {}),
    )


def failure(
    settings: config.Settings, row: Any, exc: BaseException, func: Any = None
) -> store.Outcome:
    """The Outcome of a run that raised: retried with backoff while attempts remain."""
    envelope, note = _store_exception(settings, row.handler, exc)
    error = describe(exc) + (f"\n{note}" if note else "")
    if retry.should_retry(row.attempts, row.max_attempts, exc):
        return store.Outcome(
            id=row.id,
            attempts=row.attempts,
            status=Status.QUEUED,
            exception=envelope,
            error=error,
            retry_in=retry.delay_for(func, row.attempts, exc),
        )
    return store.Outcome(
        id=row.id, attempts=row.attempts, status=Status.FAILED, exception=envelope, error=error
    )
