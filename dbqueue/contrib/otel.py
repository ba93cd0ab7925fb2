"""OpenTelemetry tracing on top of dbqueue's hooks (`pip install 'dbqueue[otel]'`).

    from dbqueue.contrib import otel
    otel.instrument()            # in the web process and in the worker (e.g. an --import module)

At enqueue, a PRODUCER span `send QUEUE` is made in the caller's current trace and its context
is written into the task's `meta` (W3C `traceparent`/`tracestate`): meta is a plain JSON column,
so the context reaches any worker on any host. Each run is a CONSUMER span `process QUEUE`,
a child of that context (the request's trace goes on into the worker) and linked to the
producer span, with the task's id, handler, queue and attempt as attributes; an exception is
recorded on it and its status set to ERROR. The spans follow OpenTelemetry's messaging
conventions (`messaging.system` = `dbqueue`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dbqueue import hooks

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - exercised by users without the extra
    raise ImportError(
        "dbqueue.contrib.otel needs OpenTelemetry: pip install 'dbqueue[otel]'"
    ) from exc

_installed: tuple[Callable[..., Any], Callable[..., Any]] | None = None


def _attributes(task: hooks.TaskView) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": "dbqueue",
        "messaging.destination.name": task.queue,
        "dbqueue.task.handler": task.handler,
        "dbqueue.task.priority": task.priority,
    }
    if task.id is not None:
        attributes["messaging.message.id"] = str(task.id)
        attributes["dbqueue.task.id"] = task.id
        attributes["dbqueue.task.attempt"] = task.attempts
    return attributes


def instrument(tracer_provider: trace.TracerProvider | None = None) -> None:
    """Trace every enqueue and every run in this process (a second call does nothing)."""
    global _installed
    if _installed is not None:
        return
    tracer = trace.get_tracer("dbqueue", tracer_provider=tracer_provider)

    def send(task: hooks.TaskView) -> None:
        with tracer.start_as_current_span(
            f"send {task.queue}", kind=SpanKind.PRODUCER, attributes=_attributes(task)
        ):
            propagate.inject(task.meta)

    def process(task: hooks.TaskView, call_next: Callable[[], Any]) -> Any:
        parent = propagate.extract(task.meta)
        producer = trace.get_current_span(parent).get_span_context()
        links = [Link(producer)] if producer.is_valid else []
        with tracer.start_as_current_span(
            f"process {task.queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            links=links,
            attributes=_attributes(task),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return call_next()
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                raise

    hooks.on_enqueue(send)
    hooks.around_task(process)
    _installed = (send, process)


def uninstrument() -> None:
    """Stop tracing (removes the hooks `instrument` added)."""
    global _installed
    if _installed is None:
        return
    for hook in _installed:
        hooks.unregister(hook)
    _installed = None
