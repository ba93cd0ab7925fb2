"""Async tasks for tests/test_aio_worker.py, run by real worker processes."""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from dbqueue import hooks


async def nap(seconds: float) -> tuple[float, float, int]:
    """Await `seconds`; return (start, end, pid): the run's interval, stored as its result."""
    start = time.time()
    await asyncio.sleep(seconds)
    return start, time.time(), os.getpid()


async def nap_then_fail(seconds: float) -> None:
    await asyncio.sleep(seconds)
    raise ValueError("failed after a nap")


async def stubborn(seconds: float, started_in: str | None = None) -> str:
    """Await `seconds` ignoring one cancellation (as a cleanup that awaits would); leave a
    file in the folder `started_in` once started."""
    if started_in is not None:
        (Path(started_in) / str(os.getpid() + time.time())).touch()
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        await asyncio.sleep(0.1)
        raise
    return "done"


async def blocking_coroutine(seconds: float) -> None:
    """An async task that blocks its loop (time.sleep): only the watchdog can stop it."""
    time.sleep(seconds)


def blocking_nap(seconds: float) -> tuple[float, float, int]:
    """A sync task, beside the async ones."""
    start = time.time()
    time.sleep(seconds)
    return start, time.time(), os.getpid()


_engines: dict[str, Any] = {}


async def pooled_query(url: str) -> Any:
    """Run a query through one async engine with a normal pool, kept across tasks (the
    worker's event loop lives as long as the process). Returns the server session's id on
    PostgreSQL and MariaDB (so the test can count connections), 1 on SQLite."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = _engines.get(url)
    if engine is None:
        engine = _engines[url] = create_async_engine(url, pool_size=3, max_overflow=0)
    async with engine.connect() as conn:
        await asyncio.sleep(0.05)  # hold the connection while others want one
        if engine.dialect.name == "postgresql":
            return (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
        if engine.dialect.name in {"mysql", "mariadb"}:
            return (await conn.execute(sa.text("SELECT CONNECTION_ID()"))).scalar_one()
        return (await conn.execute(sa.text("SELECT 1"))).scalar_one()


# -- hooks: a contextvar set by a (sync) around_task hook must be seen by the coroutine ------

tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="none")
events: list[str] = []


async def read_tenant() -> str:
    await asyncio.sleep(0)
    return tenant.get()


def install_hooks() -> list[Any]:
    @hooks.before_task
    def before(task: hooks.TaskView) -> None:
        events.append(f"before {task.id}")

    @hooks.around_task
    def around(task: hooks.TaskView, call_next: Any) -> Any:
        token = tenant.set(f"tenant-{task.id}")
        try:
            return call_next()
        finally:
            tenant.reset(token)

    @hooks.after_task
    def after(task: hooks.TaskView, outcome: hooks.Outcome) -> None:
        events.append(f"after {task.id} {outcome.status}")

    return [before, around, after]
