"""Concurrency limits (issue 18, point 4): a key's max_concurrency and a queue's cap, enforced
by the claim on both databases; in-process claims, two claimers of the last slot, and real
`dbqueue work -c 4` processes whose tasks record when they start and end."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import dbqueue
from dbqueue import limits, store, worker
from dbqueue.web import metrics
from tests import jobs, limit_jobs


def claim(db: Any, limit: int = 100, queues: list[str] | None = None, **kw: Any) -> list[Any]:
    with db.engine.begin() as conn:
        return store.claim(conn, "tester", limit, queues, **kw)


def keyed(key: str | None, limit: int | None, priority: int = 0, queue: str = "default") -> int:
    return dbqueue.enqueue(
        jobs.add,
        args=(1, 2),
        concurrency_key=key,
        max_concurrency=limit,
        priority=priority,
        queue=queue,
    ).id


def finish(db: Any, ids: list[int]) -> None:
    with db.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE tasks SET status = 'succeeded', locked_by = NULL WHERE id = :id"),
            [{"id": i} for i in ids],
        )


# -- options ----------------------------------------------------------------------------------


def test_bad_limits_are_refused_at_decoration_and_at_enqueue(db):
    bad = [
        ({"concurrency_key": "k"}, "needs max_concurrency"),
        ({"max_concurrency": 2}, "give concurrency_key too"),
        ({"concurrency_key": "k", "max_concurrency": 0}, "at least 1"),
        ({"concurrency_key": "k", "max_concurrency": True}, "positive int"),
        ({"concurrency_key": "k", "max_concurrency": 1.5}, "positive int"),
        ({"concurrency_key": "", "max_concurrency": 1}, "non-empty string"),
        ({"concurrency_key": 12, "max_concurrency": 1}, "non-empty string"),
    ]
    for options, message in bad:
        with pytest.raises(dbqueue.EnqueueError, match=message):
            dbqueue.handle_asynchronously(**options)(jobs.add)
        with pytest.raises(dbqueue.EnqueueError, match=message):
            dbqueue.enqueue(jobs.add, args=(1, 2), **options)

    def explodes(a: int, b: int) -> str:
        raise KeyError("no tenant")

    with pytest.raises(dbqueue.EnqueueError, match=r"raised KeyError.*nothing was stored"):
        dbqueue.enqueue(jobs.add, args=(1, 2), concurrency_key=explodes, max_concurrency=1)
    with pytest.raises(dbqueue.EnqueueError, match="returned 3"):
        dbqueue.enqueue(
            jobs.add, args=(1, 2), concurrency_key=lambda a, b: a + b, max_concurrency=1
        )
    assert db.scalar("SELECT count(*) FROM tasks") == 0


def test_a_callable_key_is_evaluated_at_enqueue_and_stored(db, tmp_path):
    path = str(tmp_path / "log")
    one = limit_jobs.sync_account(7, path, "a")
    many = limit_jobs.sync_account.map([(8, path, "b"), (9, path, "c")])
    given = dbqueue.enqueue(jobs.add, args=(1, 2), concurrency_key="fixed", max_concurrency=3)
    rows = db.rows("SELECT id, concurrency_key, max_concurrency FROM tasks ORDER BY id")
    assert [(r[1], r[2]) for r in rows] == [
        ("account:7", 1),
        ("account:8", 1),
        ("account:9", 1),
        ("fixed", 3),
    ]
    assert [r[0] for r in rows] == [one.id, *many, given.id]
    assert db.scalar("SELECT concurrency_key FROM tasks WHERE id = :i", i=keyed(None, None)) is None


# -- the claim --------------------------------------------------------------------------------


@pytest.mark.parametrize("queues", [None, ["default", "capped"], ["capped"]])
def test_the_limited_claim_takes_only_what_fits(db, queues):
    dbqueue.configure_queue("capped", max_concurrency=1)
    a = [keyed("A", 1) for _ in range(3)]
    b = [keyed("B", 2) for _ in range(3)]
    free = [keyed(None, None) for _ in range(2)]
    capped = [keyed(None, None, queue="capped") for _ in range(2)]
    mine = (lambda ids: ids) if queues != ["capped"] else (lambda ids: [])
    first = {r.id for r in claim(db, queues=queues, limited=True)}
    # one per key and per capped queue in a claim (a batch runs one task after another)
    assert first == {*mine([a[0], b[0], *free]), capped[0]}
    second = {r.id for r in claim(db, queues=queues, limited=True)}
    assert second == set(mine([b[1]]))  # B has a second slot; A and `capped` are full
    assert claim(db, queues=queues, limited=True) == []
    # the unlimited claim never takes a task with a key (only the free ones left, if any)
    assert {r.id for r in claim(db, queues=["default"])} == set(free) - first
    finish(db, [a[0], capped[0]])  # slots come back when their rows stop running
    assert {r.id for r in claim(db, queues=queues, limited=True)} == {*mine([a[1]]), capped[1]}


def test_a_saturated_key_does_not_hold_up_the_rows_behind_it(db):
    first = keyed("busy", 1, priority=-5)
    [keyed("busy", 1, priority=-5) for _ in range(200)]  # ahead of the rest in claim order
    later = [keyed("calm", 1, priority=0), keyed(None, None, priority=1)]
    assert [r.id for r in claim(db, limit=1, limited=True)] == [first]
    assert {r.id for r in claim(db, limit=5, limited=True)} == set(later)
    assert {r.id for r in claim(db, limit=5)} == set()  # nothing without a key left


def test_two_claimers_of_the_last_slot_take_it_once(db):
    """The second claimer waits for the first one's commit, then sees its slot taken.

    PostgreSQL: without the advisory lock the second claim would not wait, its snapshot would
    not see the first claim's row running, SKIP LOCKED would pass over that row and take the
    key's next task: two running at once. SQLite: BEGIN IMMEDIATE makes it wait."""
    k1 = keyed("last-slot", 1, priority=0)
    keyed("last-slot", 1, priority=0)
    free = keyed(None, None, priority=5)
    second: list[Any] = []
    with db.engine.begin() as first_conn:
        taken = store.claim(first_conn, "first", 1, limited=True)
        assert [r.id for r in taken] == [k1]

        def other() -> None:
            with db.settings.get_engine().begin() as conn:
                second.extend(store.claim(conn, "second", 10, limited=True))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "the second claim did not wait for the first one's commit"
    thread.join(30)
    assert [r.id for r in second] == [free]
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'running'") == 2


def test_a_worker_notices_a_task_with_a_key_before_its_heart_does(db):
    """The heart reads "tasks with a key waiting?" every second; a worker whose unlimited
    claim leaves a ready task looks at once (idle_wait) and makes the limited claim next."""
    w = worker.Worker(db.settings, sleep_delay=0.5)  # not started: no heart, flag unread
    try:
        task = dbqueue.enqueue(jobs.add, args=(1, 2), concurrency_key="k", max_concurrency=1)
        assert w.run_batch() == 0  # the unlimited claim leaves it
        assert w.idle_wait() == 0.005 and w.limited_waiting
        assert w.run_batch() == 1
        assert task.refresh().status is dbqueue.Status.SUCCEEDED
        blocked = dbqueue.enqueue(jobs.add, args=(1, 2), concurrency_key="k", max_concurrency=1)
        with db.engine.begin() as conn:  # another worker runs a task of "k"
            conn.execute(
                sa.text("UPDATE tasks SET status = 'running', locked_by = 'other' WHERE id = :i"),
                {"i": task.id},
            )
        assert w.run_batch() == 0
        assert w.idle_wait() == 0.5  # blocked on a limit: no busy polling
        assert blocked.refresh().status is dbqueue.Status.QUEUED
    finally:
        w._close_conn()  # its kept PostgreSQL connection


@pytest.mark.skip_locked  # SQLite's claims are always BEGIN IMMEDIATE transactions
def test_limited_claim_refuses_autocommit(db):
    with db.engine.connect() as conn:
        auto = conn.execution_options(isolation_level="AUTOCOMMIT")
        with pytest.raises(ValueError, match="needs a transaction"):
            store.claim(auto, "w", 1, limited=True)


def test_metrics_gauge_counts_tasks_waiting_on_a_limit(db):
    dbqueue.configure_queue("capped", max_concurrency=1)
    keyed("A", 1)
    [keyed("A", 1) for _ in range(2)]
    keyed(None, None, queue="capped")
    keyed(None, None, queue="capped")
    keyed(None, None)
    with db.engine.connect() as conn:
        assert limits.waiting_on_limits(conn) == {}
    claim(db, limited=True)  # A's first, capped's first, the free one
    with db.engine.connect() as conn:
        assert limits.waiting_on_limits(conn) == {"default": 2, "capped": 1}
    text = _scrape(db)
    assert 'dbqueue_tasks_waiting_on_limit{queue="default"} 2.0' in text
    assert 'dbqueue_tasks_waiting_on_limit{queue="capped"} 1.0' in text


def _scrape(db: Any) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.make_registry(db.engine)).decode()


# -- real workers -----------------------------------------------------------------------------


def intervals(path: Path, killed: dict[str, float] | None = None) -> dict[str, list[tuple]]:
    """group -> [(start, end, label)] from the log; a run that never ended (its worker was
    killed) ends at the kill time `killed[label]`."""
    starts: dict[tuple[str, str, str], float] = {}
    out: dict[str, list[tuple]] = collections.defaultdict(list)
    for line in path.read_text().splitlines():
        event, label, group, stamp, pid = line.split()
        if event == "start":
            starts[label, group, pid] = float(stamp)
        else:
            out[group].append((starts.pop((label, group, pid)), float(stamp), label))
    for (label, group, _), started in starts.items():
        out[group].append((started, (killed or {})[label], label))
    return out


def most_at_once(spans: list[tuple]) -> int:
    events = sorted([(s, 1) for s, _, _ in spans] + [(e, -1) for _, e, _ in spans])
    running = peak = 0
    for _, change in events:  # an end sorts before a start at the same instant
        running += change
        peak = max(peak, running)
    return peak


def start_workers(db: Any, *extra: str) -> Any:
    return db.popen(
        "work", "-c", "4", "--import", "tests.limit_jobs", "--sleep-delay", "0.2", *extra
    )


def stop(proc: Any) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return err


@pytest.mark.slow
def test_four_workers_never_run_more_than_a_limit_and_free_tasks_keep_flowing(db, tmp_path):
    log = tmp_path / "runs.log"
    path = str(log)
    assert db.cli("queue-limit", "capped", "2").returncode == 0
    ids = []

    def hold(label: str, group: str, seconds: float, **options: Any) -> None:
        ids.append(
            dbqueue.enqueue(limit_jobs.hold, args=(path, label, group, seconds), **options).id
        )

    # a saturated key whose tasks come first in claim order, the first one long
    hold("s0", "slow", 6.0, concurrency_key="slow", max_concurrency=1, priority=-10)
    for i in range(1, 4):
        hold(f"s{i}", "slow", 0.1, concurrency_key="slow", max_concurrency=1, priority=-10)
    for k in range(6):  # many keys, limits 1 and 2
        for i in range(4):
            limit = 1 + k % 2
            hold(f"k{k}-{i}", f"key{k}", 0.2, concurrency_key=f"key{k}", max_concurrency=limit)
    for i in range(6):
        hold(f"c{i}", "capped", 0.2, queue="capped")
    for i in range(10):
        hold(f"f{i}", "free", 0.2, priority=-1)  # behind the saturated key only
    proc = start_workers(db)
    try:
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'succeeded'", len(ids), timeout=90)
    finally:
        err = stop(proc)
    assert "Traceback" not in err, err
    spans = intervals(log)
    for k in range(6):
        assert most_at_once(spans[f"key{k}"]) <= 1 + k % 2, spans[f"key{k}"]
    assert most_at_once(spans["slow"]) == 1
    assert most_at_once(spans["capped"]) <= 2
    assert most_at_once(spans["free"]) >= 3  # the workers do run in parallel
    (_, slow_end, _) = next(s for s in spans["slow"] if s[2] == "s0")
    free_ends = [end for _, end, _ in spans["free"]]
    assert max(free_ends) < slow_end, "tasks without a limit waited for a saturated key"
    others = [s for s in spans["slow"] if s[2] != "s0"]
    assert all(start >= slow_end for start, _, _ in others)


@pytest.mark.slow
def test_a_killed_workers_slot_comes_back_with_its_rescue(db, tmp_path):
    log = tmp_path / "runs.log"
    marker = tmp_path / "killed"
    first = dbqueue.enqueue(
        limit_jobs.hold_until_marker,
        args=(str(log), "first", "k", str(marker)),
        concurrency_key="k",
        max_concurrency=1,
    )
    second = dbqueue.enqueue(
        limit_jobs.hold,
        args=(str(log), "second", "k", 0.1),
        concurrency_key="k",
        max_concurrency=1,
    )
    proc = start_workers(db)
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and log.read_text()):
            assert time.monotonic() < deadline, "the first task never started"
            time.sleep(0.05)
        time.sleep(0.5)  # the other three workers had time to claim `second`, and must not
        assert second.refresh().status is dbqueue.Status.QUEUED
        pid = int(log.read_text().split()[4])
        os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        marker.touch()
        first.wait(timeout=30)
        second.wait(timeout=30)
    finally:
        err = stop(proc)
    assert first.refresh().status is dbqueue.Status.SUCCEEDED and first.attempts == 2
    assert second.refresh().status is dbqueue.Status.SUCCEEDED
    assert "rescued" in err
    spans = intervals(log, killed={"first": killed_at})
    assert len(spans["k"]) == 3 and most_at_once(spans["k"]) == 1
