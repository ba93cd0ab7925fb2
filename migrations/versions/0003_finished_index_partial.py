"""finished_index_partial: the index on finished rows covers finished rows only.

`ix_tasks_status_finished_at` indexed every row, so each claim (queued -> running) and each
outcome wrote an entry into it; only pruning and the dashboard read it, and only for finished
rows. `ix_tasks_finished` is the same index restricted to finished statuses: a claim no longer
touches it (one index entry fewer per task on the hot path).

On a large table the index is rebuilt by this migration; run it off-peak.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 11:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

FINISHED = sa.text("status IN ('succeeded', 'failed', 'cancelled')")


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index(
            "ix_tasks_finished",
            ["status", "finished_at"],
            unique=False,
            postgresql_where=FINISHED,
            sqlite_where=FINISHED,
        )
        batch_op.drop_index("ix_tasks_status_finished_at")


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index(
            "ix_tasks_status_finished_at", ["status", "finished_at"], unique=False
        )
        batch_op.drop_index("ix_tasks_finished", postgresql_where=FINISHED, sqlite_where=FINISHED)
