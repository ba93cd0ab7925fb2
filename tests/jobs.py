"""Every task function the tests enqueue lives here, so worker processes can import them."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from dbqueue import Snooze, handle_asynchronously


def add(a: int, b: int) -> int:
    return a + b


def echo(*args: Any, **kwargs: Any) -> Any:
    return {"args": args, "kwargs": kwargs}


def noop() -> None:
    return None


def raise_value_error(message: str = "boom") -> None:
    raise ValueError(message)


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def record_run(url: str, label: str) -> str:
    """Append (label, pid) to a `runs` table in its own transaction: counts executions."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO runs (label, pid) VALUES (:label, :pid)"),
            {"label": label, "pid": os.getpid()},
        )
    engine.dispose()
    return label


@handle_asynchronously
def decorated_add(a: int, b: int) -> int:
    return a + b


@handle_asynchronously(priority=5, queue="mail", max_attempts=3)
def send_mail(address: str) -> str:
    return f"sent to {address}"


@handle_asynchronously(max_attempts=2)
def always_fails() -> None:
    raise RuntimeError("always fails")


class Unpicklable(Exception):
    """Pickles, but cannot be unpickled (its __init__ needs two arguments): cpython #98873."""

    def __init__(self, message: str, other: str) -> None:
        super().__init__(message)
        self.other = other


def raise_unpicklable() -> None:
    raise Unpicklable("odd", "other")


def return_lock() -> Any:
    import threading

    return threading.Lock()


async def async_add(a: int, b: int) -> int:
    import asyncio

    await asyncio.sleep(0)
    return a + b


class Base(orm.DeclarativeBase):
    pass


class Photo(Base):
    __tablename__ = "photos"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    title: orm.Mapped[str] = orm.mapped_column(sa.String(100))
    uploaded: orm.Mapped[bool] = orm.mapped_column(default=False)

    def upload(self, suffix: str = "") -> str:
        self.uploaded = True
        return f"uploaded {self.title}{suffix}"


class Greeter:
    """A plain picklable object whose method is delayed."""

    def __init__(self, name: str) -> None:
        self.name = name

    def greet(self, greeting: str) -> str:
        return f"{greeting}, {self.name}"


def record_bus_event(app: str, handler: str, attributes: dict[str, Any]) -> None:
    """Bus test handlers call this: one JSON line in $BUS_EFFECTS_FILE per delivery."""
    import json

    line = json.dumps({"app": app, "handler": handler, "pid": os.getpid(), **attributes})
    with open(os.environ["BUS_EFFECTS_FILE"], "a") as fh:
        fh.write(line + "\n")


def probe(url: str, label: str, max_sleep_ms: int = 50) -> str:
    """Record one execution (committed at once), then sleep a random 0..max_sleep_ms ms."""
    import random

    record_run(url, label)
    time.sleep(random.uniform(0, max_sleep_ms) / 1000)
    return label


def whoami(seconds: float) -> int:
    """Sleep, then return the pid of the process that ran the task."""
    time.sleep(seconds)
    return os.getpid()


def stubborn(seconds: float) -> str:
    """Ignore the soft timeout: only the hard limit (ending the process) stops it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except BaseException:
            continue
    return "finished"


def exit_process(code: int = 1) -> None:
    os._exit(code)


def segfault() -> None:
    import ctypes

    ctypes.string_at(0)


def kill_self() -> None:
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def busy_loop(seconds: float) -> int:
    """Hold the CPU in pure Python (no sleeping, no I/O) for `seconds`."""
    deadline = time.monotonic() + seconds
    spins = 0
    while time.monotonic() < deadline:
        spins += 1
    return spins


async def async_rendezvous(url: str, label: str, expected: int, timeout: float = 30) -> int:
    """Record this run, then await (yielding the loop) until `expected` runs are recorded.

    Two of these finish only if they run at the same time: run one after the other, the first
    times out.
    """
    import asyncio

    record_run(url, label)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with engine.connect() as conn:
                count = conn.execute(sa.text("SELECT count(*) FROM runs")).scalar_one()
            if count >= expected:
                return int(count)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: only {count} of {expected} runs arrived")
            await asyncio.sleep(0.05)
    finally:
        engine.dispose()


@handle_asynchronously(unique_key="nightly-rollup", on_conflict="replace")
def unique_rollup(day: str) -> str:
    return day


def make_bytes(size: int) -> bytes:
    """A result of `size` bytes from a tiny payload (result size limits)."""
    return b"x" * size


def raise_with_lock() -> None:
    """Raises an exception that cannot be pickled (it holds a lock)."""
    import threading

    raise ValueError("holding a lock", threading.Lock())


def return_unpicklable() -> Any:
    """Returns a value that pickles but cannot be unpickled (cpython #98873)."""
    return Unpicklable("odd", "other")


def rendezvous(directory: str, parties: int, timeout: float = 30.0) -> int:
    """Leave a mark in `directory`, then wait until `parties` marks are there (all running at
    once), or raise TimeoutError: succeeds only when that many tasks run concurrently."""
    import pathlib
    import threading
    import uuid

    folder = pathlib.Path(directory)
    (folder / f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex}").touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.iterdir())) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(folder.iterdir()))} of {parties} ran at once")
        time.sleep(0.01)
    return threading.get_ident()


def record_start(url: str, label: str, seconds: float) -> str:
    """Record (label, pid) when the task starts, in its own transaction, then sleep: a run
    that started is counted even if its worker is killed before it finishes."""
    record_run(url, label)
    time.sleep(seconds)
    return label


HOOK_CALLS: list[tuple[str, Any, Any]] = []  # per-function hooks of `hooked`, in-process tests


def _own_success(task: Any, result: Any) -> None:
    HOOK_CALLS.append(("own_success", task.id, result))


def _own_failure(task: Any, exc: BaseException) -> None:
    HOOK_CALLS.append(("own_failure", task.id, type(exc).__name__))


@handle_asynchronously(on_success=_own_success, on_failure=_own_failure, max_attempts=1)
def hooked(x: int) -> int:
    if x < 0:
        raise ValueError("negative")
    return x * 2


def snooze_once(marker: str, seconds: float, returned: bool = False) -> str:
    """Snooze the first run (raising, or returning, Snooze), succeed the next one."""
    path = Path(marker)
    if not path.exists():
        path.write_text("snoozed")
        if returned:
            return Snooze(seconds)  # type: ignore[return-value]
        raise Snooze(seconds)
    return "ran after the snooze"
