"""Process-wide hooks: code of yours that runs at each step of a task's life.

    @hooks.on_enqueue        (task)              in the enqueuing process, before the row is
                                                 written: it may add to task.meta; task.id is None
    @hooks.before_task       (task)              in the worker, before the call; raising fails
                                                 the run as if the task had raised
    @hooks.around_task       (task, call_next)   middleware: call call_next() and return its
                                                 result; the first registered is the outermost
    @hooks.on_success        (task, result)
    @hooks.on_retry          (task, exc)         the run failed and will be retried
    @hooks.on_failure        (task, exc)         failed for good
    @hooks.after_task        (task, outcome)     after every run, whatever its outcome
    @hooks.worker_started    (worker)
    @hooks.worker_stopping   (worker)

Why a registry and not subclassing: error reporting, metrics and tracing are added by
libraries and applications independently, each with one decorator, and none of them may be
able to lose a task. So a hook that raises is logged with its name and ignored, except
before_task and around_task, which stand in the task's path: their exception is the run's.

Each hook runs in the process where the event happens (the worker for task events, inline
mode included). Registration is per process: import the module that registers hooks in the
worker (`dbqueue work --import app.hooks`, or from a task module).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

log = logging.getLogger("dbqueue.hooks")

F = TypeVar("F", bound=Callable[..., Any])

EVENTS = (
    "on_enqueue",
    "before_task",
    "around_task",
    "on_success",
    "on_retry",
    "on_failure",
    "after_task",
    "worker_started",
    "worker_stopping",
)
# Per-function hooks (`@handle_asynchronously(on_success=f)`): the task events only.
TASK_EVENTS = ("before_task", "around_task", "on_success", "on_retry", "on_failure", "after_task")

_registry: dict[str, list[Callable[..., Any]]] = {event: [] for event in EVENTS}
active = False  # any hook registered: the worker's fast path skips all of this when False


@dataclasses.dataclass(frozen=True)
class TaskView:
    """What a hook sees of a task: read-only, except `meta` in `on_enqueue` (a dict the hook
    may add to; it is stored as the task's meta column).

    Attributes:
        id: the task's id; None in `on_enqueue` (the row is not written yet).
        handler: the callable as `module:qualname`.
        queue: the task's queue.
        priority: the task's priority.
        attempts: runs so far, this one included (0 in `on_enqueue`).
        args: the positional arguments, as the worker calls the function with them.
        kwargs: the keyword arguments.
        meta: the task's small JSON dict (trace context, tenant).
    """

    id: int | None
    handler: str
    queue: str
    priority: int
    attempts: int
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    meta: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a run ended, for `after_task`.

    Attributes:
        status: `"succeeded"`, `"retrying"` (failed, will run again) or `"failed"` (for good).
        result: the return value when it succeeded.
        exception: what the run raised otherwise.
    """

    status: str
    result: Any = None
    exception: BaseException | None = None


def _register(event: str) -> Callable[[F], F]:
    def decorator(func: F) -> F:
        global active
        if not callable(func):
            raise TypeError(f"@hooks.{event} decorates a function, not {func!r}")
        _registry[event].append(func)
        active = True
        return func

    decorator.__name__ = event
    decorator.__doc__ = f"Register a `{event}` hook for this process."
    return decorator


# Each registrar is a decorator returning the function unchanged; the string after each is its
# documentation (read by the API reference). A registrar given a non-callable raises TypeError.
on_enqueue = _register("on_enqueue")
"""`@hooks.on_enqueue` registers `hook(task: TaskView)`, called in the enqueuing process before
the row is written (once per task of an `enqueue_many`). `task.id` is None; the hook may add
to `task.meta` (stored in the task's meta column). What it raises is logged and ignored."""
before_task = _register("before_task")
"""`@hooks.before_task` registers `hook(task: TaskView)`, called in the worker before the task
runs. What it raises fails the run as if the task had raised (retried per the task's policy)."""
around_task = _register("around_task")
"""`@hooks.around_task` registers `hook(task: TaskView, call_next)`, middleware around the
task: it must call `call_next()` and return its result. The first registered is the
outermost. What it raises is the run's exception."""
on_success = _register("on_success")
"""`@hooks.on_success` registers `hook(task: TaskView, result)`, called after the task
returned. What it raises is logged and ignored: the outcome is kept."""
on_retry = _register("on_retry")
"""`@hooks.on_retry` registers `hook(task: TaskView, exc)`, called when a run failed and the
task will be retried. What it raises is logged and ignored."""
on_failure = _register("on_failure")
"""`@hooks.on_failure` registers `hook(task: TaskView, exc)`, called when the task failed for
good (out of attempts, or not retryable). What it raises is logged and ignored."""
after_task = _register("after_task")
"""`@hooks.after_task` registers `hook(task: TaskView, outcome: Outcome)`, called after every
run, whatever its outcome. What it raises is logged and ignored."""
worker_started = _register("worker_started")
"""`@hooks.worker_started` registers `hook(worker)`, called in each worker process once it has
registered, before its first claim (the `dbqueue.worker.Worker`; `worker.name` names it).
What it raises is logged and ignored."""
worker_stopping = _register("worker_stopping")
"""`@hooks.worker_stopping` registers `hook(worker)`, called in a worker process that is
stopping, before it unregisters. What it raises is logged and
ignored."""


def unregister(func: Callable[..., Any]) -> None:
    """Remove `func` from every event it was registered for (tests, plugins switched off).

    Args:
        func: a hook registered with one of the decorators; one never registered is ignored.
    """
    global active
    for hooks in _registry.values():
        while func in hooks:
            hooks.remove(func)
    active = any(_registry.values())


def clear() -> None:
    """Remove every hook of this process (the per-function hooks of `@handle_asynchronously`
    stay: they belong to the function)."""
    global active
    for hooks in _registry.values():
        hooks.clear()
    active = False


def name_of(func: Callable[..., Any]) -> str:
    return f"{getattr(func, '__module__', '?')}:{getattr(func, '__qualname__', repr(func))}"


def registered(event: str, extra: Mapping[str, Any] | None = None) -> list[Callable[..., Any]]:
    """The hooks of `event`: process-wide first, then the task function's own."""
    hooks = list(_registry[event])
    own = extra.get(event) if extra else None
    if own is not None:
        hooks.append(own)
    return hooks


def fire(event: str, *args: Any, extra: Mapping[str, Any] | None = None) -> None:
    """Run every hook of `event`; one that raises is logged with its name and skipped."""
    for hook in registered(event, extra):
        try:
            hook(*args)
        except Exception:
            log.exception(
                "%s hook %s raised; ignored (the task and its outcome are kept)",
                event,
                name_of(hook),
                extra={"event": "hook_failed", "hook": name_of(hook)},
            )


def fire_strict(event: str, *args: Any, extra: Mapping[str, Any] | None = None) -> None:
    """Run every hook of `event`, letting an exception through (it fails the run)."""
    for hook in registered(event, extra):
        hook(*args)


def around(task: TaskView, call: Callable[[], Any], extra: Mapping[str, Any] | None = None) -> Any:
    """Call `call` through every around_task hook, the first registered outermost."""
    wrapped = call
    for hook in reversed(registered("around_task", extra)):
        wrapped = _bind(hook, task, wrapped)
    return wrapped()


def _bind(hook: Callable[..., Any], task: TaskView, call_next: Callable[[], Any]) -> Any:
    return lambda: hook(task, call_next)


def own_hooks(func: Any) -> dict[str, Callable[..., Any]] | None:
    """The per-function hooks given to `@handle_asynchronously(on_success=...)`, if any."""
    hooks = getattr(func, "__dbqueue_hooks__", None)
    return hooks if hooks else None


def check_own(options: Mapping[str, Any]) -> dict[str, Callable[..., Any]]:
    """Validate per-function hook options at decoration time (a typo fails there, not later)."""
    own = {}
    for event in TASK_EVENTS:
        hook = options.get(event)
        if hook is None:
            continue
        if not callable(hook):
            raise TypeError(
                f"{event}= must be a function taking the hook's arguments, not {hook!r}"
            )
        own[event] = hook
    return own
