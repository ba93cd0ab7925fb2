"""The public API's docstrings are its reference (issue 22, point 5; docs/reference/api.md is
generated from them): each public callable says what it does and names every parameter it
takes, so a parameter added without a word fails here. (mkdocs build --strict fails on the
reverse: a documented parameter the signature no longer has.)"""

from __future__ import annotations

import inspect
import re

import pytest

import dbqueue
from dbqueue import bus, counters, hooks
from dbqueue.decorator import AsyncTaskFunction

BUS = ["configure", "subscribe", "publish", "publish_at", "sync", "inline", "recording"]
BUS += ["subscriptions", "app_key", "dispatch", "PublishError", "Subscription", "SyncResult"]
BUS += ["Published"]
COUNTERS = ["async_counter_cache", "increment", "decrement", "reconcile", "flush", "pending"]
COUNTERS += ["registered", "Counter", "CounterCacheError"]
HOOKS = ["unregister", "clear", "TaskView", "Outcome"]


def public_api():
    for name in dbqueue.__all__:
        value = getattr(dbqueue, name)
        if not inspect.ismodule(value):
            yield f"dbqueue.{name}", value
    yield from ((f"dbqueue.bus.{name}", getattr(bus, name)) for name in BUS)
    yield from ((f"dbqueue.counters.{name}", getattr(counters, name)) for name in COUNTERS)
    yield from ((f"dbqueue.hooks.{name}", getattr(hooks, name)) for name in HOOKS)
    for method in ("now", "enqueue", "map"):
        yield f"AsyncTaskFunction.{method}", getattr(AsyncTaskFunction, method)
    for method in ("get", "cancel", "refresh", "wait"):
        yield f"Task.{method}", getattr(dbqueue.Task, method)
    from dbqueue.web.app import create_app

    yield "dbqueue.web.create_app", create_app


def documented_parameters(obj) -> list[str]:
    """The parameters a reader must find in the docstring (not self, not a dataclass's fields,
    which its Attributes section covers)."""
    if inspect.isclass(obj):
        owner = next(c for c in obj.__mro__ if "__init__" in vars(c))
        if not owner.__module__.startswith("dbqueue") or hasattr(obj, "__dataclass_fields__"):
            return []  # Exception's or Enum's own, or a dataclass's generated one
        obj = obj.__init__
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    return [name for name in signature.parameters if name not in ("self", "cls")]


@pytest.mark.parametrize(("name", "obj"), list(public_api()), ids=lambda v: str(v))
def test_public_callable_documents_what_it_does_and_each_parameter(name, obj):
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and not doc:
        doc = inspect.getdoc(obj.__init__) or ""
    assert len(doc) >= 40, f"{name} has no docstring worth the name: {doc!r}"
    missing = [
        p for p in documented_parameters(obj) if not re.search(rf"(^|[\s`(])\**{p}\b", doc, re.M)
    ]
    assert not missing, f"{name}'s docstring does not mention its parameter(s) {missing}"


@pytest.mark.parametrize("event", hooks.EVENTS)
def test_every_hook_event_is_documented_in_the_reference(event):
    """The registrars are module attributes: their docstrings are the string after each."""
    source = inspect.getsource(hooks)
    assert re.search(rf'^{event} = _register\("{event}"\)\n"""`@hooks\.{event}`', source, re.M)
