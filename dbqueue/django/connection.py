"""Django's database connection, as dbqueue sees it: the borrowed connection and the URL.

Two ways to reach the database, for two jobs:

    borrowed(alias)   an SQLAlchemy Connection over Django's own DB-API connection for `alias`
                      in this thread. Enqueues, result reads and the test helpers use it, so a
                      task enqueued inside `transaction.atomic()` commits or rolls back with
                      the block: same connection, same transaction, no second connection.
    settings(...)     dbqueue Settings whose URL is built from `DATABASES[alias]`, for worker
                      processes (`manage.py dbqueue work`), which need connections of their own.

Nothing Django-specific is imported by `import dbqueue`: this module is imported only by the
backend, the app and the management command.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
import sqlalchemy.dialects.sqlite
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

# Django's OPTIONS that are Django's own, not libpq's: not passed on in the workers' URL.
_DJANGO_ONLY_PG_OPTIONS = frozenset(
    {"isolation_level", "assume_role", "server_side_binding", "pool", "cursor_factory", "context"}
)


class _Borrowed:
    """Django's DB-API connection, lent to SQLAlchemy.

    Its transaction is Django's (atomic blocks), so SQLAlchemy's commit, rollback and close do
    nothing here; and the per-connection setup SQLAlchemy's dialects add to connections they
    open (a notice handler, SQL functions such as regexp) is not added to a connection Django
    owns and has set up its own way. Everything else is the real connection.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass

    def add_notice_handler(self, *args: Any) -> None:
        pass

    def create_function(self, *args: Any, **kwargs: Any) -> None:
        pass


class _SQLiteDateTime(sa.dialects.sqlite.DATETIME):
    """DATETIME columns read on Django's SQLite connection: Django opens it with
    `detect_types`, so its converters hand back datetimes where SQLAlchemy expects text."""

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        parse = super().result_processor(dialect, coltype)

        def process(value: Any) -> Any:
            if value is None or isinstance(value, dt.datetime) or parse is None:
                return value
            return parse(value)

        return process


_engines: dict[str, sa.Engine] = {}
_engines_lock = threading.Lock()


def _dialect_url(alias: str) -> str:
    """The SQLAlchemy dialect (and driver) matching Django's backend for `alias`."""
    wrapper = connections[alias]
    if wrapper.vendor == "sqlite":
        return "sqlite+pysqlite://"
    if wrapper.vendor == "postgresql":
        driver = wrapper.Database.__name__.split(".")[0]  # psycopg (3) or psycopg2
        return f"postgresql+{driver}://"
    if wrapper.vendor == "mysql":
        return "mysql+mysqldb://"
    raise ImproperlyConfigured(
        f"DATABASES[{alias!r}] uses {wrapper.vendor}; dbqueue works with SQLite, PostgreSQL "
        "and MySQL/MariaDB: point the backend's OPTIONS['DATABASE'] at one of those"
    )


def engine(alias: str) -> sa.Engine:
    """The Engine whose connections are Django's connection for `alias` in the calling thread.

    One per alias. NullPool: each checkout asks Django for its current connection (Django
    reconnects, closes and keeps one per thread; SQLAlchemy must not hold on to it).
    """
    with _engines_lock:
        found = _engines.get(alias)
        if found is None:

            def creator() -> _Borrowed:
                wrapper = connections[alias]
                wrapper.ensure_connection()
                return _Borrowed(wrapper.connection)

            url = _dialect_url(alias)
            # No hstore look-up: psycopg's TypeInfo wants its own Connection class, not the
            # wrapper, and dbqueue has no hstore column.
            extra = {"use_native_hstore": False} if url.startswith("postgresql+psycopg:") else {}
            found = sa.create_engine(
                url, creator=creator, poolclass=sa.pool.NullPool, pool_reset_on_return=None, **extra
            )
            if found.dialect.name == "sqlite":
                colspecs = dict(found.dialect.colspecs)
                colspecs[sa.DateTime] = _SQLiteDateTime
                found.dialect.colspecs = colspecs  # this engine's dialect only
            _engines[alias] = found
        return found


# (Django's DB-API connection, the SQLAlchemy Connection over it) per thread and alias:
# opening an SQLAlchemy Connection (a pool checkout) for each enqueue cost a fifth of it.
_open = threading.local()


@contextmanager
def borrowed(alias: str) -> Iterator[sa.Connection]:
    """An SQLAlchemy Connection on Django's connection for `alias`, inside Django's
    transaction when the caller is in an atomic block (wrap writes in one: in autocommit mode
    every statement commits on its own).

    Kept open while Django keeps that DB-API connection; a new one when Django reconnects.
    """
    wrapper = connections[alias]
    wrapper.ensure_connection()
    raw = wrapper.connection
    held: dict[str, tuple[Any, sa.Connection]] = _open.__dict__.setdefault("held", {})
    found = held.get(alias)
    if found is None or found[0] is not raw or found[1].invalidated or found[1].closed:
        if found is not None:
            found[1].close()
        found = held[alias] = (raw, engine(alias).connect())
    conn = found[1]
    try:
        yield conn
    finally:
        if conn.in_transaction():
            conn.rollback()  # SQLAlchemy's bookkeeping only: the driver's is Django's


def database_url(alias: str) -> str:
    """An SQLAlchemy URL for `DATABASES[alias]`, for processes that connect on their own."""
    params = connections[alias].settings_dict
    vendor = connections[alias].vendor
    name = str(params.get("NAME") or "")
    if vendor == "sqlite":
        if not name or name == ":memory:" or name.startswith("file:") or "mode=memory" in name:
            raise ImproperlyConfigured(
                f"DATABASES[{alias!r}] is an in-memory SQLite database, which no worker "
                "process can open: use a file (NAME = BASE_DIR / 'db.sqlite3'), or run tasks "
                "in process with dbqueue.django.testing.run_tasks()"
            )
        return sa.URL.create("sqlite", database=name).render_as_string(hide_password=False)
    if vendor == "postgresql":
        query = {
            key: str(value)
            for key, value in (params.get("OPTIONS") or {}).items()
            if key not in _DJANGO_ONLY_PG_OPTIONS and isinstance(value, (str, int))
        }
        url = sa.URL.create(
            "postgresql+psycopg",
            username=params.get("USER") or None,
            password=params.get("PASSWORD") or None,
            host=params.get("HOST") or None,
            port=int(params["PORT"]) if params.get("PORT") else None,
            database=name or None,
            query=query,
        )
        return url.render_as_string(hide_password=False)
    if vendor == "mysql":  # MySQL and MariaDB, through mysqlclient as Django's backend
        options = params.get("OPTIONS") or {}
        url = sa.URL.create(
            "mysql+mysqldb",
            username=params.get("USER") or options.get("user") or None,
            password=params.get("PASSWORD") or options.get("password") or None,
            host=params.get("HOST") or None,
            port=int(params["PORT"]) if params.get("PORT") else None,
            database=name or options.get("database") or None,
            query={"charset": str(options.get("charset", "utf8mb4"))},
        )
        return url.render_as_string(hide_password=False)
    raise ImproperlyConfigured(
        f"DATABASES[{alias!r}] uses {vendor}: dbqueue's workers reach SQLite, PostgreSQL and "
        "MySQL/MariaDB from Django's settings"
    )


def derived_key(secret: str) -> str:
    """dbqueue's signing key derived from Django's SECRET_KEY (its own purpose, so a leaked
    payload key says nothing about Django's sessions), long enough for dbqueue."""
    return hmac.new(secret.encode(), b"dbqueue.django signing key", hashlib.sha256).hexdigest()


def signing_keys(options: dict[str, Any]) -> tuple[str | None, tuple[str, ...]]:
    """(key, fallbacks): OPTIONS['SECRET_KEY'], else DBQUEUE_SECRET_KEY, else derived from
    Django's SECRET_KEY and SECRET_KEY_FALLBACKS (rotating Django's key rotates this one)."""
    from django.conf import settings as django_settings

    given = options.get("SECRET_KEY") or os.environ.get("DBQUEUE_SECRET_KEY")
    if given:
        return str(given), ()
    fallbacks = tuple(derived_key(k) for k in getattr(django_settings, "SECRET_KEY_FALLBACKS", ()))
    return derived_key(django_settings.SECRET_KEY), fallbacks
