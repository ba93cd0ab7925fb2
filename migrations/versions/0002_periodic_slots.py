"""periodic_slots: the latest scheduled slot of each periodic task (one row per task).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 00:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dbqueue.schema import MYSQL_TABLE, timestamp_type

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "periodic_slots",
        sa.Column(
            "name", sa.String(length=300), nullable=False, comment="the periodic task's handler"
        ),
        sa.Column(
            "last_slot",
            timestamp_type(),
            nullable=False,
            comment="latest slot enqueued (first seen: the slot current then, not enqueued)",
        ),
        sa.Column("updated_at", timestamp_type(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_periodic_slots")),
        **MYSQL_TABLE,
    )


def downgrade() -> None:
    op.drop_table("periodic_slots")
