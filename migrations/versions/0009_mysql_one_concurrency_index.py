"""mysql_one_concurrency_index: MySQL/MariaDB keeps one of 0008's two concurrency indexes.

There, without partial indexes, 0008 made `ix_tasks_concurrency_running (status,
concurrency_key(191))` and `ix_tasks_concurrency_queued (status, concurrency_key(191), queue)`:
the second has the first's columns as its leading ones, so every lookup the first serves (a
key's running rows, the saturated keys, the queued rows with a key) reads the second the same
way, with the same key length and the same estimates (EXPLAIN, tests/test_mysql_engine.py).
Every row enters both, with or without a key, and a claim and an outcome each move a row's
entry in both: this drops the first. One index entry fewer per enqueue and per transition.

PostgreSQL and SQLite: nothing. There both are partial indexes on different rows (running,
queued) and neither holds the other's.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 23:50:00
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

NAME = "ix_tasks_concurrency_running"


def _mysql() -> bool:
    return op.get_context().dialect.name in ("mysql", "mariadb")


def upgrade() -> None:
    if _mysql():
        op.drop_index(NAME, table_name="tasks")


def downgrade() -> None:
    if _mysql():
        op.create_index(
            NAME, "tasks", ["status", "concurrency_key"], mysql_length={"concurrency_key": 191}
        )
