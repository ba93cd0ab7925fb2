"""Upserts and a named lock, in each engine's words, for dbqueue's small tables.

PostgreSQL and SQLite say `INSERT ... ON CONFLICT (key) DO NOTHING / DO UPDATE`; MySQL and
MariaDB say `INSERT ... ON DUPLICATE KEY UPDATE`, which applies to any unique key of the row
(the tables here have no other, apart from an id the insert never sets). `named_lock`
serialises a rare operation fleet-wide on MySQL (GET_LOCK), where PostgreSQL's callers take a
transaction-scoped advisory lock. The claim, unique task inserts and everything else on
`tasks` live in the engine modules (dbqueue/engines/), not here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

from dbqueue import errors

NAMED_LOCK_TIMEOUT_S = 60  # a sync or a migration holds it for milliseconds


def is_mysql(bind: sa.Engine | sa.Connection) -> bool:
    """MySQL or MariaDB (SQLAlchemy names both dialects `mysql`; `mariadb://` too)."""
    return bind.dialect.name in {"mysql", "mariadb"}


def insert_or_ignore(
    conn: sa.Connection, table: sa.Table, values: Mapping[str, Any], key: Sequence[str]
) -> bool:
    """Insert one row unless a row with the same `key` exists; True when inserted."""
    if is_mysql(conn):
        # A no-op update, not INSERT IGNORE: IGNORE would also turn a too-long value or a
        # NULL in a NOT NULL column into a warning and store something else.
        first = key[0]
        mysql_stmt = mysql.insert(table).values(**values)
        mysql_stmt = mysql_stmt.on_duplicate_key_update({first: table.c[first]})
        return int(conn.execute(mysql_stmt).rowcount) == 1
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = insert(table).values(**values)
    stmt = stmt.on_conflict_do_nothing(index_elements=[table.c[k] for k in key])
    return int(conn.execute(stmt).rowcount) == 1


def insert_or_update(
    conn: sa.Connection,
    table: sa.Table,
    values: Mapping[str, Any],
    key: Sequence[str],
    update: Sequence[str],
    touch: Mapping[str, Any] | None = None,
    params: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Insert rows, or set the `update` columns of an existing row (same `key`) to the new
    row's values, and the `touch` columns to their expressions (e.g. updated_at = db_now()).

    `values` may hold bind parameters, then `params` runs it once per parameter set."""
    touch = dict(touch or {})
    if is_mysql(conn):
        mysql_stmt = mysql.insert(table).values(**values, **touch)
        new = mysql_stmt.inserted
        stmt: Any = mysql_stmt.on_duplicate_key_update({**{c: new[c] for c in update}, **touch})
    else:
        insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        dialect_stmt = insert(table).values(**values, **touch)
        excluded = dialect_stmt.excluded
        stmt = dialect_stmt.on_conflict_do_update(
            index_elements=[table.c[k] for k in key],
            set_={**{c: excluded[c] for c in update}, **touch},
        )
    if params is None:
        conn.execute(stmt)
    else:
        conn.execute(stmt, list(params))


@contextlib.contextmanager
def named_lock(engine: sa.Engine, name: str) -> Iterator[None]:
    """Hold a fleet-wide lock called `name` around the with-block (MySQL/MariaDB only).

    GET_LOCK belongs to a session, not to a transaction: it is taken on a connection of its
    own, so it lasts until the block's transaction has committed, and released in `finally`
    (the connection is closed instead when the release itself fails, which ends the lock).
    On other engines this does nothing (PostgreSQL's callers take an advisory lock inside the
    transaction; SQLite's BEGIN IMMEDIATE serialises every writer).
    """
    if not is_mysql(engine):
        yield
        return
    lock_name = f"dbqueue.{name}"[:64]  # MySQL's limit on a lock name
    with engine.connect() as conn:
        got = conn.execute(
            sa.select(sa.func.get_lock(lock_name, NAMED_LOCK_TIMEOUT_S))
        ).scalar_one()
        conn.commit()
        if got != 1:
            raise errors.DbqueueError(
                f"could not take the lock {lock_name!r} within {NAMED_LOCK_TIMEOUT_S}s: "
                "another dbqueue process holds it; try again"
            )
        try:
            yield
        finally:
            try:
                conn.execute(sa.select(sa.func.release_lock(lock_name)))
                conn.commit()
            except sa.exc.DBAPIError:
                conn.invalidate()
