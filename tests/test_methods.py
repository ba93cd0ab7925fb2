"""@handle_asynchronously on methods, run by real `dbqueue workoff` processes.

A model's method is stored as class + primary key and runs on the row the worker reloads (as
`delay(obj).method()`); another object's method pickles the object; class and static methods
work in both decorator orders. What cannot work is refused before anything is stored.
"""

from __future__ import annotations

import os
import threading
import types

import pytest
from sqlalchemy import orm

import dbqueue
from dbqueue import serializer
from tests import jobs
from tests import method_jobs as m


@pytest.fixture
def circles(db):
    m.Base.metadata.create_all(db.engine)
    with orm.Session(db.engine) as session:
        session.add_all([m.CatCircle(id=1, name="tabby"), m.CatCircle(id=2, name="calico")])
        session.commit()
    return db


def circle(db, circle_id: int) -> m.CatCircle:
    """A committed row, detached (its session closed), as an application holds one."""
    with orm.Session(db.engine, expire_on_commit=False) as session:
        found = session.get(m.CatCircle, circle_id)
        assert found is not None
        return found


def workoff(db) -> str:
    result = db.cli("workoff")
    return result.stdout + result.stderr


def hats(db) -> dict[int, int]:
    return {row.id: row.hats_flipped for row in db.rows("SELECT id, hats_flipped FROM cat_circles")}


def test_model_method_runs_in_a_worker_on_its_reloaded_row(circles):
    db = circles
    task = circle(db, 2).flip_hats(3)
    assert isinstance(task, dbqueue.Task)
    assert (task.handler, task.priority) == ("tests.method_jobs:CatCircle.flip_hats", 5)
    with db.engine.begin() as conn:  # the worker reads the row as it is when the task runs
        conn.exec_driver_sql("UPDATE cat_circles SET name = 'siamese' WHERE id = 2")
    assert hats(db) == {1: 0, 2: 0}
    output = workoff(db)
    assert task.refresh().success, output[-3000:]
    assert task.result == "siamese flipped 3"
    assert hats(db) == {1: 0, 2: 3}  # the method's change to self was committed
    assert db.scalar("SELECT count(*) FROM tasks") == 1  # the worker ran it, did not enqueue it


def test_now_enqueue_and_map_on_a_bound_model_method(circles):
    db = circles
    tabby = circle(db, 1)
    assert tabby.rename.now("here") == "here" and tabby.name == "here"  # this object, no queue
    renamed = tabby.rename.enqueue(("tom",), queue="names", priority=-1)
    ids = tabby.flip_hats.map([(1,), (2,)])
    with orm.Session(db.engine) as session:  # in the caller's transaction, rolled back
        tabby.flip_hats.enqueue((100,), session=session)
        session.rollback()
    assert (renamed.queue, renamed.priority) == ("names", -1)
    assert [dbqueue.Task.get(i).priority for i in ids] == [5, 5]  # the decorator's option
    output = workoff(db)
    assert renamed.refresh().result == "tom", output[-3000:]
    assert [dbqueue.Task.get(i).success for i in ids] == [True, True]
    assert hats(db) == {1: 3, 2: 0}
    assert db.scalar("SELECT name FROM cat_circles WHERE id = 1") == "tom"


def test_deleted_row_fails_like_delay_and_is_not_retried(circles):
    db = circles
    tabby = circle(db, 1)
    decorated = tabby.flip_hats()
    delayed = dbqueue.delay(tabby).wash()
    with db.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM cat_circles WHERE id = 1")
    workoff(db)
    for task in (decorated.refresh(), delayed.refresh()):
        assert task.status is dbqueue.Status.FAILED and task.attempts == 1
        assert "CatCircle id=1 no longer exists" in task.error


def test_delay_of_a_decorated_method_runs_it_once_with_the_decorators_options(circles):
    db = circles
    task = dbqueue.delay(circle(db, 2)).flip_hats(2)
    assert task.priority == 5
    workoff(db)
    assert task.refresh().result == "calico flipped 2"
    assert db.scalar("SELECT count(*) FROM tasks") == 1


def test_unsaved_model_is_refused_at_enqueue(circles):
    db = circles
    with pytest.raises(dbqueue.EnqueueError, match="CatCircle instance has no primary key yet"):
        m.CatCircle(name="new").flip_hats()
    assert db.scalar("SELECT count(*) FROM tasks") == 0


def test_method_of_a_plain_object_pickles_the_object(db):
    hatter = m.Hatter("Mad")
    task = hatter.make_hat(7)
    hatter.name = "Changed"  # the pickle was taken at enqueue
    assert hatter.make_hat.now(3) == f"Changed made a size 3 hat in {os.getpid()}"
    ids = hatter.make_hat.map([1, 2])
    assert (task.handler, task.queue) == ("tests.method_jobs:Hatter.make_hat", "hats")
    output = workoff(db)
    assert task.refresh().success, output[-3000:]
    name, pid = task.result.split(" in ")
    assert name == "Mad made a size 7 hat" and int(pid) != os.getpid()
    assert [dbqueue.Task.get(i).result.split(" in ")[0] for i in ids] == [
        "Changed made a size 1 hat",
        "Changed made a size 2 hat",
    ]


def test_object_that_cannot_be_pickled_is_refused_at_enqueue(db):
    hatter = m.Hatter("Mad")
    hatter.lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(
        dbqueue.EnqueueError,
        match=r"the object bound to tests\.method_jobs:Hatter\.make_hat cannot be pickled",
    ):
        hatter.make_hat(1)
    assert db.scalar("SELECT count(*) FROM tasks") == 0


def test_class_and_static_methods_in_both_decorator_orders(db):
    tasks = {
        "Herd:a": m.Herd.census("a"),
        "BigHerd:b": m.BigHerd.census("b"),
        "Herd:c": m.Herd.roll_call("c"),
        "BigHerd:d": m.BigHerd.roll_call("d"),
        "BigHerd:e": m.BigHerd().census("e"),
        "purrpurr": m.Herd.purr(2),
        "meowmeow": m.Herd.meow(2),
        "meow": m.BigHerd().meow(1),
        "BigHerd:f": m.BigHerd.roll_call.enqueue(("f",), priority=9),
    }
    ids = m.BigHerd.census.map(["g", "h"]) + m.Herd.purr.map([3])
    assert m.BigHerd.census.now("x") == "BigHerd:x"
    assert m.BigHerd.roll_call.now("y") == "BigHerd:y"
    assert m.Herd.purr.now(1) == "purr" and m.BigHerd.meow.now(1) == "meow"
    assert {tasks["Herd:a"].queue, tasks["BigHerd:d"].queue} == {"census"}
    assert (tasks["meowmeow"].priority, tasks["BigHerd:f"].priority) == (2, 9)
    output = workoff(db)
    for expected, task in tasks.items():
        assert task.refresh().result == expected, (expected, task.error, output[-3000:])
    assert [dbqueue.Task.get(i).result for i in ids] == ["BigHerd:g", "BigHerd:h", "purr" * 3]


def test_classmethod_above_the_decorator_when_classmethod_does_not_chain(db):
    """Python 3.13 stopped calling the wrapped object's __get__ from a classmethod: there
    `BigHerd.roll_call` is a plain bound method of the decorated function, made here by hand."""
    decorated = m.Herd.__dict__["roll_call"].__func__
    bound = types.MethodType(decorated, m.BigHerd)
    task = bound("p")
    assert serializer.undecorated(bound)("q") == "BigHerd:q"  # what a worker there would call
    assert bound.now("r") == "Herd:r"  # no class reaches .now: the defining class's
    again = bound.enqueue(("s",))
    assert task.handler == "tests.method_jobs:BigHerd.roll_call"
    workoff(db)
    assert (task.refresh().result, again.refresh().result) == ("BigHerd:p", "Herd:s")


def test_what_cannot_be_a_task_is_refused_at_decoration(db):
    with pytest.raises(dbqueue.EnqueueError, match="decorates a function or a method, not"):
        dbqueue.handle_asynchronously(property(lambda self: 1))
    with pytest.raises(dbqueue.EnqueueError, match="already decorated"):
        dbqueue.handle_asynchronously(priority=1)(jobs.decorated_add)

    with pytest.raises(dbqueue.EnqueueError, match=r"<locals>.Local.job is a local function"):

        class Local:
            @dbqueue.handle_asynchronously
            def job(self) -> None: ...


def test_assert_enqueued_finds_a_decorated_method(circles, assert_enqueued):
    tabby = circle(circles, 1)
    tabby.flip_hats(4)
    (found,) = assert_enqueued(tabby.flip_hats, args=(4,))
    assert found.handler == "tests.method_jobs:CatCircle.flip_hats"
