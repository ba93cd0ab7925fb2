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
import inspect
import logging
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


def load_call(
    settings: config.Settings, row: Any, bind: sa.Engine | sa.Connection | None = None
) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], orm.Session | None]:
    """(callable, args, kwargs, session to commit) for a claimed row; raises on a bad row."""
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
    kind = ref[0]
    if kind == "func":
        try:
            return serializer.import_handler(row.handler), args, kwargs, None
        except (ImportError, AttributeError) as exc:
            raise HandlerImportError(
                f"cannot import handler {row.handler!r} ({type(exc).__name__}: {exc})"
            ) from exc
    if kind == "object":
        _, obj, method = ref
        return serializer.undecorated(getattr(obj, method)), args, kwargs, None
    if kind == "model":
        _, class_handler, identity, method = ref
        try:
            cls = serializer.import_handler(class_handler)
        except (ImportError, AttributeError) as exc:
            raise HandlerImportError(
                f"cannot import model {class_handler!r} ({type(exc).__name__}: {exc})"
            ) from exc
        session = orm.Session(bind if bind is not None else settings.get_engine())
        pk = identity[0] if len(identity) == 1 else identity
        instance = session.get(cls, pk)
        if instance is None:
            session.close()
            raise ModelNotFound(f"{cls.__name__} id={pk!r} no longer exists")
        return serializer.undecorated(getattr(instance, method)), args, kwargs, session
    raise PayloadError(f"malformed task row: unknown reference kind {kind!r}")


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
) -> store.Outcome:
    """Run one claimed task and say how it ended. Never raises for the task's sake.

    Hooks (hooks.py) run around the call only when some are registered: without any, this
    is the same few calls it always was.
    """
    timeout = row.timeout if row.timeout is not None else default_timeout
    view: hooks.TaskView | None = None
    own: dict[str, Any] | None = None
    try:
        func, args, kwargs, session = load_call(settings, row, bind)
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
        if isinstance(exc, (errors.Snooze, errors.TaskCancelled)):
            return _stopped(row, exc, view, own)
        outcome = failure(settings, row, exc, func=locals().get("func"))
        if view is not None or hooks.active:
            view = view or task_view(row, (), {})
            ended = "retrying" if outcome.status is Status.QUEUED else "failed"
            hooks.fire("on_retry" if ended == "retrying" else "on_failure", view, exc, extra=own)
            hooks.fire("after_task", view, hooks.Outcome(ended, exception=exc), extra=own)
        return outcome
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
    signal: errors.Snooze | errors.TaskCancelled,
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
    else:
        outcome = store.Outcome(
            id=row.id, attempts=row.attempts, status=Status.CANCELLED, error=describe(signal)
        )
        ended = "cancelled"
    if view is not None or hooks.active:
        view = view or task_view(row, (), {})
        hooks.fire("after_task", view, hooks.Outcome(ended, exception=signal), extra=own)
    return outcome


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
