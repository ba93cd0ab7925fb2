"""dbqueue's tables through Django's migrations: each migration of this app runs dbqueue's own
alembic revisions up to a pinned one, on the migration's connection and in its transaction,
and records them in dbqueue's version table, so `dbqueue migrate` and `manage.py migrate`
agree on where the schema is. A dbqueue release that adds an alembic revision adds a
migration here pinned to it (tests/test_django_app.py checks the last one is at the head)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dbqueue import database
from dbqueue.django import connection

Step = Callable[[Any, Any], None]


def upgrade_to(revision: str) -> Step:
    """RunPython code: dbqueue's tables upgraded to `revision`."""

    def upgrade(apps: Any, schema_editor: Any) -> None:
        # Begun here so alembic sees an outer transaction (Django's) and stays inside it:
        # revisions that build an index CONCURRENTLY build it plainly then.
        with connection.borrowed(schema_editor.connection.alias) as conn, conn.begin():
            database.upgrade_on(conn, revision)

    return upgrade


def downgrade_to(revision: str | None) -> Step:
    """RunPython reverse code: dbqueue's tables downgraded to `revision` (None: removed)."""

    def downgrade(apps: Any, schema_editor: Any) -> None:
        with connection.borrowed(schema_editor.connection.alias) as conn, conn.begin():
            database.downgrade_on(conn, revision or "base")

    return downgrade


def latest_revision() -> str:
    """The dbqueue revision the last of this app's migrations brings the schema to."""
    import importlib
    import pkgutil

    from dbqueue.django import migrations

    names = sorted(m.name for m in pkgutil.iter_modules(migrations.__path__) if m.name[0].isdigit())
    module = importlib.import_module(f"dbqueue.django.migrations.{names[-1]}")
    return str(module.REVISION)
