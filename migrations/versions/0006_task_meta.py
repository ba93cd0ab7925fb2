"""task_meta: a small JSON dict per task (trace context, tenant), outside the signed payload.

Adds the nullable column `tasks.meta` (JSON). Adding a nullable column without a default is
a catalog change on PostgreSQL and SQLite: instant on any table size, no rewrite.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 15:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "meta",
                sa.JSON(none_as_null=True),
                nullable=True,
                comment="small JSON dict (trace context, tenant): not pickled, not signed "
                "(migration 0006)",
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("meta")
