"""Bus test application A: the publisher. Shares the database with B and C, not their code.

Run as `python -m tests.bus_app_a` with DBQUEUE_APP_KEY=app_a: publishes the test events and
prints the task ids of each publish as one JSON object.
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from sqlalchemy import orm

import dbqueue
from dbqueue import bus


def main() -> None:
    engine = dbqueue.config.current().get_engine()
    ids: dict[str, list[int]] = {}
    ids["user_created"] = bus.publish("user_created", {"id": 42, "first_name": "John"})
    with orm.Session(engine) as session, session.begin():
        ids["user_paid"] = bus.publish("user_paid", {"id": 42, "cents": 990}, session=session)
    with engine.connect() as conn:
        tx = conn.begin()
        ids["user_deleted"] = bus.publish("user_deleted", {"id": 42}, connection=conn)
        tx.rollback()
    ids["user_archived"] = bus.publish("user_archived", {"id": 42, "tags": ("a", "b")})
    ids["nobody_cares"] = bus.publish("nobody_cares", {"id": 42})
    with engine.connect() as conn:
        ids["_tasks_after"] = [conn.execute(sa.text("SELECT count(*) FROM tasks")).scalar_one()]
    engine.dispose()
    print(json.dumps(ids))


if __name__ == "__main__":
    main()
