"""queue_claimable_index: queued rows indexed per queue, so one queue's backlog is never read
by a worker of another queue (issue 16).

Adds `ix_tasks_queue_claimable (queue, priority, run_at, id) WHERE status = 'queued'`; the
claim of a worker given queues (`-q`), the idle worker's next run_at and the queue counts read
it. `ix_tasks_claimable` stays, for workers serving every queue.

PostgreSQL: `CREATE INDEX CONCURRENTLY`, outside the migration's transaction (the revisions
before it are committed first): enqueues and claims go on while it is built, which reads the
table twice and waits for transactions open at its start. An interrupted build leaves an
invalid index, dropped and built again when the migration is run again. When dbqueue's
migrations run inside another transaction (`database.upgrade_on` from an application's
env.py), a plain `CREATE INDEX` is built instead, which blocks writes to `tasks` while it
runs; the README's upgrade notes give the times. SQLite: a plain `CREATE INDEX`.
MySQL/MariaDB: `(status, queue, priority, run_at, id)`, no partial indexes there (InnoDB
builds it online).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

NAME = "ix_tasks_queue_claimable"
QUEUED = sa.text("status = 'queued'")


def _concurrently() -> bool:
    """Whether the index can be built CONCURRENTLY: PostgreSQL, and the migration context
    owns its transaction (it can step outside it)."""
    context = op.get_context()
    return context.dialect.name == "postgresql" and not getattr(
        context, "_in_external_transaction", False
    )


def _left_invalid() -> bool:
    """Whether an interrupted CONCURRENTLY build left an invalid index of this name (never
    known when writing SQL offline)."""
    if op.get_context().as_sql:
        return False
    invalid = op.get_bind().execute(
        sa.text(
            "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname = :name AND NOT i.indisvalid"
        ),
        {"name": NAME},
    )
    return invalid.first() is not None


def upgrade() -> None:
    if _concurrently():
        with op.get_context().autocommit_block():
            if _left_invalid():
                op.drop_index(NAME, table_name="tasks", postgresql_concurrently=True)
            op.create_index(
                NAME,
                "tasks",
                ["queue", "priority", "run_at", "id"],
                postgresql_where=QUEUED,
                postgresql_concurrently=True,
            )
        return
    if op.get_context().dialect.name in ("mysql", "mariadb"):  # no partial index: status first
        op.create_index(NAME, "tasks", ["status", "queue", "priority", "run_at", "id"])
        return
    op.create_index(
        NAME,
        "tasks",
        ["queue", "priority", "run_at", "id"],
        postgresql_where=QUEUED,
        sqlite_where=QUEUED,
    )


def downgrade() -> None:
    if _concurrently():
        with op.get_context().autocommit_block():
            op.drop_index(NAME, table_name="tasks", postgresql_concurrently=True)
        return
    op.drop_index(NAME, table_name="tasks")
