"""Inline mode (`dbqueue.inline()`, DBQUEUE_INLINE=1, `bus.inline()`): tasks run in this
process when a worker could first see them, that is once the transaction that enqueued them
has committed.

    dbqueue's own transaction     run at once, after its commit (`after_commit(..., None, ids)`)
    the caller's Session          run from the Session's after_commit event; dropped on rollback
    the caller's Connection       run from the Connection's commit event, once the database
                                  connection has committed; dropped on rollback

A run is a worker's: claim (sign in as a worker, queued -> running) in a short transaction,
call the task with no transaction held (executor.execute), record the outcome and sign out in
another. So a task that writes to the same database through its own engine never waits on
the enqueuing transaction (on SQLite it would wait for a lock held by its own caller). A task
that enqueues runs its inner tasks the same way, while it runs.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, orm

from dbqueue import config, database, executor, identity, store

_PENDING = "dbqueue_on_commit"  # key in Session.info / Connection.info: the callbacks


def after_commit(
    settings: config.Settings, bind: orm.Session | sa.Connection | None, ids: Sequence[int]
) -> None:
    """Run `ids` once their transaction commits: now when it was dbqueue's own (`bind` None,
    called after that commit), else when the caller's Session or Connection commits."""
    on_commit(bind, functools.partial(_run_all, settings, list(ids)))


def on_commit(bind: orm.Session | sa.Connection | None, callback: Callable[[], Any]) -> None:
    """Call `callback` once `bind`'s transaction commits, never if it rolls back; at once for
    None (dbqueue's own transaction, which the caller has just committed)."""
    if bind is None:
        callback()
        return
    bind.info.setdefault(_PENDING, []).append(callback)
    if isinstance(bind, orm.Session):
        if not event.contains(bind, "after_commit", _session_committed):
            event.listen(bind, "after_commit", _session_committed)
            event.listen(bind, "after_transaction_end", _session_transaction_ended)
    elif not event.contains(bind, "commit", _connection_commits):
        event.listen(bind, "commit", _connection_commits)
        event.listen(bind, "rollback", _forget)


def _forget(bind: orm.Session | sa.Connection) -> None:
    """The transaction ended without a commit: its tasks are gone, and so are their ids
    (which SQLite may give to the next tasks)."""
    bind.info.pop(_PENDING, None)


def _session_transaction_ended(session: orm.Session, transaction: orm.SessionTransaction) -> None:
    """A commit has taken the callbacks already; a rollback, or a close without either
    (which fires no rollback event), leaves them to forget. Savepoints end inside it."""
    if transaction.parent is None:
        _forget(session)


def _session_committed(session: orm.Session) -> None:
    for callback in session.info.pop(_PENDING, []):
        callback()


def _connection_commits(conn: sa.Connection) -> None:
    """Core has no after-commit event: commit the database connection here, at the commit
    event, and call back; SQLAlchemy's own COMMIT, which follows, then has nothing left to
    commit (a no-op on both drivers)."""
    pending = conn.info.pop(_PENDING, [])
    if pending:
        conn.connection.dbapi_connection.commit()  # type: ignore[union-attr]
        for callback in pending:
            callback()


def _run_all(settings: config.Settings, ids: list[int]) -> None:
    for task_id in ids:
        run(settings, task_id)


def run(settings: config.Settings, task_id: int) -> store.Outcome | None:
    """Claim, run and record one task as a worker would; None when it is no longer queued
    (its savepoint rolled back, or a worker took it first)."""
    name = f"inline:{socket.gethostname()}:{os.getpid()}:{task_id}"
    engine = settings.get_engine()
    with database.errors_translated(settings), engine.begin() as conn:
        rows = store.claim_by_id(conn, name, task_id)
        if rows:  # a worker process on this database must not take it for an orphan
            store.register_worker(
                conn, name, socket.gethostname(), os.getpid(), None, identity.host_id()
            )
    if not rows:
        return None
    outcome = executor.execute(settings, rows[0])
    with database.errors_translated(settings), engine.begin() as conn:
        store.record(conn, name, [outcome])
        store.remove_workers(conn, [name])
    return outcome
