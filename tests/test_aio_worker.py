"""`async def` tasks on each worker process's event loop: many at once, with the same
timeouts, cancellation, shutdown, hooks and retries as sync tasks.

Overlap is shown by the intervals the runs record (their results, in the database), never by
wall time.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import sqlalchemy as sa

import dbqueue
from dbqueue import Status, Task, hooks
from dbqueue.worker import Worker
from tests import aio_jobs
from tests.test_aio import async_url


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals that contain one same instant."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = best = 0
    for _, step in edges:
        now += step
        best = max(best, now)
    return best


def results(ids: list[int]) -> list[Task]:
    tasks = [Task(i) for i in ids]
    for task in tasks:
        assert task.status is Status.SUCCEEDED, (task.id, task.status, task.error)
    return tasks


def test_many_async_tasks_overlap_up_to_the_limit_per_process(db):
    ids = dbqueue.enqueue_many(aio_jobs.nap, [(0.2,)] * 200)
    done = db.cli(
        "workoff", "--import", "tests.aio_jobs", "-c", "2", "--async-concurrency", "25",
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "200 succeeded" in done.stdout
    runs = [task.result for task in results(ids)]
    # one after the other, at most 2 (the processes) would overlap
    assert most_at_once([(start, end) for start, end, _ in runs]) >= 20
    for pid in {pid for _, _, pid in runs}:
        mine = [(start, end) for start, end, p in runs if p == pid]
        assert most_at_once(mine) <= 25  # the limit holds in each process


def test_a_sync_task_runs_while_coroutines_run(db):
    first = dbqueue.enqueue_many(aio_jobs.nap, [(0.5,)] * 3)
    sync = dbqueue.enqueue(aio_jobs.blocking_nap, (1.0,))
    later = dbqueue.enqueue_many(aio_jobs.nap, [(0.5,)] * 3)
    done = db.cli("workoff", "--import", "tests.aio_jobs")
    assert done.returncode == 0, done.stdout + done.stderr
    start, end, pid = results([sync.id])[0].result
    naps = [t.result for t in results(first + later)]
    assert {p for _, _, p in naps} == {pid}
    assert any(s < end and e > start for s, e, _ in naps)  # the loop ran beside the sync task


def test_an_async_task_times_out_and_the_others_go_on(db):
    slow = dbqueue.enqueue(aio_jobs.nap, (60,), timeout=0.5, max_attempts=1)
    quick = dbqueue.enqueue_many(aio_jobs.nap, [(0.2,)] * 5)
    done = db.cli("workoff", "--import", "tests.aio_jobs", "--async-concurrency", "10")
    assert done.returncode == 1, done.stdout + done.stderr  # one task failed
    slow.refresh()
    assert slow.status is Status.FAILED
    assert "TaskTimeout: timed out after 0.5s" in slow.error
    assert "the process was stopped" not in slow.error  # asyncio stopped it, not the watchdog
    results(quick)


def test_a_coroutine_blocking_the_loop_past_its_timeout_ends_the_process(db):
    stuck = dbqueue.enqueue(aio_jobs.blocking_coroutine, (30,), timeout=0.5, max_attempts=1)
    done = db.cli("workoff", "--import", "tests.aio_jobs", timeout=60)
    stuck.refresh()
    assert stuck.status is Status.FAILED, stuck.error
    assert "timed out after 0.5s (the process was stopped)" in stuck.error
    assert "hard_timeout" in done.stderr or "did not stop" in done.stderr
    assert done.returncode == 1, done.stdout + done.stderr  # counted as failed, not lost
    assert "0 succeeded, 0 retried, 1 failed" in done.stdout, done.stdout


def test_the_watchdog_names_the_coroutine_that_blocks_the_loop(db):
    """A well-behaved coroutine past its timeout cannot be cancelled while another blocks the
    loop: the process is stopped, and the error and the log name the blocking task."""
    waiting = dbqueue.enqueue(aio_jobs.nap, (60,), timeout=0.5, max_attempts=1)
    blocker = dbqueue.enqueue(aio_jobs.blocking_coroutine, (30,), max_attempts=1)
    done = db.cli("workoff", "--import", "tests.aio_jobs", timeout=90)
    waiting.refresh()
    assert waiting.status is Status.FAILED, waiting.error
    named = f"the event loop is blocked by task {blocker.id} tests.aio_jobs:blocking_coroutine"
    assert named in waiting.error, waiting.error
    assert named in done.stderr, done.stderr


def test_cancelling_a_running_coroutine_leaves_the_others_running(db):
    doomed = dbqueue.enqueue(aio_jobs.nap, (60,))
    other = dbqueue.enqueue(aio_jobs.nap, (3,))
    proc = db.popen("work", "--import", "tests.aio_jobs", "--sleep-delay", "0.2")
    try:
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'running'", 2)
        assert not doomed.cancel()  # running: its worker is asked to stop it
        db.wait_for(f"SELECT status FROM tasks WHERE id = {doomed.id}", "cancelled", timeout=10)
        db.wait_for(f"SELECT status FROM tasks WHERE id = {other.id}", "succeeded", timeout=30)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    doomed.refresh()
    assert "cancelled while running" in doomed.error
    assert "did not stop" not in err  # the coroutine stopped: no hard cancel
    assert other.refresh().attempts == 1  # not rescued: its process lived on


def test_sigterm_lets_coroutines_finish_within_the_grace_period_then_gives_back_the_rest(db):
    finishing = dbqueue.enqueue_many(aio_jobs.nap, [(1.5,)] * 3)
    too_long = dbqueue.enqueue_many(aio_jobs.stubborn, [(60,)] * 2)
    proc = db.popen("work", "--import", "tests.aio_jobs", "--grace", "4", "--sleep-delay", "0.2")
    try:
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'running'", 5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the signal reaches the worker (through the supervisor) first
        waiting = dbqueue.enqueue(aio_jobs.nap, (0.1,))
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'running'") == 0, err
    assert proc.returncode == 0, err
    results(finishing)
    for task_id in too_long:
        task = Task(task_id)
        assert task.status is Status.QUEUED, task.error
        assert task.attempts == 1  # spent, as a rescued run's
        assert "grace period ran out (returned to the queue)" in task.error
    assert "still running 2s before the end of the 4s grace period" in err
    assert waiting.refresh().status is Status.QUEUED  # no claim after the signal


def test_an_async_engine_with_a_pool_serves_many_tasks(db):
    # asyncpg's connections belong to the loop that opened them: with a loop per run (before
    # the worker kept one), the second run failed on the first one's pooled connection
    url = async_url(db)
    if db.kind == "postgresql":
        url = sa.make_url(url).set(drivername="postgresql+asyncpg").render_as_string(False)
    ids = dbqueue.enqueue_many(aio_jobs.pooled_query, [(url,)] * 30)
    done = db.cli("workoff", "--import", "tests.aio_jobs", "--async-concurrency", "10")
    assert done.returncode == 0, done.stdout + done.stderr
    answers = [task.result for task in results(ids)]
    if db.kind == "sqlite":
        assert answers == [1] * 30
    else:
        assert len(set(answers)) <= 3  # the pool's connections, reused across tasks


def test_hooks_and_retries_apply_to_async_tasks(db):
    installed = aio_jobs.install_hooks()
    try:
        tenant = dbqueue.enqueue(aio_jobs.read_tenant)
        failing = dbqueue.enqueue(aio_jobs.nap_then_fail, (0,), max_attempts=2)
        summary = Worker(db.settings).work_off()
    finally:
        for hook in installed:
            hooks.unregister(hook)
    assert (summary.succeeded, summary.retried) == (1, 1)
    assert tenant.refresh().result == f"tenant-{tenant.id}"  # set by the around hook
    failing.refresh()
    assert failing.status is Status.QUEUED and failing.attempts == 1
    assert "ValueError: failed after a nap" in failing.error
    assert f"before {tenant.id}" in aio_jobs.events
    assert f"after {tenant.id} succeeded" in aio_jobs.events
    assert f"after {failing.id} retrying" in aio_jobs.events


def test_async_concurrency_comes_from_the_environment(db, monkeypatch):
    monkeypatch.setenv("DBQUEUE_ASYNC_CONCURRENCY", "7")
    assert dbqueue.config.Settings().async_concurrency == 7
    monkeypatch.setenv("DBQUEUE_ASYNC_CONCURRENCY", "none")
    try:
        dbqueue.config.Settings()
    except dbqueue.ConfigurationError as exc:
        assert "DBQUEUE_ASYNC_CONCURRENCY='none' is not a positive whole number of tasks" in str(
            exc
        )
    else:
        raise AssertionError("a bad DBQUEUE_ASYNC_CONCURRENCY was accepted")


def test_tasks_claimed_ahead_of_a_slot_go_back_unspent_at_stop(db):
    # short tasks first: the worker learns they are short and claims a second set of slots
    # ahead (claimed, not started); then four long ones: two run, two wait for a slot
    dbqueue.enqueue_many(aio_jobs.nap, [(0,)] * 20)
    started = db.tmp_path / "started"
    started.mkdir()
    long = dbqueue.enqueue_many(aio_jobs.stubborn, [(60, str(started))] * 4)
    w = Worker(db.settings, async_concurrency=2, grace=1.0, sleep_delay=0.1)
    runner = threading.Thread(target=w.work)
    runner.start()
    try:
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'running'", 4)
        deadline = time.monotonic() + 30
        while len(list(started.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        w.stop()
    finally:
        runner.join(timeout=30)
    assert not runner.is_alive()
    tasks = [Task(i) for i in long]
    ran = [t for t in tasks if t.attempts == 1]
    waited = [t for t in tasks if t.attempts == 0]
    assert len(ran) == len(waited) == 2, [(t.id, t.attempts, t.error) for t in tasks]
    assert all(t.status is Status.QUEUED for t in tasks)
    assert all("grace period ran out" in t.error for t in ran)
    assert all(t.error is None for t in waited)  # never started: given back as claimed


def test_coroutines_of_a_killed_worker_are_rescued_and_run_again(db):
    ids = dbqueue.enqueue_many(aio_jobs.nap, [(2,)] * 3)
    proc = db.popen("work", "--import", "tests.aio_jobs", "--sleep-delay", "0.2")
    try:
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'running'", 3)
        (pid,) = {r.pid for r in db.rows("SELECT pid FROM workers")}
        os.kill(pid, signal.SIGKILL)  # the supervisor rescues its tasks and starts another
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'succeeded'", 3, timeout=60)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    for task in results(ids):
        assert task.attempts == 2  # the killed run, then the rescued one
        assert task.result[2] != pid


def test_async_tasks_beside_threads(db):
    first = dbqueue.enqueue_many(aio_jobs.nap, [(0.5,)] * 3)
    blocking = dbqueue.enqueue_many(aio_jobs.blocking_nap, [(0.5,)] * 2)
    later = dbqueue.enqueue_many(aio_jobs.nap, [(0.5,)] * 3)
    summary = Worker(db.settings, threads=2).work_off()
    assert summary.succeeded == 8
    sync = [t.result for t in results(blocking)]
    naps = [t.result for t in results(first + later)]
    assert most_at_once([(s, e) for s, e, _ in sync]) == 2  # the two threads at once
    assert most_at_once([(s, e) for s, e, _ in naps + sync]) >= 4  # and the loop beside them


def test_cancelling_a_task_claimed_ahead_of_a_slot(db):
    dbqueue.enqueue_many(aio_jobs.nap, [(0,)] * 20)  # short: the worker claims ahead
    folders = [db.tmp_path / f"started-{i}" for i in range(2)]
    for folder in folders:
        folder.mkdir()
    long = [dbqueue.enqueue(aio_jobs.stubborn, (60, str(f))) for f in folders]
    proc = db.popen(
        "work", "--import", "tests.aio_jobs", "--async-concurrency", "1", "--grace", "2",
        "--sleep-delay", "0.2",
    )  # fmt: skip
    try:
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'running'", 2)
        deadline = time.monotonic() + 30
        while not any(any(f.iterdir()) for f in folders) and time.monotonic() < deadline:
            time.sleep(0.02)
        waiting = next(t for t, f in zip(long, folders, strict=True) if not any(f.iterdir()))
        running = next(t for t in long if t != waiting)
        assert not waiting.cancel()  # claimed: its worker is asked to stop it
        db.wait_for(f"SELECT status FROM tasks WHERE id = {waiting.id}", "cancelled")
        assert running.refresh().status is Status.RUNNING  # the slot's run goes on
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "did not stop" not in err  # no hard cancel: the process lived on
    assert running.refresh().status is Status.QUEUED  # cancelled at stop, given back
