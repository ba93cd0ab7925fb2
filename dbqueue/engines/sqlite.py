"""SQLite: one writer at a time. Every transaction begins `BEGIN IMMEDIATE` (config.py), so
the claim needs no row locks (SKIP LOCKED does not exist, and is not needed); the planner is
steered to the per-queue index with `INDEXED BY`; no NOTIFY (workers poll)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.compiler import compiles

from dbqueue.engines import base
from dbqueue.engines.base import NewTask


@compiles(sa.Table, "sqlite")
def _sqlite_table_with_hint(element: sa.Table, compiler: Any, **kw: Any) -> str:
    """A table in a SQLite FROM clause, followed by the statement's hint for it (`INDEXED
    BY ...`, from `Select.with_hint(table, text, "sqlite")`): SQLAlchemy's SQLite compiler
    drops table hints, SQLite's grammar has this one."""
    text: str = compiler.visit_table(element, **kw)
    hint = (kw.get("fromhints") or {}).get(element)
    if hint and kw.get("asfrom") and not kw.get("ashint"):
        text = f"{text} {hint}"
    return text


class SQLite(base.Engine):
    name = "sqlite"

    def insert_if_absent(self, conn: sa.Connection, task: NewTask) -> int | None:
        return base.insert_on_conflict_do_nothing(conn, task, sqlite.insert)


ENGINE = SQLite()
