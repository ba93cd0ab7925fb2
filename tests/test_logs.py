"""Log lines (dbqueue/logs.py): one per task at INFO from real workers, text and JSON, every
field greppable; the batched writer keeps lines whole and in order, writes WARNING at once and
the rest at exit; the LogRecord-free INFO path gives the record path's line and steps aside
for filters, other handlers and bad arguments."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

import dbqueue
from dbqueue import logs
from tests import jobs, logging_app

TASK_FIELDS = ("event", "task_id", "handler", "queue", "duration", "outcome", "attempt")
TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_workoff_logs_one_line_per_task_with_every_field(db, fmt):
    ids = dbqueue.enqueue_many(jobs.add, [(i, 1) for i in range(40)], queue="q1")
    result = db.cli("--log-format", fmt, "workoff", "-c", "2", "--import", "tests.jobs")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "task_finished" in line]
    assert len(lines) == 40, result.stderr[-2000:]
    seen = set()
    for line in lines:
        if fmt == "json":
            event = json.loads(line)
            assert event["level"] == "info" and event["logger"] == "dbqueue.worker"
            fields = {k: str(event[k]) for k in TASK_FIELDS}
            assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$", event["time"])
        else:
            assert TIME.match(line) and " INFO [" in line and "] dbqueue.worker: task " in line
            fields = dict(re.findall(r" (\w+)=(\S+)", line))
        assert {k: fields[k] for k in ("event", "handler", "queue", "outcome", "attempt")} == {
            "event": "task_finished",
            "handler": "tests.jobs:add",
            "queue": "q1",
            "outcome": "succeeded",
            "attempt": "1",
        }
        assert float(fields["duration"]) >= 0
        seen.add(int(fields["task_id"]))
    assert seen == set(ids)


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """dbqueue's loggers as the CLI sets them up, restored afterwards."""
    root = logging.getLogger("dbqueue")
    saved = (root.handlers[:], root.filters[:], root.level, root.propagate)
    yield logging.getLogger("dbqueue.worker")
    for handler in root.handlers:
        handler.close()
    root.handlers[:], root.filters[:], root.level, root.propagate = saved


def _capture(fmt: str, interval: float = 60.0) -> tuple[logs.BatchingHandler, Any]:
    logs.setup("INFO", fmt)
    stream = Writes()
    handler = logging.getLogger("dbqueue").handlers[0]
    assert isinstance(handler, logs.BatchingHandler)
    handler.stream, handler.interval = stream, interval
    return handler, stream


class Writes(io.StringIO):
    """A stream that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _call(log: logging.Logger) -> None:
    log.info(
        "task %s %s succeeded in %.3fs",
        7,
        "tests.jobs:add",
        0.25,
        extra={"event": "task_finished", "task_id": 7, "queue": "q", "duration": 0.25},
    )


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_record_free_path_writes_the_record_paths_line(logger, fmt):
    handler, stream = _capture(fmt)
    _call(logger)  # nothing on the way: no LogRecord is made
    handler.addFilter(lambda record: True)  # a filter needs the record: the ordinary path
    _call(logger)
    handler.flush()
    fast, slow = stream.getvalue().splitlines()
    if fmt == "json":
        fast_event, slow_event = json.loads(fast), json.loads(slow)
        assert fast_event.pop("time")[:10] == slow_event.pop("time")[:10]
        assert fast_event == slow_event
        assert fast_event["pid"] == slow_event["pid"] and fast_event["task_id"] == 7
    else:
        assert TIME.match(fast) and TIME.match(slow)
        assert fast[24:] == slow[24:]
        assert slow[24:].endswith(
            f"INFO [{os.getpid()}] dbqueue.worker: task 7 tests.jobs:add succeeded in 0.250s "
            "event=task_finished task_id=7 queue=q duration=0.25"
        )


def test_filters_and_other_handlers_still_see_every_line(logger):
    handler, stream = _capture("text")
    seen: list[logging.LogRecord] = []
    secrets = logging.Filter()
    secrets.filter = lambda record: "secret" not in record.getMessage()  # type: ignore[method-assign]
    logger.addFilter(secrets)  # the logger's own filter, as logging applies it
    try:
        logger.info("a secret line")
        logger.info("a plain line")
        extra = logging.Handler()
        extra.emit = seen.append  # type: ignore[method-assign]
        logging.getLogger("dbqueue").addHandler(extra)
        logger.info("a line for both")
    finally:
        logger.removeFilter(secrets)
    handler.flush()
    assert stream.getvalue().splitlines()[0].endswith("dbqueue.worker: a plain line")
    assert stream.getvalue().splitlines()[1].endswith("dbqueue.worker: a line for both")
    assert len(stream.getvalue().splitlines()) == 2
    assert [r.getMessage() for r in seen] == ["a line for both"]


def test_a_warning_is_written_at_once_after_the_lines_before_it(logger):
    _, stream = _capture("text", interval=60.0)  # the writing thread would wait a minute
    for n in range(3):
        logger.info("info %d", n)
    assert stream.getvalue() == ""
    logger.warning("careful", extra={"event": "warned"})
    lines = stream.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "info 0",
        "info 1",
        "info 2",
        "careful event=warned",
    ]


def test_info_lines_are_written_by_the_thread_soon_without_a_flush(logger):
    _, stream = _capture("text", interval=0.05)
    logger.info("soon")
    deadline = time.monotonic() + 10
    while "soon" not in stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.getvalue().endswith("dbqueue.worker: soon\n")


def test_batches_are_whole_lines_of_at_most_a_pipe_buffer(logger):
    handler, stream = _capture("text")
    for n in range(500):
        logger.info("line %d %s", n, "x" * (n % 90))
    handler.flush()
    assert len(stream.writes) > 10
    for write in stream.writes:
        assert write.endswith("\n") and len(write.encode()) <= logs.CHUNK_BYTES
    numbers = [int(line.split("line ")[1].split()[0]) for line in stream.getvalue().splitlines()]
    assert numbers == list(range(500))


def test_a_bad_argument_is_reported_as_logging_does_and_the_caller_goes_on(logger, capsys):
    handler, stream = _capture("text")
    logger.info("%d tasks", "not a number")
    logger.info("after")
    handler.flush()
    assert "--- Logging error ---" in capsys.readouterr().err
    assert stream.getvalue().splitlines()[-1].endswith("dbqueue.worker: after")


def test_an_extra_field_may_not_overwrite_the_record(logger):
    _capture("text")
    with pytest.raises(KeyError, match="message"):
        logger.info("x", extra={"message": "y"})


def test_pending_lines_are_written_at_exit():
    code = (
        "import logging; from dbqueue import logs; logs.setup('INFO', 'text'); "
        "[logging.getLogger('dbqueue.worker').info('line %d', n) for n in range(300)]"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [line.rsplit(" ", 1)[1] for line in lines] == [str(n) for n in range(300)]


def test_a_task_module_that_configures_logging_leaves_the_worker_lines(db):
    """Django's setup() (manage.py dbqueue work) and many applications call dictConfig at
    import, which closes dbqueue's handler in the worker: its INFO lines must still be
    written (they were held forever, so `manage.py dbqueue work` logged no task)."""
    ids = dbqueue.enqueue_many(logging_app.double, [(i,) for i in range(5)])
    result = db.cli("workoff", "--import", "tests.logging_app")
    assert result.returncode == 0, result.stderr[-2000:]
    started = [line for line in result.stderr.splitlines() if "event=worker_started" in line]
    finished = re.findall(r" task_id=(\d+) .*outcome=succeeded", result.stderr)
    assert len(started) == 1, result.stderr[-2000:]
    assert sorted(map(int, finished)) == ids, result.stderr[-2000:]
