"""An application with its own alembic history and dbqueue's migrations, in one database.

dbqueue records its revision in `dbqueue_alembic_version`, so neither history sees the other:
the application runs `alembic upgrade head`, the deploy runs `dbqueue migrate`, in any order.
The alternative, calling dbqueue's upgrade from the application's own env.py, is tested too.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import sqlalchemy as sa

from dbqueue import database

ALEMBIC_INI = """
[alembic]
script_location = %(here)s/migrations
"""

# The application's env.py, as alembic's template writes it, reading its URL from APP_DB; its
# autogenerate leaves dbqueue's tables alone (`include_name`, as docs/operations/upgrading.md
# shows: tests/test_docs.py checks that the page shows this code).
APP_ENV = """
import os

import pytest
import sqlalchemy as sa
from alembic import context

from dbqueue import database as dbqueue_database

target_metadata = sa.MetaData()
sa.Table("orders", target_metadata, sa.Column("id", sa.Integer, primary_key=True))
sa.Table("customers", target_metadata, sa.Column("id", sa.Integer, primary_key=True))


def run_migrations_online():
    engine = sa.create_engine(os.environ["APP_DB"], poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            include_name=dbqueue_database.include_name,
        )
        with context.begin_transaction():
            context.run_migrations()
{after}
    engine.dispose()


run_migrations_online()
"""

# The alternative from docs/operations/upgrading.md: the application's env.py upgrades
# dbqueue's tables as well, on the same connection, after its own migrations.
UPGRADE_DBQUEUE_TOO = """
        dbqueue_database.upgrade_on(connection)  # dbqueue's history, its own version table
        connection.commit()
"""

APP_REVISION = '''
"""orders"""
import pytest
import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("{table}", sa.Column("id", sa.Integer, primary_key=True))


def downgrade():
    op.drop_table("{table}")
'''


def make_app(db, after: str = "") -> None:
    """An application directory with alembic.ini, env.py and two revisions of its own."""
    root = db.tmp_path / "app"
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True)
    (root / "alembic.ini").write_text(ALEMBIC_INI)
    (root / "migrations" / "env.py").write_text(APP_ENV.format(after=after))
    (root / "migrations" / "script.py.mako").write_text("")
    for revision, down, table in (("app1", None, "orders"), ("app2", "app1", "customers")):
        (versions / f"{revision}.py").write_text(
            textwrap.dedent(APP_REVISION.format(revision=revision, down=down, table=table))
        )


def app_alembic(db, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**db.env, "APP_DB": db.url}
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=db.tmp_path / "app",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def tables(db) -> set[str]:
    return set(sa.inspect(db.engine).get_table_names())


def versions(db) -> tuple[str | None, str | None]:
    """(application's revision, dbqueue's revision)."""
    app = (
        db.scalar("SELECT version_num FROM alembic_version")
        if "alembic_version" in tables(db)
        else None
    )
    with db.engine.connect() as conn:
        return app, database.current_revision(conn)


@pytest.mark.slow
def test_both_histories_coexist_in_one_database(db):
    database.downgrade(db.settings, "base")  # a fresh database
    make_app(db)

    up = app_alembic(db, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    migrated = db.cli("migrate")
    assert migrated.returncode == 0, migrated.stderr
    head = database.head_revision()
    assert f"dbqueue schema revision {head}" in migrated.stdout
    assert versions(db) == ("app2", head)
    assert {"orders", "customers", "tasks", "periodic_slots"} <= tables(db)
    assert {"alembic_version", database.VERSION_TABLE} <= tables(db)

    # Each tool sees only its own history, and the application's autogenerate finds nothing
    # to do (without include_name it would propose dropping dbqueue's tables).
    check = app_alembic(db, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    current = app_alembic(db, "current")
    assert current.returncode == 0 and "app2 (head)" in current.stdout, current.stderr

    # The application moving back and forth leaves dbqueue's tables and revision alone.
    down = app_alembic(db, "downgrade", "app1")
    assert down.returncode == 0, down.stderr
    assert "customers" not in tables(db) and "tasks" in tables(db)
    assert versions(db) == ("app1", head)
    database.check_schema(db.settings)


@pytest.mark.slow
def test_dbqueue_upgraded_from_the_applications_env_py(db):
    database.downgrade(db.settings, "base")
    make_app(db, after=UPGRADE_DBQUEUE_TOO)
    up = app_alembic(db, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    assert versions(db) == ("app2", database.head_revision())
    assert {"orders", "customers", "tasks", "workers", "periodic_slots"} <= tables(db)
    database.check_schema(db.settings)
    # Running it again is a no-op for both histories.
    again = app_alembic(db, "upgrade", "head")
    assert again.returncode == 0, again.stderr
    assert versions(db) == ("app2", database.head_revision())
