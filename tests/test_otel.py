"""dbqueue.contrib.otel: a producer span at enqueue whose context travels in the task's meta,
and a consumer span per run in a real worker process, in the request's trace and linked to
the producer span; both databases, the SDK's in-memory exporter on each side."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import dbqueue
from dbqueue import hooks, worker
from dbqueue.contrib import otel
from tests import jobs


@pytest.fixture
def exporter() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    otel.instrument(tracer_provider=provider)
    yield memory, provider
    otel.uninstrument()
    hooks.clear()


def test_a_request_trace_continues_into_the_worker_process(db, exporter):
    memory, provider = exporter
    tracer = provider.get_tracer("web")
    with tracer.start_as_current_span("POST /signup") as request:
        ok = dbqueue.enqueue(jobs.add, args=(2, 3), queue="mail")
        bad = dbqueue.enqueue(jobs.raise_value_error, max_attempts=1, queue="mail")
    request_trace = request.get_span_context().trace_id
    sent = [s for s in memory.get_finished_spans() if s.name == "send mail"]
    assert len(sent) == 2 and all(s.context.trace_id == request_trace for s in sent)
    assert all(s.parent.span_id == request.get_span_context().span_id for s in sent)
    assert "traceparent" in dbqueue.Task.get(ok.id).meta

    spans_file = db.tmp_path / "spans.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "dbqueue", "workoff", "--import", "tests.otel_app"],
        env={**db.env, "OTEL_SPANS_FILE": str(spans_file)},
        cwd=db.tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr[-3000:]  # one task failed on purpose
    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    runs = {s["attributes"]["dbqueue.task.id"]: s for s in spans if s["name"] == "process mail"}
    assert set(runs) == {ok.id, bad.id}
    producers = {s.context.span_id for s in sent}
    for run in runs.values():
        assert run["kind"] == "CONSUMER"
        assert run["trace_id"] == request_trace  # the request's trace goes on in the worker
        assert run["parent_span_id"] in producers and run["links"] == [run["parent_span_id"]]
        assert run["attributes"]["messaging.system"] == "dbqueue"
        assert run["attributes"]["messaging.destination.name"] == "mail"
        assert run["attributes"]["dbqueue.task.attempt"] == 1
    assert runs[ok.id]["attributes"]["dbqueue.task.handler"] == "tests.jobs:add"
    assert runs[ok.id]["status"] == "UNSET" and runs[ok.id]["events"] == []
    assert runs[bad.id]["status"] == "ERROR" and runs[bad.id]["events"] == ["exception"]


def test_without_a_trace_the_worker_starts_its_own(db, exporter):
    memory, _ = exporter
    task = dbqueue.enqueue(jobs.add, args=(1, 1))
    worker.Worker(db.settings).work_off()
    (run,) = [s for s in memory.get_finished_spans() if s.name == "process default"]
    (send,) = [s for s in memory.get_finished_spans() if s.name == "send default"]
    assert run.attributes["dbqueue.task.id"] == task.id
    assert run.context.trace_id == send.context.trace_id  # the producer span began it


def test_instrument_twice_adds_the_hooks_once(db, exporter):
    memory, provider = exporter
    otel.instrument(tracer_provider=provider)
    dbqueue.enqueue(jobs.noop)
    assert len([s for s in memory.get_finished_spans() if s.name == "send default"]) == 1
