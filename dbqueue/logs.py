"""Log output: one line per event, as text or JSON (`--log-format json`), greppable either way.

Events carry their fields as `extra` (task_id, handler, queue, duration, outcome, worker); the
JSON format writes them as keys, the text format appends them as key=value.

Why not logging's StreamHandler and Formatter as they come: a worker logs one INFO line per
task, and at thousands of tasks a second that line cost more than the task's database work
(profiled in docs/performance.md). The time went to one write() and flush per
line (each waking the process that reads stderr, which on a busy machine takes the CPU from
the worker), to building a LogRecord (the caller's frame, file name, thread and process
names) and to logging's generic formatting (a strftime per line). So, in the CLI (`setup()`):

- lines below WARNING are written in batches by a thread of their own: one write per
  FLUSH_INTERVAL instead of one per line, and a slow reader of stderr never blocks a task;
  WARNING and worse are written at once, after what is pending, so errors are never late
  and lines never out of order;
- dbqueue's loggers format an INFO or DEBUG line straight from the call, without a
  LogRecord, whenever nothing could tell the difference: no filter on the way, the only
  handler is this one, no custom record factory, no exception or stack attached. Otherwise
  (and for every WARNING or worse) the ordinary LogRecord path runs; both give the same line;
- the line of every succeeded task (`task_succeeded()`, the one a busy worker writes most)
  goes further: under the same conditions the formatter writes it from the task's values,
  with neither the call's `extra` dict nor the generic formatting, byte for byte the line
  the LogRecord path writes;
- the time string is computed once a second.
"""

from __future__ import annotations

import collections
import collections.abc
import json
import logging
import os
import sys
import threading
import time
import weakref
from typing import IO, Any

_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

FLUSH_INTERVAL = 0.05  # seconds an INFO line may wait to be written with the lines after it
CHUNK_BYTES = 4096  # PIPE_BUF: one write of at most this is never interleaved with another's
MAX_PENDING_LINES = 10_000  # past this the logging thread writes itself (a stuck reader)

_pid = os.getpid()  # a getpid() per line is a system call; refreshed after fork


TASK_SUCCEEDED = "task %s %s succeeded in %.3fs"  # the worker's per-task line, succeeded


def task_fields(
    task_id: int, handler: str, queue: str, duration: float, outcome: str, attempt: int
) -> dict[str, Any]:
    """The per-task line's fields (its `extra`), in the order both formats write them."""
    return {
        "event": "task_finished",
        "task_id": task_id,
        "handler": handler,
        "queue": queue,
        "duration": round(duration, 6),
        "outcome": outcome,
        "attempt": attempt,
    }


_MILLIS = [f"{n:03d}" for n in range(1000)]  # the text time's milliseconds, ready made
_quote = json.encoder.encode_basestring_ascii  # what JSONEncoder(ensure_ascii=True) uses


def _round6(seconds: float) -> str:
    """`repr(round(seconds, 6))` for 0 <= seconds < 1e9 (the duration field) with one
    decimal conversion instead of three (round()'s to decimal and back, then repr()'s),
    which were a fifth of the task line's cost.

    `.6f` has round()'s digits (both are dtoa's correctly rounded 6 decimals) and, below
    1e9, at most 15 significant digits, so repr() of the rounded float writes those digits
    again, without the trailing zeros (`1.5`, `12.0`), and below 0.0001 with an exponent
    (`3.1e-05`, `1e-06`) or as `0.0`.
    """
    text = f"{seconds:.6f}"
    if not text.startswith("0.0000"):
        text = text.rstrip("0")
        return text + "0" if text[-1] == "." else text
    tens, units = text[6], text[7]  # of 1e-05 and of 1e-06
    if tens != "0":
        return f"{tens}e-05" if units == "0" else f"{tens}.{units}e-05"
    return "0.0" if units == "0" else f"{units}e-06"


def _fields(record: logging.LogRecord) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in record.__dict__.items() if k not in _STANDARD]


class _SecondCache:
    """`time.strftime(fmt, time.localtime(t))`, computed once per second."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.second = -1
        self.text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self.second:  # two threads racing here only compute it twice
            self.text = time.strftime(self.fmt, time.localtime(second))
            self.second = second
        return self.text


class LineFormatter(logging.Formatter):
    """A formatter that can also write a line from its parts (the LogRecord-free path)."""

    def line(
        self,
        name: str,
        levelname: str,
        pid: int | None,
        created: float,
        message: str,
        fields: collections.abc.Iterable[tuple[str, Any]],
    ) -> str:
        raise NotImplementedError

    def task_succeeded(
        self,
        name: str,
        levelname: str,
        pid: int,
        created: float,
        task_id: int,
        handler: str,
        queue: str,
        duration: float,
        attempt: int,
    ) -> str:
        """`line()` for TASK_SUCCEEDED and task_fields(); the formats write it directly."""
        message = TASK_SUCCEEDED % (task_id, handler, duration)
        fields = task_fields(task_id, handler, queue, duration, "succeeded", attempt)
        return self.line(name, levelname, pid, created, message, fields.items())


class JsonFormatter(LineFormatter):
    def __init__(self) -> None:
        super().__init__()
        self._time = _SecondCache("%Y-%m-%dT%H:%M:%S")
        self._encode = json.JSONEncoder(default=str).encode

    def line(
        self,
        name: str,
        levelname: str,
        pid: int | None,
        created: float,
        message: str,
        fields: collections.abc.Iterable[tuple[str, Any]],
        traceback: str | None = None,
    ) -> str:
        data: dict[str, Any] = {
            "time": self._time(created),
            "level": levelname.lower(),
            "logger": name,
            "pid": pid,
            "message": message,
        }
        data.update(fields)
        if traceback is not None:
            data["traceback"] = traceback
        return self._encode(data)

    def task_succeeded(
        self,
        name: str,
        levelname: str,
        pid: int,
        created: float,
        task_id: int,
        handler: str,
        queue: str,
        duration: float,
        attempt: int,
    ) -> str:
        # json.dumps' output for these exact types (see task_succeeded()): ints and finite
        # floats as their repr(), strings through the encoder's own escaping function.
        quote = _quote
        task = str(task_id)
        message = quote(f"task {task} {handler} succeeded in {duration:.3f}s")
        clock = self._time
        if int(created) != clock.second:
            clock(created)
        level = '"info"' if levelname == "INFO" else quote(levelname.lower())
        return (
            f'{{"time": "{clock.text}", "level": {level}, "logger": {quote(name)}, '
            f'"pid": {pid}, "message": {message}, "event": "task_finished", '
            f'"task_id": {task}, "handler": {quote(handler)}, "queue": {quote(queue)}, '
            f'"duration": {_round6(duration)}, "outcome": "succeeded", "attempt": {attempt}}}'
        )

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        traceback = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(
            record.name,
            record.levelname,
            record.process,
            record.created,
            record.message,
            _fields(record),
            traceback,
        )


class TextFormatter(LineFormatter):
    """`2026-12-03 14:00:00,123 INFO [pid] logger: message key=value ...`, then any
    traceback on the lines below."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
        self._time = _SecondCache(self.default_time_format)

    def line(
        self,
        name: str,
        levelname: str,
        pid: int | None,
        created: float,
        message: str,
        fields: collections.abc.Iterable[tuple[str, Any]],
    ) -> str:
        text = (
            f"{self._time(created)},{int((created - int(created)) * 1000):03d} {levelname} "
            f"[{pid}] {name}: {message}"
        )
        pairs = " ".join([f"{k}={v}" for k, v in fields])
        return f"{text} {pairs}" if pairs else text

    def task_succeeded(
        self,
        name: str,
        levelname: str,
        pid: int,
        created: float,
        task_id: int,
        handler: str,
        queue: str,
        duration: float,
        attempt: int,
    ) -> str:
        second = int(created)
        clock = self._time
        if second != clock.second:
            clock(created)
        task = str(task_id)
        return (
            f"{clock.text},{_MILLIS[int((created - second) * 1000)]} {levelname} [{pid}] "
            f"{name}: task {task} {handler} succeeded in {duration:.3f}s "
            f"event=task_finished task_id={task} handler={handler} queue={queue} "
            f"duration={_round6(duration)} outcome=succeeded attempt={attempt}"
        )

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        text = self.line(
            record.name,
            record.levelname,
            record.process,
            record.created,
            record.message,
            _fields(record),
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


class BatchingHandler(logging.Handler):
    """Lines to a stream; below WARNING in batches, written by a thread of its own.

    A line below WARNING waits up to FLUSH_INTERVAL for the lines after it, then they go out
    in writes of at most CHUNK_BYTES of whole lines, so the lines of the worker processes
    sharing one pipe never cut into each other. A WARNING or worse is written at once, with
    what was pending before it. `flush()` (logging.shutdown, at exit) writes everything. A
    process killed outright (SIGKILL) loses at most its last FLUSH_INTERVAL of INFO lines.
    """

    def __init__(self, stream: IO[str], interval: float = FLUSH_INTERVAL) -> None:
        super().__init__()
        self.stream = stream
        self.interval = interval
        self._pending: collections.deque[str] = collections.deque()  # appends need no lock
        self._write_lock = threading.Lock()  # held while taking and writing: order is kept
        self._ready = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        _handlers.add(self)

    def add(self, line: str) -> None:
        """Queue one line below WARNING for the writing thread."""
        self._pending.append(line)
        if self._closed:
            # Closed but still attached: logging.config.dictConfig (Django's setup(), an
            # application's import) closes every handler. The thread is gone: write it now.
            self.flush()
        elif not self._ready.is_set():
            if self._thread is None:
                self._start()
            self._ready.set()
        elif len(self._pending) > MAX_PENDING_LINES:
            self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if record.levelno >= logging.WARNING:
                self._pending.append(line)
                self.flush()
            else:
                self.add(line)
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Write every pending line now, in order."""
        with self._write_lock:
            self._write_pending()

    def _write_pending(self) -> None:  # with self._write_lock held
        chunk: list[str] = []
        size = 0
        pending = self._pending
        while pending:
            line = pending.popleft() + "\n"
            if chunk and size + len(line) > CHUNK_BYTES:
                self.stream.write("".join(chunk))
                self.stream.flush()
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self.stream.write("".join(chunk))
            self.stream.flush()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dbqueue-log-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            self._ready.wait()
            time.sleep(self.interval)  # the lines of the next tasks join this write
            self._ready.clear()  # before taking the lines: a line added now sets it again
            try:
                self.flush()
            except Exception:  # stderr closed or broken: nothing left to report it to
                pass

    def close(self) -> None:
        try:
            self.flush()
        except Exception:
            pass
        self._closed = True
        self._ready.set()
        super().close()

    def after_fork(self) -> None:
        """In a forked child: the writing thread did not come along, its lock may be held,
        and the pending lines are the parent's to write."""
        self._write_lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = None
        self._pending.clear()


_handlers: weakref.WeakSet[BatchingHandler] = weakref.WeakSet()


class _DbqueueLogger(logging.Logger):
    """dbqueue's loggers in the CLI: INFO and DEBUG lines skip the LogRecord when nothing
    could tell (see the module docstring); everything else is the ordinary Logger."""

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(logging.INFO):
            self._log_line(logging.INFO, msg, args, kwargs)

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(logging.DEBUG):
            self._log_line(logging.DEBUG, msg, args, kwargs)

    def _log_line(self, level: int, msg: object, args: Any, kwargs: dict[str, Any]) -> None:
        handler = self._only_handler(level)
        extra = kwargs.get("extra")
        if (
            handler is None
            or len(kwargs) > (extra is not None)  # exc_info, stack_info, stacklevel
            or not isinstance(extra, (dict, type(None)))
        ):
            self._log(level, msg, args, **kwargs)
            return
        try:
            line = self._line(handler, level, msg, args, extra)
        except Exception:  # a bad argument: logging's own path reports it (handleError)
            self._log(level, msg, args, **kwargs)
            return
        handler.add(line)

    def _line(
        self,
        handler: BatchingHandler,
        level: int,
        msg: object,
        args: Any,
        extra: dict[str, Any] | None,
    ) -> str:
        """The line `handler.format(self.makeRecord(...))` would give, without the record."""
        formatter = handler.formatter
        assert isinstance(formatter, LineFormatter)  # _only_handler checked it
        if args and len(args) == 1 and isinstance(args[0], collections.abc.Mapping) and args[0]:
            args = args[0]  # log.info("%(a)s", {"a": 1}), as LogRecord does
        message = str(msg) % args if args else str(msg)
        if extra and not _STANDARD.isdisjoint(extra):
            raise KeyError(f"Attempt to overwrite {sorted(_STANDARD & extra.keys())} in LogRecord")
        return formatter.line(
            self.name,
            logging.getLevelName(level),
            _pid,
            time.time(),
            message,
            extra.items() if extra else (),
        )

    def _only_handler(self, level: int) -> BatchingHandler | None:
        """The BatchingHandler that alone would get this logger's record, unfiltered.

        Asked again for every line: logging says nothing when a handler, filter, level or
        flag changes (dictConfig assigns them directly), and an exact cache would have to
        read the same attributes as this does.
        """
        if logging.getLogRecordFactory() is not logging.LogRecord:
            return None  # the application's factory may add fields or change them
        if not logging.logProcesses:
            return None  # the record's pid is None then
        logger: logging.Logger | None = self
        while logger is not None:
            if logger.filters:
                return None
            if logger.handlers:
                break
            if not logger.propagate:
                return None
            logger = logger.parent
        if logger is None or logger.propagate or len(logger.handlers) != 1:
            return None
        handler = logger.handlers[0]
        if (
            type(handler) is not BatchingHandler
            or handler.filters
            or level < handler.level
            or not isinstance(handler.formatter, LineFormatter)
        ):
            return None
        return handler


def task_succeeded(
    logger: logging.Logger,
    task_id: int,
    handler: str,
    queue: str,
    duration: float,
    attempt: int,
) -> None:
    """`logger.info(TASK_SUCCEEDED, task_id, handler, duration, extra=task_fields(...))`, the
    line of every succeeded task: the caller has checked INFO is enabled. When nothing could
    tell (see _only_handler) and the values are of the types the database gives, the
    formatter writes the line straight from them, without the call's extra dict, the
    generic formatting or a LogRecord; the line is the same."""
    if (
        type(logger) is _DbqueueLogger
        and type(task_id) is int
        and type(handler) is str
        and type(queue) is str
        and type(duration) is float
        and type(attempt) is int
        and 0.0 <= duration < 1e9  # _round6's range (and finite: JSON writes NaN, repr nan)
    ):
        target = logger._only_handler(logging.INFO)
        if target is not None:
            formatter: Any = target.formatter  # a LineFormatter: _only_handler checked it
            target.add(
                formatter.task_succeeded(
                    logger.name,
                    logging.getLevelName(logging.INFO),  # an application may rename it
                    _pid,
                    time.time(),
                    task_id,
                    handler,
                    queue,
                    duration,
                    attempt,
                )
            )
            return
    fields = task_fields(task_id, handler, queue, duration, "succeeded", attempt)
    logger.info(TASK_SUCCEEDED, task_id, handler, duration, extra=fields)


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()
    for handler in list(_handlers):
        handler.after_fork()


os.register_at_fork(after_in_child=_after_fork)


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the `dbqueue` loggers for the CLI (libraries leave logging to the app)."""
    handler = BatchingHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.getLogger("dbqueue.worker")  # the per-task line's logger, made now if need be
    for name, existing in list(logging.Logger.manager.loggerDict.items()):
        if (name == "dbqueue" or name.startswith("dbqueue.")) and type(existing) is logging.Logger:
            existing.__class__ = _DbqueueLogger
    logger = logging.getLogger("dbqueue")
    for old in logger.handlers:
        old.close()
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
