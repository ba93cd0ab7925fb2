"""Alembic environment for dbqueue's own tables, with their own version table.

The database comes from the settings `dbqueue migrate` passes in, else from
DBQUEUE_DATABASE_URL (the same default as dbqueue itself), so `alembic upgrade head` from a
checkout and `dbqueue migrate` from a wheel act on the same database.
"""

from __future__ import annotations

from alembic import context

from dbqueue import config as dbqueue_config
from dbqueue import database, schema

alembic_config = context.config
settings = alembic_config.attributes.get("dbqueue_settings") or dbqueue_config.Settings()
connection = alembic_config.attributes.get("connection")


def run(conn: object) -> None:
    context.configure(
        connection=conn,
        target_metadata=schema.metadata,
        version_table=database.VERSION_TABLE,
        render_as_batch=True,
        compare_type=True,
        include_object=database.include_object_for(conn.dialect),  # type: ignore[attr-defined]
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(
        url=settings.database_url,
        target_metadata=schema.metadata,
        version_table=database.VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
elif connection is not None:
    run(connection)
else:
    with settings.get_engine().connect() as conn:
        run(conn)
        conn.commit()
