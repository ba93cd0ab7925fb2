"""The migrations build exactly schema.py, on both databases, and downgrade to nothing."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import dbqueue
from dbqueue import database, schema, store
from tests import jobs


def test_migrations_match_schema(db):
    with db.engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "version_table": database.VERSION_TABLE,
                "compare_type": True,
                "include_object": database.include_object_for(conn.dialect),
            },
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


@pytest.mark.mysql_only
def test_deploys_migrating_at_once_all_succeed(db):
    """Three `dbqueue migrate` at once on an empty database (pods' init containers): MySQL's
    DDL commits at once, so without the lock one created a table another then failed on."""
    database.downgrade(db.settings, "base")
    with db.engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {database.VERSION_TABLE}"))
    db.engine.dispose()
    runs = [db.popen("migrate") for _ in range(3)]
    done = [(run.wait(timeout=120), *run.communicate()) for run in runs]
    assert [code for code, _, _ in done] == [0, 0, 0], done
    with db.engine.connect() as conn:
        assert database.current_revision(conn) == database.head_revision()


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


def _queue_index(db) -> list[Any]:
    """ix_tasks_queue_claimable as the database has it: [] when absent; on PostgreSQL with
    whether it is valid (a failed CONCURRENTLY build leaves an invalid one)."""
    if db.kind == "postgresql":
        return db.rows(
            "SELECT c.relname, i.indisvalid, pg_get_indexdef(c.oid) AS definition "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname = 'ix_tasks_queue_claimable'"
        )
    if db.kind == "mariadb":
        return db.rows(
            "SELECT index_name, 1 AS indisvalid, GROUP_CONCAT(column_name ORDER BY seq_in_index "
            "SEPARATOR ', ') AS definition FROM information_schema.statistics "
            "WHERE table_schema = DATABASE() AND index_name = 'ix_tasks_queue_claimable' "
            "GROUP BY index_name"
        )
    return db.rows(
        "SELECT name, 1 AS indisvalid, sql AS definition FROM sqlite_master "
        "WHERE type = 'index' AND name = 'ix_tasks_queue_claimable'"
    )


def test_0005_adds_the_per_queue_claim_index_and_downgrade_removes_it(db):
    dbqueue.enqueue_many(jobs.noop, [()] * 3, queue="mail")
    database.downgrade(db.settings, "0004")
    assert _queue_index(db) == []
    database.migrate(db.settings)
    ((_name, valid, definition),) = _queue_index(db)
    if db.kind == "mariadb":  # no partial indexes: the status leads
        assert definition == "status, queue, priority, run_at, id"
    else:
        assert valid and "queue, priority, run_at, id" in definition.replace('"', "")
        assert "status" in definition and "queued" in definition  # partial: queued rows only
    with db.engine.begin() as conn:
        assert len(store.claim(conn, "w", 10, ["mail"])) == 3
    assert db.scalar("SELECT count(*) FROM tasks") == 3  # the migration kept every row


@pytest.mark.postgresql_only
def test_0005_builds_concurrently_outside_the_transaction(db):
    """The SQL alembic would run (offline mode): the index is built CONCURRENTLY after the
    transaction of the revisions before it is committed, and dropped the same way."""
    from tests.conftest import ROOT

    def sql(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "alembic", *args, "--sql"],
            cwd=ROOT,
            env=db.env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    up = sql("upgrade", "0004:0005")
    create = up.index("CREATE INDEX CONCURRENTLY ix_tasks_queue_claimable ON tasks")
    assert up.rfind("COMMIT", 0, create) > up.rfind("BEGIN", 0, create)
    down = sql("downgrade", "0005:0004")
    drop = down.index("DROP INDEX CONCURRENTLY ix_tasks_queue_claimable")
    assert down.rfind("COMMIT", 0, drop) > down.rfind("BEGIN", 0, drop)


@pytest.mark.postgresql_only
def test_0005_rebuilds_an_index_left_invalid_by_an_interrupted_build(db):
    """A CONCURRENTLY build that fails leaves an invalid index behind; running the migration
    again drops it and builds the real one (instead of keeping the broken one)."""
    dbqueue.enqueue_many(jobs.noop, [()] * 2, queue="mail")
    database.downgrade(db.settings, "0004")
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        with pytest.raises(sa.exc.IntegrityError):  # two rows of one queue: not unique
            conn.exec_driver_sql(
                "CREATE UNIQUE INDEX CONCURRENTLY ix_tasks_queue_claimable ON tasks (queue)"
            )
    assert [(r.relname, r.indisvalid) for r in _queue_index(db)] == [
        ("ix_tasks_queue_claimable", False)
    ]
    database.migrate(db.settings)
    ((_name, valid, definition),) = _queue_index(db)
    assert valid and "UNIQUE" not in definition and "priority" in definition


def _index_columns(db, name: str) -> list[str] | None:
    """The columns of index `name` on tasks, None when it does not exist."""
    for index in sa.inspect(db.engine).get_indexes("tasks"):
        if index["name"] == name:
            return list(index["column_names"])
    return None


def test_0009_drops_mysqls_redundant_concurrency_index_only_there(db):
    """MySQL/MariaDB: ix_tasks_concurrency_running (status, concurrency_key) is gone after
    0009 and back after a downgrade; ix_tasks_concurrency_queued, whose leading columns those
    are, stays. PostgreSQL and SQLite keep both partial indexes either way. (That claims and
    limits still read an index: tests/test_mysql_engine.py's plan tests.)"""
    running, queued = "ix_tasks_concurrency_running", "ix_tasks_concurrency_queued"
    task = dbqueue.enqueue(jobs.noop, concurrency_key="k", max_concurrency=1)
    mysql = db.kind == "mariadb"
    assert _index_columns(db, running) == (None if mysql else ["concurrency_key"])
    assert _index_columns(db, queued) == (
        ["status", "concurrency_key", "queue"] if mysql else ["queue"]
    )
    database.downgrade(db.settings, "0008")
    assert _index_columns(db, running) == (
        ["status", "concurrency_key"] if mysql else ["concurrency_key"]
    )
    database.migrate(db.settings)
    assert _index_columns(db, running) == (None if mysql else ["concurrency_key"])
    assert _index_columns(db, queued) is not None
    with db.engine.begin() as conn:  # the task is there and its limit is honoured
        assert [r.id for r in store.claim(conn, "w", 10, limited=True)] == [task.id]
