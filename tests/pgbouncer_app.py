"""The application of tests/test_pgbouncer.py: every part of dbqueue that talks to the database,
used through PgBouncer.

Workers import it (`--import tests.pgbouncer_app`: the counters of tests/counter_models, a
periodic task, a bus subscriber); its `main()`, run in a process of its own, is the enqueuer
(tasks one by one, in batches and in the caller's session, bus events, counted comments) and
prints what it did as JSON. Every task and handler writes a row in `runs` through dbqueue's own
engine, so their statements cross the pooler too. Kept out of tests/jobs.py: @periodic
registers at import (and refuses a function of `__main__`, hence no `python -m` entry point).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

import dbqueue
from dbqueue import bus, config, periodic
from tests import counter_models

TASKS = 12  # per way of enqueueing (3 ways)
EVENTS = 8
COMMENTS = 15


def record(label: str) -> None:
    """One row in `runs`, on the worker's engine (through the pooler)."""
    with config.current().get_engine().begin() as conn:
        conn.execute(
            sa.text("INSERT INTO runs (label, pid) VALUES (:label, :pid)"),
            {"label": label, "pid": os.getpid()},
        )


def task(label: str) -> None:
    record(label)


def nap_until(path: str) -> None:
    """Says it started (committed), then runs until `path` exists, holding no transaction."""
    record("nap")
    while not os.path.exists(path):
        time.sleep(0.05)


@periodic(every=dt.timedelta(seconds=1))
def tick() -> None:
    record("tick")


@bus.subscribe("order_paid")
def on_order_paid(attributes: dict[str, Any]) -> None:
    record(f"order_paid:{attributes['id']}")


def main() -> None:
    engine = config.current().get_engine()
    for n in range(TASKS):  # the lone enqueue: its own autocommit statement on the driver
        dbqueue.enqueue(task, args=(f"one:{n}",))
    dbqueue.enqueue_many(task, [(f"many:{n}",) for n in range(TASKS)])
    with orm.Session(engine) as session, session.begin():
        for n in range(TASKS):
            dbqueue.enqueue(task, args=(f"session:{n}",), session=session)
    published = [len(bus.publish("order_paid", {"id": n})) for n in range(EVENTS)]
    with orm.Session(engine) as session, session.begin():
        post = counter_models.Post(title="through the pooler")
        session.add(post)
        session.flush()
        post_id = post.id
    for n in range(COMMENTS):  # one transaction each: a delta and one queued flush
        with orm.Session(engine) as session, session.begin():
            session.add(counter_models.Comment(post_id=post_id, body=str(n)))
    engine.dispose()
    print(json.dumps({"post_id": post_id, "published": published}))
