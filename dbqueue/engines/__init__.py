"""One module per database engine: what differs between SQLite, PostgreSQL and MySQL/MariaDB.

`store.py` holds the task state machine and asks `of(conn)` for the engine of a connection;
each module's `ENGINE` says how that database claims, inserts in batches, completes in
batches, locks, wakes workers (or not) and which of its errors are worth a retry. A reader
looking for MySQL's claim finds it in `engines/mysql.py`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dbqueue import errors

if TYPE_CHECKING:
    import sqlalchemy as sa

    from dbqueue.engines.base import Engine

#: SQLAlchemy dialect name -> the engine module (imported on first use).
MODULES = {
    "postgresql": "dbqueue.engines.postgresql",
    "sqlite": "dbqueue.engines.sqlite",
    "mysql": "dbqueue.engines.mysql",
    "mariadb": "dbqueue.engines.mysql",
}

_loaded: dict[str, Engine] = {}


def of(bind: sa.Engine | sa.Connection | sa.Dialect) -> Engine:
    """The engine of a connection, an Engine or a dialect."""
    dialect = getattr(bind, "dialect", bind)
    name: str = dialect.name  # type: ignore[union-attr]
    try:
        return _loaded[name]
    except KeyError:
        pass
    module = MODULES.get(name)
    if module is None:
        raise errors.ConfigurationError(
            f"dbqueue works with {', '.join(sorted(MODULES))}, not {name}"
        )
    engine: Engine = importlib.import_module(module).ENGINE
    _loaded[name] = engine
    return engine
