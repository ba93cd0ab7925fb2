"""Event-bus test helpers: assert_published / refute_published (the pytest plugin), and
`@bus.subscribe(..., sync=True)`, a handler run in the publisher's transaction."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import orm

import dbqueue
from dbqueue import bus

BINDS: list[Any] = []
SEEN: list[dict[str, Any]] = []


def write_row(attributes: dict[str, Any], session: Any) -> None:
    """A sync handler: its write commits or rolls back with the publisher's."""
    BINDS.append(session)
    session.execute(sa.text("INSERT INTO runs (label) VALUES (:l)"), {"l": attributes["label"]})


def remember(attributes: dict[str, Any]) -> None:
    SEEN.append(attributes)


def refuse(attributes: dict[str, Any]) -> None:
    raise ValueError(f"refused {attributes['label']}")


def later(attributes: dict[str, Any]) -> str:
    return f"later {attributes['label']}"


@pytest.fixture
def app(db, monkeypatch):
    monkeypatch.delenv("DBQUEUE_BUS_INLINE", raising=False)
    monkeypatch.setattr(bus, "_state", bus._State(app_key="app_h"))
    BINDS.clear()
    SEEN.clear()
    with db.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE runs (label VARCHAR(100))"))
    return db


def committed(db, sql: str) -> list[Any]:
    """Rows as another process sees them (a plain engine: dbqueue's would BEGIN IMMEDIATE and
    wait for an open transaction on SQLite)."""
    engine = sa.create_engine(db.url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql))]
    finally:
        engine.dispose()


def labels(db) -> list[str]:
    return [row[0] for row in committed(db, "SELECT label FROM runs ORDER BY label")]


def test_sync_handler_runs_in_the_publishers_transaction(app):
    db = app
    bus.subscribe("user_created", sync=True)(write_row)
    bus.subscribe("user_created")(later)
    bus.sync()  # the sync subscription is not stored: no other process delivers it
    assert [r.handler for r in db.rows("SELECT handler FROM bus_subscriptions")] == [
        "tests.test_bus_helpers:later"
    ]
    with orm.Session(db.engine) as session:
        bus.publish("user_created", {"label": "rolled back"}, session=session)
        assert BINDS[-1] is session
        session.rollback()
    with orm.Session(db.engine) as session:
        (delivery,) = bus.publish("user_created", {"label": "session"}, session=session)
        session.commit()
    with db.engine.connect() as conn:
        bus.publish("user_created", {"label": "connection"}, connection=conn)
        assert BINDS[-1] is conn
        conn.commit()
    bus.publish("user_created", {"label": "own"})  # dbqueue's transaction: its Connection
    assert isinstance(BINDS[-1], sa.Connection)
    assert labels(db) == ["connection", "own", "session"]
    task = dbqueue.Task.get(delivery)  # the other subscriber got a task, as always
    assert (task.status, task.queue) == (dbqueue.Status.QUEUED, "app_h_default")
    assert db.scalar("SELECT count(*) FROM tasks") == 3


def test_sync_handler_gets_the_message_and_its_exception_stops_the_publish(app):
    db = app
    bus.subscribe("user_created", sync=True)(remember)
    bus.subscribe("user_deleted", sync=True)(refuse)
    bus.subscribe("user_deleted")(later)
    bus.sync()
    assert bus.publish("user_created", {"label": "a", "tags": ("x",)}) == []
    (message,) = SEEN
    assert (message["label"], message["tags"], message["bus_event_type"]) == (
        "a",
        ["x"],
        "user_created",
    )
    assert message["bus_app_key"] == "app_h" and message["bus_published_at"]
    with pytest.raises(ValueError, match="refused b"):
        bus.publish("user_deleted", {"label": "b"})
    assert db.scalar("SELECT count(*) FROM tasks") == 0  # nothing of the failed publish stayed
    with pytest.raises(
        dbqueue.ConfigurationError, match=r"twice, on queues 'default' \(sync=True\)"
    ):
        bus.subscribe("user_created")(remember)


def test_sync_handler_under_inline_mode_with_other_subscribers(app):
    db = app
    bus.subscribe("user_created", sync=True)(write_row)
    bus.subscribe("user_created")(later)
    with bus.inline(), orm.Session(db.engine) as session:
        (delivery,) = bus.publish("user_created", {"label": "inline"}, session=session)
        assert committed(db, "SELECT status FROM tasks") == []  # nothing before the commit
        session.commit()
    assert dbqueue.Task.get(delivery).result == "later inline"
    assert labels(db) == ["inline"]


def test_assert_and_refute_published(app, assert_published, refute_published):
    db = app
    bus.publish("user_created", {"id": 42, "tags": ("a",)})  # nobody subscribes
    with orm.Session(db.engine) as session:
        bus.publish("user_deleted", {"id": 42}, session=session)
        session.rollback()  # never published
    bus.subscribe("user_paid")(later)
    with orm.Session(db.engine) as session:
        bus.publish("user_paid", {"id": 42, "cents": 990}, session=session)
        refute_published("user_paid")  # not before the commit
        session.commit()
    (event,) = assert_published("user_created", id=42, tags=("a",))
    assert event.attributes == {"id": 42, "tags": ["a"]}
    assert_published("user_paid", cents=990)
    refute_published("user_deleted")
    refute_published("user_created", id=43)
    with pytest.raises(
        AssertionError,
        match=r"expected event 'user_created' with id=43 to be published, found none\. "
        r"Events published in this test: user_created \{'id': 42, 'tags': \['a'\]\}; user_paid",
    ):
        assert_published("user_created", id=43)
    with pytest.raises(
        AssertionError, match=r"expected no event 'user_created' with id=42, found 1"
    ):
        refute_published("user_created", id=42)
