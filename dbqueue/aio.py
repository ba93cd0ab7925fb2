"""Enqueueing from async code: `await enqueue_async(...)` inside an AsyncSession's transaction.

Thin wrappers, not a second implementation: each hands the synchronous `enqueue` function to
`AsyncSession.run_sync` / `AsyncConnection.run_sync`, which run it against the sync facade of the
caller's own connection, so the task commits or rolls back with the caller's data. Without a
session or connection, the sync function runs in a thread so the event loop is never blocked.

Requires SQLAlchemy's asyncio extra and an async driver (`pip install 'dbqueue[async]'` for
aiosqlite; psycopg 3 is async already; aiomysql for MySQL/MariaDB).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from dbqueue import errors
from dbqueue import task as task_module

# Names, not the module: `dbqueue.enqueue` is the function once the package is imported.
from dbqueue.enqueue import RunAt, enqueue, enqueue_many

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

T = TypeVar("T")


async def _run(
    call: Callable[..., T],
    session: AsyncSession | None,
    connection: AsyncConnection | None,
) -> T:
    """Run `call(session=<sync Session>)`, `call(connection=<sync Connection>)`, or in a thread."""
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    if session is not None:
        if not isinstance(session, AsyncSession):
            raise errors.EnqueueError(
                f"session= takes an SQLAlchemy AsyncSession here, not {session!r} "
                "(use dbqueue.enqueue for a sync Session)"
            )
        return await session.run_sync(lambda sync_session: call(session=sync_session))
    if connection is not None:
        if not isinstance(connection, AsyncConnection):
            raise errors.EnqueueError(
                f"connection= takes an SQLAlchemy AsyncConnection here, not {connection!r} "
                "(use dbqueue.enqueue for a sync Connection)"
            )
        return await connection.run_sync(lambda sync_connection: call(connection=sync_connection))
    return await asyncio.to_thread(call)


async def enqueue_async(
    func: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    session: AsyncSession | None = None,
    connection: AsyncConnection | None = None,
    **options: Any,
) -> task_module.Task:
    """`enqueue` for async code; inside `session`'s (or `connection`'s) transaction if given.

    The sync `enqueue` runs on the sync face of your connection (`run_sync`), or without one
    in a thread, so the event loop is never blocked.

    Args:
        func: the function a worker will call (may be `async def`), as for `enqueue`.
        args: positional arguments, pickled now.
        kwargs: keyword arguments, pickled now.
        session: an `AsyncSession` whose transaction the task joins.
        connection: an `AsyncConnection` whose transaction the task joins.
        **options: `enqueue`'s options (priority, run_at, queue, unique_key, on_conflict...).

    Returns:
        The task's handle (its reads, such as `refresh` and `wait`, are synchronous).

    Raises:
        EnqueueError: `session`/`connection` is not the async kind, or as `enqueue`.
        DatabaseUnavailable: dbqueue's own transaction could not reach the database.
    """
    call = functools.partial(enqueue, func, args, kwargs, **options)
    return await _run(call, session, connection)


async def enqueue_many_async(
    func: Callable[..., Any],
    items: Iterable[Any],
    *,
    session: AsyncSession | None = None,
    connection: AsyncConnection | None = None,
    **options: Any,
) -> list[int]:
    """`enqueue_many` for async code: many tasks of one function in one round trip.

    Args:
        func: the function, as for `enqueue`.
        items: one per task: a tuple of positional arguments, a dict of keyword arguments, or
            a single argument.
        session: an `AsyncSession` whose transaction the tasks join.
        connection: an `AsyncConnection` whose transaction the tasks join.
        **options: `enqueue`'s options, the same for every task.

    Returns:
        The tasks' ids, in the order of `items`.

    Raises:
        EnqueueError: `session`/`connection` is not the async kind, or as `enqueue_many`.
        DatabaseUnavailable: dbqueue's own transaction could not reach the database.
    """
    call = functools.partial(enqueue_many, func, list(items), **options)
    return await _run(call, session, connection)


async def schedule_async(
    when: RunAt,
    func: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> task_module.Task:
    """`schedule` for async code: `await schedule_async(timedelta(hours=1), f, session=s)`.

    Args:
        when: an aware datetime, a timedelta from now, or a callable returning either.
        func: the function, as for `enqueue`.
        args: positional arguments.
        kwargs: keyword arguments.
        **options: `enqueue_async`'s other options (session, connection, queue, ...).

    Returns:
        The task's handle.

    Raises:
        EnqueueError: as `enqueue_async`.
        DatabaseUnavailable: dbqueue's own transaction could not reach the database.
    """
    return await enqueue_async(func, args, kwargs, run_at=when, **options)
