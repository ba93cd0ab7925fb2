"""Task metadata: a small JSON dict in its own column, set at enqueue or by on_enqueue hooks,
read by Task.get, by hooks in the worker, and shown by the dashboard; both databases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import dbqueue
from dbqueue import hooks, worker
from tests import jobs


@pytest.fixture(autouse=True)
def _no_hooks_left() -> Iterator[None]:
    hooks.clear()
    yield
    hooks.clear()


def test_meta_is_stored_and_read_back_and_seen_by_hooks_in_the_worker(db):
    seen: list[dict] = []
    hooks.before_task(lambda task: seen.append(task.meta))
    task = dbqueue.enqueue(jobs.add, args=(1, 2), meta={"tenant": "acme", "ids": [1, 2]})
    plain = dbqueue.enqueue(jobs.add, args=(1, 2))
    assert dbqueue.Task.get(task.id).meta == {"tenant": "acme", "ids": [1, 2]}
    assert dbqueue.Task.get(plain.id).meta is None
    assert db.scalar("SELECT count(*) FROM tasks WHERE meta IS NULL") == 1  # SQL NULL, not 'null'
    worker.Worker(db.settings).work_off()
    assert sorted(seen, key=len) == [{}, {"tenant": "acme", "ids": [1, 2]}]


def test_enqueue_many_and_the_caller_session_carry_meta(db):
    from sqlalchemy import orm

    ids = dbqueue.enqueue_many(jobs.add, [(1, 1), (2, 2), (3, 3)], meta={"batch": "b1"})
    with orm.Session(db.engine) as session, session.begin():
        inside = dbqueue.enqueue(jobs.noop, meta={"request": "r1"}, session=session)
    assert [dbqueue.Task.get(i).meta for i in ids] == [{"batch": "b1"}] * 3
    assert dbqueue.Task.get(inside.id).meta == {"request": "r1"}


def test_on_enqueue_hooks_add_to_meta_and_a_raising_one_loses_nothing(db, caplog):
    @hooks.on_enqueue
    def stamp(task):
        assert task.id is None and task.handler == "tests.jobs:add"
        task.meta["tenant"] = "acme"

    @hooks.on_enqueue
    def broken(task):
        raise RuntimeError("tracing backend down")

    one = dbqueue.enqueue(jobs.add, args=(1, 2), meta={"request": "r9"})
    many = dbqueue.enqueue_many(jobs.add, [(1, 1), (2, 2)])
    assert one.refresh().meta == {"request": "r9", "tenant": "acme"}
    assert [dbqueue.Task.get(i).meta for i in many] == [{"tenant": "acme"}] * 2
    assert any(
        "on_enqueue hook" in r.getMessage() and "broken" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        (["not", "a", "dict"], "must be a dict with string keys"),
        ({1: "int key"}, "must be a dict with string keys"),
        ({"when": object()}, "must be JSON"),
        ({"nan": float("nan")}, "must be JSON"),
        ({"big": "x" * 5000}, "limit is 4096"),
    ],
)
def test_bad_meta_is_refused_at_enqueue_and_stores_nothing(db, meta, message):
    with pytest.raises(dbqueue.EnqueueError, match=message):
        dbqueue.enqueue(jobs.add, args=(1, 2), meta=meta)
    assert db.scalar("SELECT count(*) FROM tasks") == 0


def test_a_hook_adding_non_json_meta_fails_the_enqueue_clearly(db):
    hooks.on_enqueue(lambda task: task.meta.update(span=object()))
    with pytest.raises(dbqueue.EnqueueError, match="must be JSON"):
        dbqueue.enqueue(jobs.add, args=(1, 2))
    assert db.scalar("SELECT count(*) FROM tasks") == 0
