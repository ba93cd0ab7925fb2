"""The first schema: tasks, workers (heartbeats), counter_deltas and bus_subscriptions.

Revision ID: 0001
Revises:
Create Date: 2026-11-26 00:28:35.481865
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dbqueue.schema import (
    MYSQL,
    MYSQL_TABLE,
    UNIQUE_LIVE,
    UNIQUE_LIVE_SQL,
    blob_type,
    double_type,
    key_text_type,
    long_text_type,
    timestamp_type,
)

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bus_subscriptions",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            nullable=False,
        ),
        sa.Column("app_key", sa.String(length=100), nullable=False),
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column(
            "matcher", key_text_type(300), nullable=False, comment="event name, or a regex pattern"
        ),
        sa.Column("is_regex", sa.Boolean(), nullable=False),
        sa.Column("handler", key_text_type(300), nullable=False, comment="module:qualname"),
        sa.Column("updated_at", timestamp_type(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bus_subscriptions")),
        sa.UniqueConstraint(
            "app_key",
            "matcher",
            "is_regex",
            "handler",
            name=op.f("uq_bus_subscriptions_app_key_matcher_is_regex_handler"),
        ),
        **MYSQL_TABLE,
    )
    op.create_table(
        "counter_deltas",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            nullable=False,
        ),
        sa.Column("table_name", sa.String(length=200), nullable=False),
        sa.Column(
            "row_id", sa.String(length=200), nullable=False, comment="parent primary key, as text"
        ),
        sa.Column("column_name", sa.String(length=200), nullable=False),
        sa.Column("delta", sa.BigInteger(), nullable=False),
        sa.Column("created_at", timestamp_type(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_counter_deltas")),
        **MYSQL_TABLE,
    )
    with op.batch_alter_table("counter_deltas", schema=None) as batch_op:
        batch_op.create_index(
            "ix_counter_deltas_parent", ["table_name", "row_id", "column_name"], unique=False
        )

    op.create_table(
        "tasks",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            nullable=False,
        ),
        sa.Column("queue", sa.String(length=100), server_default="default", nullable=False),
        sa.Column(
            "priority",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="lower runs first (delayed_job's rule)",
        ),
        sa.Column(
            "run_at",
            timestamp_type(),
            nullable=False,
            comment="not claimed before this time",
        ),
        sa.Column("status", sa.String(length=16), server_default="queued", nullable=False),
        sa.Column(
            "handler", sa.Text(), nullable=False, comment="module:qualname of the callable (signed)"
        ),
        sa.Column(
            "payload",
            blob_type(),
            nullable=False,
            comment="signed pickle of (callable reference, args, kwargs)",
        ),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default="25", nullable=False),
        sa.Column(
            "timeout", double_type(), nullable=True, comment="seconds; null: the worker's default"
        ),
        sa.Column(
            "locked_by",
            sa.String(length=200),
            nullable=True,
            comment="worker name holding the task",
        ),
        sa.Column("locked_at", timestamp_type(), nullable=True),
        sa.Column(
            "result", blob_type(), nullable=True, comment="signed pickle of the return value"
        ),
        sa.Column(
            "exception", blob_type(), nullable=True, comment="signed pickle of the exception"
        ),
        sa.Column(
            "error",
            long_text_type(),
            nullable=True,
            comment="exception, message and traceback as text",
        ),
        sa.Column("unique_key", sa.Text(), nullable=True),
        sa.Column("created_at", timestamp_type(), nullable=False),
        sa.Column("started_at", timestamp_type(), nullable=True),
        sa.Column("finished_at", timestamp_type(), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
            name=op.f("ck_tasks_status_known"),
        ),
        sa.CheckConstraint(
            "attempts >= 0 AND max_attempts >= 1", name=op.f("ck_tasks_attempts_valid")
        ),
        sa.CheckConstraint("length(queue) > 0", name=op.f("ck_tasks_queue_not_empty")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sqlite_autoincrement=True,
        **MYSQL_TABLE,
    )
    if op.get_context().dialect.name in MYSQL:
        _mysql_task_indexes()
        _workers()
        return
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index(
            "ix_tasks_claimable",
            ["priority", "run_at", "id"],
            unique=False,
            postgresql_where=sa.text("status = 'queued'"),
            sqlite_where=sa.text("status = 'queued'"),
        )
        batch_op.create_index(
            "ix_tasks_running",
            ["locked_by"],
            unique=False,
            postgresql_where=sa.text("status = 'running'"),
            sqlite_where=sa.text("status = 'running'"),
        )
        batch_op.create_index(
            "ix_tasks_status_finished_at", ["status", "finished_at"], unique=False
        )
        batch_op.create_index(
            "ix_tasks_unique_key",
            ["unique_key"],
            unique=True,
            postgresql_where=sa.text("unique_key IS NOT NULL AND status IN ('queued', 'running')"),
            sqlite_where=sa.text("unique_key IS NOT NULL AND status IN ('queued', 'running')"),
        )

    _workers()


def _workers() -> None:
    op.create_table(
        "workers",
        sa.Column("name", sa.String(length=200), nullable=False, comment="host:pid:random"),
        sa.Column("hostname", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("queues", sa.Text(), nullable=True, comment="comma-separated; null: every queue"),
        sa.Column("started_at", timestamp_type(), nullable=False),
        sa.Column("heartbeat_at", timestamp_type(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_workers")),
        **MYSQL_TABLE,
    )


def _mysql_task_indexes() -> None:
    """MySQL/MariaDB have no partial indexes: `status` leads instead; the unique key is a
    stored generated column, the key's hash while the task is unfinished, NULL after."""
    op.create_index("ix_tasks_claimable", "tasks", ["status", "priority", "run_at", "id"])
    op.create_index("ix_tasks_running", "tasks", ["status", "locked_by"])
    op.create_index("ix_tasks_status_finished_at", "tasks", ["status", "finished_at"])
    op.execute(
        f"ALTER TABLE tasks ADD COLUMN {UNIQUE_LIVE} VARCHAR(64) "
        f"GENERATED ALWAYS AS ({UNIQUE_LIVE_SQL}) STORED"
    )
    op.create_index("ix_tasks_unique_key", "tasks", [UNIQUE_LIVE], unique=True)


def downgrade() -> None:
    op.drop_table("workers")
    if op.get_context().dialect.name in MYSQL:
        op.drop_table("tasks")  # its indexes and generated column with it
        op.drop_table("counter_deltas")
        op.drop_table("bus_subscriptions")
        return
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_tasks_unique_key",
            postgresql_where=sa.text("unique_key IS NOT NULL AND status IN ('queued', 'running')"),
            sqlite_where=sa.text("unique_key IS NOT NULL AND status IN ('queued', 'running')"),
        )
        batch_op.drop_index("ix_tasks_status_finished_at")
        batch_op.drop_index(
            "ix_tasks_running",
            postgresql_where=sa.text("status = 'running'"),
            sqlite_where=sa.text("status = 'running'"),
        )
        batch_op.drop_index(
            "ix_tasks_claimable",
            postgresql_where=sa.text("status = 'queued'"),
            sqlite_where=sa.text("status = 'queued'"),
        )

    op.drop_table("tasks")
    with op.batch_alter_table("counter_deltas", schema=None) as batch_op:
        batch_op.drop_index("ix_counter_deltas_parent")

    op.drop_table("counter_deltas")
    op.drop_table("bus_subscriptions")
