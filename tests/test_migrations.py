"""The migrations build exactly schema.py, on both databases, and downgrade to nothing."""

from __future__ import annotations

import subprocess
import sys

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from dbqueue import database, schema


def test_migrations_match_schema(db):
    with db.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"version_table": database.VERSION_TABLE, "compare_type": True}
        )
        diff = compare_metadata(context, schema.metadata)
    assert diff == []


def test_downgrade_base_removes_everything_and_upgrade_restores(db):
    database.downgrade(db.settings, "base")
    names = set(sa.inspect(db.engine).get_table_names())
    assert names <= {database.VERSION_TABLE}
    database.migrate(db.settings)
    assert {"tasks", "workers", "counter_deltas", "bus_subscriptions"} <= set(
        sa.inspect(db.engine).get_table_names()
    )


def test_alembic_command_line_from_checkout(db):
    from tests.conftest import ROOT

    env = db.env
    down = subprocess.run(
        [sys.executable, "-m", "alembic", "downgrade", "base"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert down.returncode == 0, down.stderr
    assert "tasks" not in sa.inspect(db.engine).get_table_names()
    up = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert up.returncode == 0, up.stderr
    assert "tasks" in sa.inspect(db.engine).get_table_names()


def test_schema_check_messages(db):
    database.check_schema(db.settings)
    database.downgrade(db.settings, "base")
    try:
        database.check_schema(db.settings)
    except Exception as exc:
        assert "run `dbqueue migrate`" in str(exc)
    else:
        raise AssertionError("check_schema passed on an empty database")
    with db.engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {database.VERSION_TABLE} VALUES ('9999')"))
    try:
        database.check_schema(db.settings)
    except Exception as exc:
        assert "newer than this dbqueue" in str(exc) and "upgrade dbqueue" in str(exc)
    else:
        raise AssertionError("check_schema accepted an unknown revision")
