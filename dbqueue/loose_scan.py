"""Loose index scans: the distinct values of an index's leading columns, one index lookup
each (a recursive CTE that skips from one value to the next), however many rows hold each.

A walk takes at most `WALK` values per statement. MariaDB's `max_recursive_iterations` and
MySQL's `cte_max_recursion_depth` (1000 by default) bound a recursive query: past it MariaDB
stops the walk without an error (a warning the drivers drop) and MySQL fails the statement.
A longer walk goes on, in the next statement, after the last value of the previous one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

#: Values one statement walks: well under every server's recursion bound.
WALK = 500

#: `next_after(previous)`: a scalar subquery reading the first value after `previous` (an SQL
#: expression or a Python value; None: the lowest value) from one index entry.
NextAfter = Callable[[Any], Any]


def walk(next_after: NextAfter, name: str, after: Any = None) -> sa.CTE:
    """A recursive CTE `name` of `(value, depth)` rows: the first value after `after` at depth
    1, then each next one, WALK values at most. A walk that reached the last value ends with a
    NULL value; one stopped by WALK goes on after `resume_after`'s value."""
    one: sa.ColumnElement[int] = sa.literal_column(
        "1"
    )  # inline: a bound 1 may be typed smallint (psycopg)
    start = sa.select(next_after(after).label("value"), one.label("depth"))
    levels = start.cte(name, recursive=True)
    following = sa.select(next_after(levels.c.value), levels.c.depth + one).where(
        levels.c.value.is_not(None), levels.c.depth < sa.literal_column(str(WALK))
    )
    return levels.union_all(following)


def resume_after(levels: sa.CTE) -> Any:
    """A scalar subquery: the last value of a walk that WALK stopped (walk on after it), NULL
    when the walk reached the last value."""
    last = levels.c.depth == sa.literal_column(str(WALK))
    return sa.select(levels.c.value).where(last, levels.c.value.is_not(None)).scalar_subquery()


def values(conn: sa.Connection, next_after: NextAfter, name: str) -> list[Any]:
    """Every value, in order: a statement per WALK values."""
    found: list[Any] = []
    after = None
    while True:
        levels = walk(next_after, name, after)
        stmt = sa.select(levels.c.value).where(levels.c.value.is_not(None))
        taken = list(conn.execute(stmt.order_by(levels.c.depth)).scalars())
        found += taken
        if len(taken) < WALK:
            return found
        after = taken[-1]
