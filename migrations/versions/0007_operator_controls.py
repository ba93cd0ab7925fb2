"""operator_controls: pause, cancel of running tasks, snooze, concurrency limits (issue 18).

- `queue_settings` (one row per queue an operator configured): `paused`, `max_concurrency`.
- `tasks.snoozes`: times a task put itself back with `Snooze` (no attempt spent).
- `tasks.cancel_requested_at`: `Task.cancel()` of a running task, read by its worker.
- `tasks.concurrency_key`, `tasks.max_concurrency`: the per-key limit, fixed at enqueue.

Columns are nullable or have a constant default: a catalog change on PostgreSQL (11+) and
SQLite, instant on any table size.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dbqueue.schema import MYSQL_TABLE, timestamp_type

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "queue_settings",
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column(
            "paused",
            sa.Boolean(),
            server_default=sa.false(),
            nullable=False,
            comment="workers claim nothing of a paused queue; enqueueing still works",
        ),
        sa.Column(
            "max_concurrency",
            sa.Integer(),
            nullable=True,
            comment="at most this many of the queue's tasks run at once, fleet-wide; null: no cap",
        ),
        sa.Column("updated_at", timestamp_type(), nullable=False),
        sa.PrimaryKeyConstraint("queue", name=op.f("pk_queue_settings")),
        **MYSQL_TABLE,
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "snoozes",
                sa.Integer(),
                server_default="0",
                nullable=False,
                comment="times the task put itself back with Snooze (no attempt spent)",
            )
        )
        batch_op.add_column(
            sa.Column(
                "cancel_requested_at",
                timestamp_type(),
                nullable=True,
                comment="Task.cancel() of a running task: its worker raises TaskCancelled in it",
            )
        )
        batch_op.add_column(
            sa.Column(
                "concurrency_key",
                sa.Text(),
                nullable=True,
                comment="tasks sharing a key run at most max_concurrency at once, fleet-wide",
            )
        )
        batch_op.add_column(
            sa.Column(
                "max_concurrency",
                sa.Integer(),
                nullable=True,
                comment="limit for concurrency_key",
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("max_concurrency")
        batch_op.drop_column("concurrency_key")
        batch_op.drop_column("cancel_requested_at")
        batch_op.drop_column("snoozes")
    op.drop_table("queue_settings")
