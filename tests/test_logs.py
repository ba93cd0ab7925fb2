"""Log lines (dbqueue/logs.py): one per task at INFO from real workers, text and JSON, every
field greppable; the batched writer keeps lines whole and in order, writes WARNING at once and
the rest at exit; the LogRecord-free INFO path gives the record path's line and steps aside
for filters, other handlers and bad arguments."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

import dbqueue
from dbqueue import logs, worker
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


# -- the per-task line (logs.task_succeeded): written straight by the formatter when nothing
# -- could tell, the same bytes as the LogRecord path, and the record path whenever anything
# -- could tell: a handler, a filter, a level, a propagating logger, a renamed level.

AWKWARD = [
    "tests.jobs:add",
    'say "hi"',
    "back\\slash \\n",
    "ünïcødé 😀 \u2028",
    "control \x00\x01\x1f\x7f\ttab\nnewline\r",
    "percent %s %d %%",
    "",
]
DURATIONS = [
    0.0,
    4e-07,
    1e-06,
    3.1e-05,
    3e-05,
    0.00009999951,
    0.000123456,
    0.0004995,
    1.5,
    12.0,
    86399.9999996,
    123456789.123456789,
]
CREATED = [1764800000.0, 1764800000.0005, 1764800000.1234567, 1764800000.999, 1764800000.9999999]


def _record(fields: dict[str, Any], args: tuple[Any, ...], created: float) -> logging.LogRecord:
    """The LogRecord the worker's log.info(...) makes, at a pinned time and pid."""
    logger = logging.getLogger("dbqueue.worker")
    record = logger.makeRecord(
        logger.name, logging.INFO, __file__, 1, logs.TASK_SUCCEEDED, args, None, extra=fields
    )
    record.created, record.process = created, 4242
    return record


@pytest.mark.parametrize("formatter", [logs.TextFormatter(), logs.JsonFormatter()])
def test_the_task_line_is_the_record_paths_line_byte_for_byte(formatter):
    for n, name in enumerate(AWKWARD):
        queue = AWKWARD[-1 - n]
        for duration in DURATIONS:
            for created in CREATED:
                task_id, attempt = 2**40 + n, n + 1
                fields = logs.task_fields(task_id, name, queue, duration, "succeeded", attempt)
                record = _record(fields, (task_id, name, duration), created)
                line = formatter.task_succeeded(
                    "dbqueue.worker", "INFO", 4242, created, task_id, name, queue, duration, attempt
                )
                assert line == formatter.format(record), (name, queue, duration, created)
    if isinstance(formatter, logs.JsonFormatter):
        assert json.loads(line)["handler"] == AWKWARD[-1]


def test_the_duration_field_is_repr_of_round_to_six_places():
    values = [i * 1e-7 for i in range(0, 200_000, 7)] + [float(i) for i in range(0, 100_000, 997)]
    values += [math.nextafter(v, direction) for v in values for direction in (0.0, 1e9)]
    generator = random.Random(21)
    values += [generator.random() * 10 ** generator.randint(-8, 8) for _ in range(50_000)]
    values += [0.0, 5e-324, 5e-07, 9.9999949e-05, 9.999995e-05, 999999999.9999995]
    for value in values:
        if 0.0 <= value < 1e9:
            assert logs._round6(value) == repr(round(value, 6)), value


def _task_lines(stream: Writes) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if "task_finished" in line]


def _masked(line: str) -> str:
    """The line without its time, task id and duration (which differ from task to task)."""
    for pattern in (r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(,\d{3})?", r"\b\d+(\.\d+)?(e-\d+)?s?\b"):
        line = re.sub(pattern, "N", line)
    return line


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_workers_task_lines_are_the_same_either_way(db, logger, fmt):
    handler, stream = _capture(fmt)
    dbqueue.enqueue_many(jobs.add, [(1, 2)] * 3, queue="q1")
    assert worker.Worker(db.settings).work_off().succeeded == 3  # the formatter's own line
    handler.addFilter(lambda record: True)  # the record path
    dbqueue.enqueue_many(jobs.add, [(1, 2)] * 3, queue="q1")
    assert worker.Worker(db.settings).work_off().succeeded == 3
    handler.flush()
    fast, slow = _task_lines(stream)[:3], _task_lines(stream)[3:]
    assert len(slow) == 3 and {_masked(line) for line in fast + slow} == {_masked(fast[0])}
    assert "tests.jobs:add" in fast[0] and "q1" in fast[0]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_handler_added_after_a_line_gets_the_next_as_a_record_with_its_fields(db, logger):
    handler, stream = _capture("text")
    ids = dbqueue.enqueue_many(jobs.add, [(1, 2), (3, 4)], queue="q1")
    assert worker.Worker(db.settings, max_tasks=1).work_off().succeeded == 1
    records = Records()
    logging.getLogger("dbqueue").addHandler(records)
    assert worker.Worker(db.settings).work_off().succeeded == 1
    handler.flush()
    assert len(_task_lines(stream)) == 2
    (record,) = [r for r in records.records if getattr(r, "event", None) == "task_finished"]
    assert record.getMessage().startswith(f"task {ids[1]} tests.jobs:add succeeded in ")
    fields = {k: getattr(record, k) for k in TASK_FIELDS}
    assert fields["duration"] >= 0 and fields.pop("duration") is not None
    assert fields == {
        "event": "task_finished",
        "task_id": ids[1],
        "handler": "tests.jobs:add",
        "queue": "q1",
        "outcome": "succeeded",
        "attempt": 1,
    }


def test_a_level_change_takes_effect_at_once(db, logger):
    handler, stream = _capture("text")
    root = logging.getLogger("dbqueue")
    for logger_level, handler_level, expected in [
        (logging.INFO, logging.NOTSET, 1),
        (logging.WARNING, logging.NOTSET, 0),
        (logging.INFO, logging.NOTSET, 1),
        (logging.INFO, logging.WARNING, 0),
        (logging.DEBUG, logging.INFO, 1),
    ]:
        root.setLevel(logger_level)
        handler.setLevel(handler_level)
        before = len(_task_lines(stream))
        dbqueue.enqueue(jobs.add, (1, 2))
        assert worker.Worker(db.settings).work_off().succeeded == 1
        handler.flush()
        assert len(_task_lines(stream)) - before == expected, (logger_level, handler_level)


def _drop_task_lines(record: logging.LogRecord) -> bool:
    return getattr(record, "event", None) != "task_finished"


@pytest.mark.parametrize("where", ["dbqueue.worker", "handler"])
def test_a_filter_on_the_workers_logger_or_the_handler_is_honoured(db, logger, where):
    handler, stream = _capture("text")
    dbqueue.enqueue(jobs.add, (1, 2))
    assert worker.Worker(db.settings).work_off().succeeded == 1
    filtered = handler if where == "handler" else logging.getLogger(where)
    filtered.addFilter(_drop_task_lines)
    try:
        dbqueue.enqueue(jobs.add, (1, 2))
        assert worker.Worker(db.settings).work_off().succeeded == 1
    finally:
        filtered.removeFilter(_drop_task_lines)
    dbqueue.enqueue(jobs.add, (1, 2))
    assert worker.Worker(db.settings).work_off().succeeded == 1
    handler.flush()
    assert len(_task_lines(stream)) == 2  # the first and the last


def test_a_filter_may_add_a_field_to_the_line(logger):
    handler, stream = _capture("text")

    def tag(record: logging.LogRecord) -> bool:
        record.request = "r-1"
        return True

    handler.addFilter(tag)
    logs.task_succeeded(logging.getLogger("dbqueue.worker"), 7, "tests.jobs:add", "q", 0.25, 1)
    handler.flush()
    assert stream.getvalue().rstrip("\n").endswith(" outcome=succeeded attempt=1 request=r-1")


def test_a_dbqueue_logger_that_propagates_gives_the_root_handlers_the_record(logger):
    handler, stream = _capture("json")
    root, records = logging.getLogger(), Records()
    root.addHandler(records)
    logging.getLogger("dbqueue").propagate = True  # as a dictConfig may leave it
    try:
        logs.task_succeeded(logging.getLogger("dbqueue.worker"), 7, "h", "q", 0.25, 2)
    finally:
        root.removeHandler(records)
    handler.flush()
    (record,) = records.records
    assert (record.event, record.task_id, record.attempt, record.duration) == (
        "task_finished",
        7,
        2,
        0.25,
    )
    assert json.loads(stream.getvalue())["message"] == "task 7 h succeeded in 0.250s"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_what_the_formatter_cannot_write_goes_the_record_path(logger, fmt):
    """A renamed INFO, logging.logProcesses off, a record factory, values of other types or
    a duration out of range: each line is the one the LogRecord path writes."""
    handler, stream = _capture(fmt)
    worker_log = logging.getLogger("dbqueue.worker")

    class Name(str):
        pass

    def lines_both_ways(*args: Any) -> tuple[str, str]:
        logs.task_succeeded(worker_log, *args)  # whatever path it takes
        handler.addFilter(lambda record: True)  # surely the record path
        logs.task_succeeded(worker_log, *args)
        handler.filters.clear()
        handler.flush()
        first, second = stream.getvalue().splitlines()[-2:]
        return _without_time(first), _without_time(second)

    cases: list[tuple[Any, ...]] = [
        (7, "h", "q", float("nan"), 1),
        (7, "h", "q", float("inf"), 1),
        (7, "h", "q", -0.5, 1),
        (7, "h", "q", 1e12, 1),
        (7, Name("h"), "q", 0.25, 1),
        (True, "h", "q", 0.25, 1),
    ]
    for args in cases:
        fast, slow = lines_both_ways(*args)
        assert fast == slow, args
    logging.addLevelName(logging.INFO, "NOTE")
    try:
        fast, slow = lines_both_ways(7, "h", "q", 0.25, 1)
    finally:
        logging.addLevelName(logging.INFO, "INFO")
    assert fast == slow and ("NOTE [" in fast or '"level": "note"' in fast)
    logging.logProcesses = False
    try:
        fast, slow = lines_both_ways(7, "h", "q", 0.25, 1)
    finally:
        logging.logProcesses = True
    assert fast == slow and ("[None]" in fast or '"pid": null' in fast)
    factory = logging.getLogRecordFactory()

    def with_host(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.host = "h1"
        return record

    logging.setLogRecordFactory(with_host)
    try:
        fast, slow = lines_both_ways(7, "h", "q", 0.25, 1)
    finally:
        logging.setLogRecordFactory(factory)
    assert fast == slow and ("host=h1" in fast or '"host": "h1"' in fast)


def _without_time(line: str) -> str:
    return re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} |\"time\": \"[^\"]*\", ", "", line)


def test_the_other_outcomes_lines_keep_the_task_fields(db, logger, tmp_path):
    handler, stream = _capture("text")
    retried = dbqueue.enqueue(jobs.raise_value_error, ("first",), queue="q1")
    failed = dbqueue.enqueue(jobs.raise_value_error, ("last",), queue="q1", max_attempts=1)
    snoozed = dbqueue.enqueue(jobs.snooze_once, (str(tmp_path / "marker"), 60.0), queue="q1")
    worker.Worker(db.settings).work_off()
    handler.flush()
    lines = {int(re.findall(r" task_id=(\d+) ", line)[0]): line for line in _task_lines(stream)}
    assert (
        " WARNING " in lines[retried.id]
        and "will retry (attempt 1): ValueError: first" in (lines[retried.id])
    )
    assert (
        " WARNING " in lines[failed.id]
        and "failed (attempt 1): ValueError: last" in (lines[failed.id])
    )
    assert " INFO " in lines[snoozed.id] and "snoozed for 60s" in lines[snoozed.id]
    for task, outcome in [(retried, "queued"), (failed, "failed"), (snoozed, "snoozed")]:
        fields = dict(re.findall(r" (\w+)=(\S+)", lines[task.id]))
        assert {k: fields[k] for k in ("event", "handler", "queue", "outcome", "attempt")} == {
            "event": "task_finished",
            "handler": task.handler,
            "queue": "q1",
            "outcome": outcome,
            "attempt": "1",
        }
        assert float(fields["duration"]) >= 0
