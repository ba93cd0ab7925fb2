"""@handle_asynchronously and delay(): calling a function, or a method, enqueues it.

    @handle_asynchronously            f(...) enqueues; f.now(...) runs here; f.enqueue, f.map
    def f(...)
    ... on a method                   obj.method(...) enqueues obj.method, as delay(obj).method()
    ... with @classmethod/@staticmethod, in either order

A decorated function is a descriptor: looked up on an object (or, for a classmethod, on a
class) it gives a BoundAsyncTask, which enqueues the bound method through `enqueue`. So a
method takes `delay`'s one path: `enqueue.reference` stores a model instance as class and
primary key and pickles any other object, and the worker looks the method up on what it
reloaded and runs the function under the decorator (`serializer.undecorated`). Owns no SQL.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, ParamSpec, TypeVar, cast

from dbqueue import errors, hooks, limits, retry, serializer
from dbqueue import task as task_module

# Names, not the module: `dbqueue.enqueue` is the function once the package is imported.
from dbqueue.enqueue import RunAt, _check_options, enqueue, enqueue_many

P = ParamSpec("P")
R = TypeVar("R")


class _Enqueuing:
    """What a decorated function and a decorated method bound to an object share."""

    __dbqueue_func__: Any  # what runs: the function, or the method bound to its object
    __dbqueue_options__: dict[str, Any]

    def _target(self) -> _Enqueuing:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> task_module.Task:
        return enqueue(self._target(), args, kwargs)

    def now(self, *args: Any, **kwargs: Any) -> Any:
        """Run the function here with `*args` and `**kwargs`, bypassing the queue: returns
        what it returns, raises what it raises."""
        return self._target().__dbqueue_func__(*args, **kwargs)

    def enqueue(
        self, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> task_module.Task:
        """Enqueue with options overriding the decorator's (queue, priority, session...).

        The same as `dbqueue.enqueue(this_function, args, kwargs, **options)`: its arguments,
        return value and exceptions.
        """
        return enqueue(self._target(), args, kwargs, **options)

    def map(self, items: Iterable[Any], **options: Any) -> list[int]:
        """Enqueue one task per item in one round trip; returns their ids.

        The same as `dbqueue.enqueue_many(this_function, items, **options)`: each item a
        tuple of positional arguments, a dict of keyword arguments or a single argument.
        """
        return enqueue_many(self._target(), items, **options)

    @property
    def options(self) -> dict[str, Any]:
        """The decorator's options."""
        return self.__dbqueue_options__

    @property
    def retry_delay(self) -> Any:
        return getattr(self.__dbqueue_func__, "retry_delay", None)

    def __repr__(self) -> str:
        return f"<dbqueue task {serializer.handler_name(self.__dbqueue_func__)}>"


class AsyncTaskFunction(_Enqueuing, Generic[P, R]):
    """What `@handle_asynchronously` returns: a function whose call enqueues it.

    `f(*args, **kwargs)` enqueues and returns the `Task`; `f.now(...)` runs the function here;
    `f.enqueue(args, kwargs, **options)` and `f.map(items, **options)` enqueue with per-call
    options. On a class it is a descriptor: `obj.method` gives an object with the same
    methods, enqueuing `obj.method(...)`.
    """

    def __init__(self, func: Callable[P, R], binding: str = "function", **options: Any) -> None:
        serializer.handler_name(func)  # refuse lambdas and local functions at decoration
        self.__dbqueue_func__ = func
        self.__dbqueue_options__ = options
        self._binding = binding  # "function", "classmethod" or "staticmethod"
        self._classmethod_owner: type | None = None
        functools.update_wrapper(self, func)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if self._binding == "classmethod":
            return BoundAsyncTask(self, owner if owner is not None else type(instance))
        if self._binding == "staticmethod" or instance is None:
            return self
        # An object, or a class when `@classmethod` above the decorator passes it on (<= 3.12)
        return BoundAsyncTask(self, instance)

    def _wrapping_class(self) -> type | None:
        """The class whose `@classmethod` (written above this decorator) wraps this function.

        From Python 3.13 such a classmethod binds this object without calling its __get__,
        so `Class.method` reaches `__call__` with the class as first argument, and `.now` or
        `.enqueue` without it; the class is then found by the function's qualified name.
        """
        if self._classmethod_owner is None and self._binding == "function":
            func = self.__dbqueue_func__
            if "." not in func.__qualname__:
                return None  # a module's function
            *path, name = func.__qualname__.split(".")
            found: Any = sys.modules.get(func.__module__)
            for part in path:
                found = getattr(found, part, None)
            entry = vars(found).get(name) if isinstance(found, type) else None
            if isinstance(entry, classmethod) and entry.__func__ is cast(Any, self):
                self._classmethod_owner = found
        return self._classmethod_owner

    def _target(self) -> _Enqueuing:
        owner = self._wrapping_class()
        return self if owner is None else BoundAsyncTask(self, owner)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> task_module.Task:
        owner = self._wrapping_class()
        if owner is not None and args and isinstance(args[0], type) and issubclass(args[0], owner):
            return enqueue(BoundAsyncTask(self, args[0]), args[1:], kwargs)
        return enqueue(self, args, kwargs)

    def now(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here with `*args` and `**kwargs`, bypassing the queue: returns
        what it returns, raises what it raises."""
        result: R = self._target().__dbqueue_func__(*args, **kwargs)
        return result


class BoundAsyncTask(_Enqueuing):
    """`obj.method` of a decorated method: calling it enqueues `obj.method(...)`."""

    def __init__(self, function: AsyncTaskFunction[Any, Any], owner: Any) -> None:
        self.__dbqueue_func__ = types.MethodType(function.__dbqueue_func__, owner)
        self.__dbqueue_options__ = function.__dbqueue_options__
        functools.update_wrapper(self, function.__dbqueue_func__)


def handle_asynchronously(
    func: Callable[P, R] | None = None,
    *,
    priority: int = 0,
    run_at: RunAt = None,
    queue: str = "default",
    max_attempts: int = retry.DEFAULT_MAX_ATTEMPTS,
    timeout: float | None = None,
    unique_key: str | None = None,
    on_conflict: str = "keep",
    retry_delay: Callable[[int, BaseException], float] | None = None,
    before_task: Callable[..., Any] | None = None,
    around_task: Callable[..., Any] | None = None,
    on_success: Callable[..., Any] | None = None,
    on_retry: Callable[..., Any] | None = None,
    on_failure: Callable[..., Any] | None = None,
    after_task: Callable[..., Any] | None = None,
    concurrency_key: limits.KeyOption = None,
    max_concurrency: int | None = None,
) -> Any:
    """Make calling `func` enqueue it. Usable bare or with options, as delayed_job's macro,
    on functions and on methods (instance, class and static).

    The decorated function `f` enqueues when called (`f(42)` returns a `Task`), runs here with
    `f.now(42)`, takes per-call options with `f.enqueue((42,), queue="mail")` and enqueues many
    with `f.map([(1,), (2,)])`. The options below apply however the function is enqueued
    (also through `enqueue`, `enqueue_many` or `schedule`); an option given to the call wins.

    Args:
        func: the function or method; given when the decorator is used bare.
        priority: lower runs first. Default 0.
        run_at: not run before this: an aware datetime, a timedelta from now, or a callable
            returning either (called at each enqueue).
        queue: the queue's name. Default `"default"`.
        max_attempts: runs before the task is `failed` for good. Default 25.
        timeout: seconds a run may take before `TaskTimeout` is raised inside it.
        unique_key: at most one queued-or-running task with this key.
        on_conflict: with `unique_key`: `"keep"` (default) or `"replace"`.
        retry_delay: `f(attempts, exception)` returning the seconds before the next try,
            instead of `5 + attempts**4`.
        before_task: a hook for this function's tasks only, run after the process-wide ones
            (see `dbqueue.hooks` for each event's arguments).
        around_task: as `before_task`, for the around_task event.
        on_success: as `before_task`, for the on_success event.
        on_retry: as `before_task`, for the on_retry event.
        on_failure: as `before_task`, for the on_failure event.
        after_task: as `before_task`, for the after_task event.
        concurrency_key: a string, or a callable of the task's arguments (called at enqueue),
            naming a group of which at most `max_concurrency` tasks run at once across every
            worker (`concurrency_key=lambda account_id: f"sync:{account_id}"`).
        max_concurrency: the limit for `concurrency_key` (int >= 1); both or neither.

    Returns:
        The decorated function (an `AsyncTaskFunction`), or, called with options only, the
        decorator.

    Raises:
        EnqueueError: at decoration: an option of the wrong type or out of range, a
            concurrency key without a limit (or the reverse), a function workers could not
            import (a lambda or a local function), or a function already decorated.
        TypeError: a hook option that is not callable.
    """
    own_hooks = hooks.check_own(
        {
            "before_task": before_task,
            "around_task": around_task,
            "on_success": on_success,
            "on_retry": on_retry,
            "on_failure": on_failure,
            "after_task": after_task,
        }
    )
    options: dict[str, Any] = {
        "priority": priority,
        "run_at": run_at,
        "queue": queue,
        "max_attempts": max_attempts,
        "timeout": timeout,
    }
    if unique_key is not None:
        options["unique_key"] = unique_key
        options["on_conflict"] = on_conflict
    _check_options(priority, queue, max_attempts, timeout)
    if concurrency_key is not None or max_concurrency is not None:
        where = "@handle_asynchronously" if func is None else serializer.handler_name(func)
        limits.check(concurrency_key, max_concurrency, where)
        options["concurrency_key"] = concurrency_key
        options["max_concurrency"] = max_concurrency

    def decorate(f: Any) -> AsyncTaskFunction[Any, Any]:
        binding = "function"
        if isinstance(f, (classmethod, staticmethod)):
            binding, f = type(f).__name__, f.__func__
        if isinstance(f, _Enqueuing):
            raise errors.EnqueueError(
                f"{serializer.handler_name(f)} is already decorated with "
                "@handle_asynchronously; give the options to one decorator"
            )
        if not callable(f):
            raise errors.EnqueueError(
                f"@handle_asynchronously decorates a function or a method, not {f!r}"
            )
        if retry_delay is not None:
            f.retry_delay = retry_delay
        if own_hooks:
            f.__dbqueue_hooks__ = own_hooks  # read by the worker from the function it runs
        return AsyncTaskFunction(f, binding, **options)

    if func is not None:
        return decorate(func)
    return decorate


class _DelayProxy:
    """`delay(obj).method(...)`: attribute access yields an enqueuing callable."""

    def __init__(self, target: Any, options: dict[str, Any]) -> None:
        self._target = target
        self._options = options

    def __getattr__(self, name: str) -> Callable[..., task_module.Task]:
        method = getattr(self._target, name)
        if not callable(method):
            raise errors.EnqueueError(f"{type(self._target).__name__}.{name} is not callable")

        def call(*args: Any, **kwargs: Any) -> task_module.Task:
            return enqueue(method, args, kwargs, **self._options)

        return call


def delay(target: Any, **options: Any) -> Any:
    """`delay(photo, priority=3).upload()` enqueues `photo.upload()` (delayed_job's .delay).

    An SQLAlchemy model instance is stored as its class and primary key (the worker reloads
    the row, and the task fails with "Post id=42 no longer exists" if it is gone); any other
    object is pickled with the call.

    Args:
        target: the object whose method a worker will call.
        **options: `enqueue`'s options (priority, queue, run_at, session, ...).

    Returns:
        A proxy: `delay(obj).method(*args, **kwargs)` enqueues and returns the `Task`.

    Raises:
        EnqueueError: when the method is called: `obj.method` is not callable, or as
            `enqueue` (an object or argument that does not pickle, ...).
    """
    return _DelayProxy(target, options)
