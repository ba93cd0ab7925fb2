"""OpenTelemetry set up in a worker process as an application would, with the SDK's
in-memory exporter; at worker_stopping the finished spans are written as JSON to the file
named by OTEL_SPANS_FILE, for the test in the other process to read."""

from __future__ import annotations

import json
import os
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dbqueue import hooks
from dbqueue.contrib import otel

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
otel.instrument(tracer_provider=provider)


def as_dict(span: Any) -> dict[str, Any]:
    parent = span.parent
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": span.context.trace_id,
        "span_id": span.context.span_id,
        "parent_span_id": parent.span_id if parent is not None else None,
        "links": [link.context.span_id for link in span.links],
        "attributes": dict(span.attributes),
        "status": span.status.status_code.name,
        "events": [event.name for event in span.events],
    }


@hooks.worker_stopping
def dump(worker: Any) -> None:
    with open(os.environ["OTEL_SPANS_FILE"], "a") as fh:
        for span in exporter.get_finished_spans():
            fh.write(json.dumps(as_dict(span)) + "\n")
