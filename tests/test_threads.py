"""--threads T: T tasks of one worker process run at once, outcomes recorded as usual.

Concurrency is shown by a rendezvous task that succeeds only when T of its kind are running at
the same moment (tests.jobs.rendezvous), never by timing.
"""

from __future__ import annotations

import signal
import time

import dbqueue
from dbqueue import worker
from tests import jobs


def test_threads_run_tasks_at_once(db):
    folder = db.tmp_path / "rendezvous"
    folder.mkdir()
    tasks = [dbqueue.enqueue(jobs.rendezvous, args=(str(folder), 4)) for _ in range(4)]
    summary = worker.Worker(db.settings, threads=4, max_batch=4).work_off()
    assert summary.succeeded == 4 and summary.failed == summary.retried == 0
    idents = set()
    for task in tasks:
        task.refresh()
        assert task.status is dbqueue.Status.SUCCEEDED, task.error
        idents.add(task.result)
    assert len(idents) == 4  # four different threads


def test_outcomes_of_threaded_tasks_are_recorded(db):
    ok = [dbqueue.enqueue(jobs.add, args=(i, i)) for i in range(30)]
    bad = dbqueue.enqueue(jobs.raise_value_error, args=("nope",), max_attempts=1)
    retried = dbqueue.enqueue(jobs.raise_value_error, args=("again",), max_attempts=3)
    summary = worker.Worker(db.settings, threads=3).work_off()
    assert (summary.succeeded, summary.failed, summary.retried) == (30, 1, 1)
    for i, task in enumerate(ok):
        assert task.result == 2 * i
    bad.refresh()
    assert bad.status is dbqueue.Status.FAILED and "ValueError: nope" in bad.error
    retried.refresh()
    assert retried.status is dbqueue.Status.QUEUED and retried.attempts == 1
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'running'") == 0


def test_threads_respect_max_tasks(db):
    dbqueue.enqueue_many(jobs.noop, [()] * 12)
    summary = worker.Worker(db.settings, threads=4, max_tasks=5).work_off()
    assert summary.done == 5
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'succeeded'") == 5
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'queued'") == 7


def test_cli_workoff_with_threads(db):
    folder = db.tmp_path / "rendezvous"
    folder.mkdir()
    dbqueue.enqueue_many(jobs.rendezvous, [(str(folder), 3)] * 3)
    dbqueue.enqueue_many(jobs.add, [(i, 1) for i in range(20)])
    done = db.cli("workoff", "--import", "tests.jobs", "--threads", "3")
    assert done.returncode == 0, done.stderr
    assert "23 succeeded" in done.stdout
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'succeeded'") == 23


def test_sigterm_lets_running_threads_finish(db):
    folder = db.tmp_path / "rendezvous"
    folder.mkdir()
    # two tasks wait for a third party: the test itself, once the worker has been told to stop
    tasks = [dbqueue.enqueue(jobs.rendezvous, args=(str(folder), 3, 60)) for _ in range(2)]
    proc = db.popen("work", "--import", "tests.jobs", "--threads", "2", "--sleep-delay", "0.2")
    try:
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'running'", 2)
        waiting = dbqueue.enqueue(jobs.noop)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the signal reaches the worker (through the supervisor) first
        (folder / "test").touch()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    for task in tasks:
        task.refresh()
        assert task.status is dbqueue.Status.SUCCEEDED, task.error
    waiting.refresh()
    assert waiting.status is dbqueue.Status.QUEUED  # no claim after the signal
