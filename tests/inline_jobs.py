"""Tasks for the inline-mode tests: each reaches the database through an engine of its own."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import orm

import dbqueue
from tests import jobs


def count_runs(url: str) -> int:
    """The rows of `runs` this task can see: what the enqueuing transaction committed."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM runs")).scalar_one())
    finally:
        engine.dispose()


def record_then_enqueue(url: str, label: str, inner_in_session: bool) -> str:
    """Write through its own engine, then enqueue another task (nested), on its own
    transaction or in a session of its own that commits."""
    jobs.record_run(url, label)
    inner = (jobs.record_run, (url, f"{label}/inner"))
    if inner_in_session:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with orm.Session(engine) as session:
            dbqueue.enqueue(*inner, session=session)
            session.execute(sa.text("INSERT INTO runs (label) VALUES (:l)"), {"l": f"{label}/s"})
            session.commit()
        engine.dispose()
    else:
        dbqueue.enqueue(*inner)
    return label


def record_bus_event(attributes: dict[str, object]) -> None:
    """A bus handler that writes through its own engine."""
    jobs.record_run(str(attributes["url"]), str(attributes["label"]))
