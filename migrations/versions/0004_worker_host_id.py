"""worker_host_id: which process table a worker's pid belongs to.

Workers that share a hostname but not a PID namespace (containers with host networking)
judged each other dead by pid and rescued live tasks. `workers.host_id` holds hostname,
boot id and PID-namespace inode; the pid probe now runs only between equal `host_id`s.
Rows of workers started before this migration have none: they are judged by heartbeat.

`workers` holds one row per worker process: this is instant on any table size.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 14:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "host_id",
                sa.String(length=300),
                nullable=True,
                comment="hostname/boot id/pid namespace: who may probe this pid (migration 0004)",
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("host_id")
