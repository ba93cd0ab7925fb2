"""concurrency_indexes: the partial indexes of concurrency limits (issue 18).

- `ix_tasks_concurrency_running (concurrency_key) WHERE status = 'running' AND
  concurrency_key IS NOT NULL`: the limited claim counts a key's running rows through it.
- `ix_tasks_concurrency_queued (queue) WHERE status = 'queued' AND concurrency_key IS NOT
  NULL`: the worker's heart asks every second whether tasks with a key wait in its queues.

Rows without a key enter neither index, so enqueues and claims of tasks without limits write
nothing more. On an existing table both are empty (every row's key is NULL until now).

PostgreSQL: `CREATE INDEX CONCURRENTLY` outside the migration's transaction, as 0005 does
(and for its reasons); an invalid leftover of an interrupted build is dropped and built
again. Inside another transaction (`database.upgrade_on`), and on SQLite: plain CREATE INDEX.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

INDEXES = {
    "ix_tasks_concurrency_running": (
        "concurrency_key",
        sa.text("status = 'running' AND concurrency_key IS NOT NULL"),
    ),
    "ix_tasks_concurrency_queued": (
        "queue",
        sa.text("status = 'queued' AND concurrency_key IS NOT NULL"),
    ),
}

MYSQL_INDEXES = {
    "ix_tasks_concurrency_running": ["status", "concurrency_key"],
    "ix_tasks_concurrency_queued": ["status", "concurrency_key", "queue"],
}


def _concurrently() -> bool:
    context = op.get_context()
    return context.dialect.name == "postgresql" and not getattr(
        context, "_in_external_transaction", False
    )


def _left_invalid(name: str) -> bool:
    if op.get_context().as_sql:
        return False
    invalid = op.get_bind().execute(
        sa.text(
            "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname = :name AND NOT i.indisvalid"
        ),
        {"name": name},
    )
    return invalid.first() is not None


def upgrade() -> None:
    if _concurrently():
        with op.get_context().autocommit_block():
            for name, (column, where) in INDEXES.items():
                if _left_invalid(name):
                    op.drop_index(name, table_name="tasks", postgresql_concurrently=True)
                op.create_index(
                    name, "tasks", [column], postgresql_where=where, postgresql_concurrently=True
                )
        return
    if op.get_context().dialect.name in ("mysql", "mariadb"):
        # No partial indexes: status first, then a prefix of the TEXT key.
        for name, columns in MYSQL_INDEXES.items():
            op.create_index(name, "tasks", columns, mysql_length={"concurrency_key": 191})
        return
    for name, (column, where) in INDEXES.items():
        op.create_index(name, "tasks", [column], postgresql_where=where, sqlite_where=where)


def downgrade() -> None:
    if _concurrently():
        with op.get_context().autocommit_block():
            for name in INDEXES:
                op.drop_index(name, table_name="tasks", postgresql_concurrently=True)
        return
    for name in INDEXES:
        op.drop_index(name, table_name="tasks")
