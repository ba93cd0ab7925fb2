"""The Django tests: the project in tests/django/project, on one database per pytest run.

Django's settings are process-wide, so a run uses one database: `--db sqlite` (the default)
or `--db postgresql` / `--db mariadb` (a throwaway database made and dropped here, on the
servers tests/conftest.py uses).
scripts/test runs this directory once per database, under Python 3.12+ in .venv-django.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import MYSQL_ADMIN_URL, PG_ADMIN_URL, ROOT, _mysql_admin_engine, _mysql_drop

SITE = Path(__file__).resolve().parent / "project"


def _kind(config: pytest.Config) -> str:
    kinds = config.getoption("--db") or ["sqlite"]
    if len(kinds) != 1:
        raise pytest.UsageError(
            "tests/django runs on one database per run: --db sqlite, or "
            "--db postgresql (Django's settings are process-wide)"
        )
    return kinds[0]


@pytest.fixture(scope="session")
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    kind = _kind(request.config)
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('shop') / 'shop.sqlite3'}"
        return
    name = f"dbqueue_django_{uuid.uuid4().hex[:8]}"
    if kind == "mariadb":
        mysql_admin = _mysql_admin_engine()
        with mysql_admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        try:
            yield (
                sa.make_url(MYSQL_ADMIN_URL)
                .set(drivername="mysql", database=name)
                .render_as_string(hide_password=False)
            )
        finally:
            from django.db import connections

            connections.close_all()
            _mysql_drop(mysql_admin, name)
            mysql_admin.dispose()
        return
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(PG_ADMIN_URL).set(drivername="postgresql", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        from django.db import connections

        connections.close_all()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="session", autouse=True)
def django_project(database_url: str) -> Iterator[str]:
    """Django set up on the test database, migrated (`migrate` creates dbqueue's tables)."""
    os.environ["SHOP_DATABASE_URL"] = database_url
    os.environ["DJANGO_SETTINGS_MODULE"] = "djproject.settings"
    os.environ.pop("DBQUEUE_SECRET_KEY", None)  # the backend derives its key from Django's
    sys.path.insert(0, str(SITE))
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    yield database_url


@pytest.fixture(autouse=True)
def empty_tables() -> Iterator[None]:
    yield
    from django.db import connection

    with connection.cursor() as cursor:
        for table in ("tasks", "workers", "shop_order"):
            cursor.execute(f"DELETE FROM {table}")


def manage_env() -> dict[str, str]:
    """The environment of a manage.py process: the test database, dbqueue and the project."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(SITE)])
    return env


def manage(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python manage.py ARGS` in a real process, with the test database."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=SITE,
        env=manage_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
