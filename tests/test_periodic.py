"""Periodic tasks: slots from cron and intervals, exactly once per slot, missed slots, the CLI."""

from __future__ import annotations

import datetime as dt
import itertools
import signal
import threading
import time

import pytest
import sqlalchemy as sa

from dbqueue import ConfigurationError, periodic
from dbqueue.periodic import enqueue_due, registry
from dbqueue.worker import Worker
from tests import jobs

UTC = dt.timezone.utc


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture(autouse=True)
def _own_registry():
    """Each test registers its own periodic tasks; the process-wide registry is restored."""
    before = dict(registry)
    registry.clear()
    yield
    registry.clear()
    registry.update(before)


def test_cron_slots_follow_the_time_zone_and_daylight_saving():
    periodic(cron="0 3 * * *", tz="Europe/Paris")(jobs.noop)
    entry = registry["tests.jobs:noop"]
    # 03:00 in Paris is 02:00 UTC in winter and 01:00 UTC in summer.
    assert entry.latest_slot(at("2026-01-15T12:00:00")) == at("2026-01-15T02:00:00")
    assert entry.latest_slot(at("2026-07-15T12:00:00")) == at("2026-07-15T01:00:00")
    assert entry.next_slot(at("2026-03-28T12:00:00")) == at("2026-03-29T01:00:00")
    assert entry.latest_slot(at("2026-01-15T02:00:00")) == at("2026-01-15T02:00:00")
    assert entry.schedule == "cron 0 3 * * * (Europe/Paris)"


def test_interval_slots_are_aligned_so_every_worker_agrees():
    periodic(every=dt.timedelta(seconds=30))(jobs.noop)
    entry = registry["tests.jobs:noop"]
    assert entry.latest_slot(at("2026-01-01T10:00:47.5")) == at("2026-01-01T10:00:30")
    assert entry.next_slot(at("2026-01-01T10:00:47.5")) == at("2026-01-01T10:01:00")
    assert entry.slots_between(at("2026-01-01T10:00:00"), at("2026-01-01T10:01:30")) == [
        at("2026-01-01T10:00:30"),
        at("2026-01-01T10:01:00"),
        at("2026-01-01T10:01:30"),
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of cron"),
        ({"cron": "0 3 * * *", "every": dt.timedelta(hours=1)}, "exactly one of cron"),
        ({"cron": "61 * * * *"}, "invalid cron expression '61 * * * *'"),
        ({"cron": "0 3 * * *", "tz": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"every": dt.timedelta(milliseconds=10)}, "at least one second"),
        ({"every": 30}, "takes a timedelta"),
    ],
)
def test_bad_schedules_are_refused_at_decoration(options, message):
    with pytest.raises(ConfigurationError, match=message.replace("*", r"\*")):
        periodic(**options)(jobs.noop)
    assert registry == {}


def test_unpicklable_arguments_are_refused_at_decoration():
    import threading

    with pytest.raises(Exception, match="argument"):
        periodic(every=dt.timedelta(hours=1), args=(threading.Lock(),))(jobs.echo)


def slot_of(unique_key: str, name: str = "tests.jobs:noop") -> dt.datetime:
    prefix = f"periodic:{name}:"
    assert unique_key.startswith(prefix), unique_key
    return dt.datetime.fromisoformat(unique_key[len(prefix) :])


def _periodic_tasks(db):
    return db.rows(
        "SELECT unique_key, status FROM tasks WHERE handler = 'tests.jobs:noop' ORDER BY id"
    )


def _due(db, now):
    with db.engine.begin() as conn:
        return enqueue_due(conn, now=at(now))


def test_each_slot_is_enqueued_once_and_never_again_once_finished(db):
    periodic(every=dt.timedelta(hours=1))(jobs.noop)
    # First seen: it starts at its next slot rather than running at deploy time.
    assert _due(db, "2026-01-01T10:30:00") == []
    assert _due(db, "2026-01-01T10:59:59") == []
    ids = _due(db, "2026-01-01T11:00:00")
    assert len(ids) == 1
    assert _due(db, "2026-01-01T11:20:00") == []
    assert [r.unique_key for r in _periodic_tasks(db)] == [
        "periodic:tests.jobs:noop:2026-01-01T11:00:00+00:00"
    ]
    # Run it, then prune it: the slot is remembered outside `tasks`.
    summary = Worker(db.settings, sleep_delay=0.1).work_off()
    assert summary.succeeded == 1
    with db.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM tasks"))
    assert _due(db, "2026-01-01T11:40:00") == []
    assert len(_due(db, "2026-01-01T12:00:00")) == 1


def test_a_worker_that_read_the_old_slot_does_not_enqueue_it_again(db):
    """Two workers tick at once; the first enqueues, runs and finishes the slot before the
    second's update: the second must see that the slot moved and enqueue nothing."""
    periodic(every=dt.timedelta(hours=1))(jobs.noop)
    _due(db, "2026-01-01T10:30:00")
    first = db.engine.connect()
    first.begin()
    assert len(enqueue_due(first, now=at("2026-01-01T11:00:00"))) == 1
    first.execute(sa.text("UPDATE tasks SET status = 'succeeded'"))
    second: list[list[int]] = []
    thread = threading.Thread(target=lambda: second.append(_due(db, "2026-01-01T11:00:00")))
    thread.start()
    if db.kind == "postgresql":  # wait until the second worker is blocked on the slot's row
        db.wait_for("SELECT count(*) > 0 FROM pg_locks WHERE NOT granted", True)
    else:  # SQLite: the second waits for the write lock before it reads anything
        time.sleep(0.3)
    first.commit()
    first.close()
    thread.join(timeout=30)
    assert second == [[]]
    assert len(_periodic_tasks(db)) == 1


def test_missed_slots_run_once_unless_catch_up(db):
    periodic(every=dt.timedelta(hours=1))(jobs.noop)
    _due(db, "2026-01-01T10:30:00")
    assert len(_due(db, "2026-01-01T15:30:00")) == 1  # 11:00 .. 15:00 missed: one run
    assert [slot_of(r.unique_key) for r in _periodic_tasks(db)] == [at("2026-01-01T15:00")]

    registry.clear()
    periodic(every=dt.timedelta(hours=1), catch_up=True)(jobs.noop)
    assert len(_due(db, "2026-01-01T18:10:00")) == 3  # 16:00, 17:00, 18:00
    assert [slot_of(r.unique_key).hour for r in _periodic_tasks(db)] == [15, 16, 17, 18]


def test_enqueued_with_the_decorator_options_and_arguments(db):
    periodic(every=dt.timedelta(minutes=5), args=(1, 2), queue="cron", priority=-3)(jobs.add)
    _due(db, "2026-01-01T10:01:00")
    (task_id,) = _due(db, "2026-01-01T10:05:00")
    row = db.rows("SELECT queue, priority FROM tasks WHERE id = :id", id=task_id)[0]
    assert (row.queue, row.priority) == ("cron", -3)
    Worker(db.settings, queues=["cron"]).work_off()
    assert db.scalar("SELECT status FROM tasks WHERE id = :id", id=task_id) == "succeeded"
    from dbqueue import Task

    assert Task.get(task_id).result == 3


def test_the_database_clock_decides_by_default(db):
    periodic(every=dt.timedelta(seconds=1))(jobs.noop)
    assert _due_now(db) == []
    deadline = time.monotonic() + 10
    while not _due_now(db):
        assert time.monotonic() < deadline, "no slot came within 10 s of the database clock"
        time.sleep(0.2)


def _due_now(db):
    with db.engine.begin() as conn:
        return enqueue_due(conn)


@pytest.mark.slow
def test_many_workers_run_each_slot_exactly_once(db):
    with db.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE runs (label VARCHAR(100), pid INTEGER)"))
    proc = db.popen(
        "work", "--concurrency", "3", "--sleep-delay", "0.1", "--import", "tests.periodic_jobs"
    )
    try:
        db.wait_for("SELECT count(*) >= 3 FROM runs", True, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    rows = db.rows(
        "SELECT unique_key, status FROM tasks WHERE handler = 'tests.periodic_jobs:every_second'"
    )
    keys = [r.unique_key for r in rows]
    assert len(keys) == len(set(keys)), f"a slot was enqueued twice: {sorted(keys)}"
    slots = sorted(slot_of(k, "tests.periodic_jobs:every_second") for k in keys)
    assert all(b - a == dt.timedelta(seconds=1) for a, b in itertools.pairwise(slots)), slots
    succeeded = sum(r.status == "succeeded" for r in rows)
    assert db.scalar("SELECT count(*) FROM runs") == succeeded >= 3


def test_cli_lists_schedule_and_next_run(db):
    result = db.cli("periodic", "list", "--import", "tests.periodic_jobs")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["task", "schedule", "last", "enqueued", "next", "run"]
    nightly = next(line for line in lines if line.startswith("tests.periodic_jobs:nightly"))
    assert "cron 0 3 * * * (Europe/Paris)" in nightly
    assert "never" in nightly
    next_run = dt.datetime.fromisoformat(nightly.split()[-1])
    assert next_run.astimezone(dt.timezone(dt.timedelta(hours=1))).hour in (2, 3)
    assert any(line.startswith("tests.periodic_jobs:every_second") for line in lines)

    empty = db.cli("periodic", "list")
    assert empty.returncode == 0
    assert "no periodic tasks registered" in empty.stdout
