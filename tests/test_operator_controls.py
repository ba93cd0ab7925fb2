"""Operator controls (issue 18): pause and resume queues, cancel queued and running tasks,
Snooze; in-process and with real `dbqueue work` processes and real signals, both databases."""

from __future__ import annotations

import signal
import time

import pytest

import dbqueue
from dbqueue import worker
from tests import jobs


def work_off(db, **kwargs) -> worker.Summary:
    return worker.Worker(db.settings, **kwargs).work_off()


def wait_status(task: dbqueue.Task, status: str, timeout: float = 30) -> dbqueue.Task:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if task.refresh().status.value == status:
            return task
        time.sleep(0.05)
    raise AssertionError(f"task {task.id} is {task.status} after {timeout}s, not {status}")


def test_a_paused_queue_is_skipped_by_every_worker_and_resumes(db):
    mail = dbqueue.enqueue(jobs.add, args=(1, 1), queue="mail")
    sms = dbqueue.enqueue(jobs.add, args=(2, 2), queue="sms")
    dbqueue.pause("mail")
    assert dbqueue.paused_queues() == {"mail"}
    late = dbqueue.enqueue(jobs.add, args=(3, 3), queue="mail")  # enqueueing still works
    assert work_off(db).succeeded == 1  # every queue: sms only
    assert work_off(db, queues=["mail"]).done == 0  # only mail: nothing
    assert sms.refresh().status is dbqueue.Status.SUCCEEDED
    assert mail.refresh().status is late.refresh().status is dbqueue.Status.QUEUED
    dbqueue.resume("mail")
    assert dbqueue.paused_queues() == set()
    assert work_off(db, queues=["mail", "sms"]).succeeded == 2


def test_pause_reaches_a_running_worker_within_a_second_and_the_cli_says_so(db):
    proc = db.popen("work", "--import", "tests.jobs", "--sleep-delay", "0.1")
    try:
        first = dbqueue.enqueue(jobs.add, args=(1, 1), queue="mail")
        wait_status(first, "succeeded")
        paused = db.cli("pause", "mail", "sms")
        assert paused.returncode == 0 and "paused: mail, sms" in paused.stdout
        time.sleep(1.5)  # the heart reads paused queues every second
        held = dbqueue.enqueue(jobs.add, args=(2, 2), queue="mail")
        other = dbqueue.enqueue(jobs.add, args=(3, 3), queue="default")
        wait_status(other, "succeeded")
        time.sleep(1.0)
        assert held.refresh().status is dbqueue.Status.QUEUED
        status = db.cli("status")
        assert "paused: mail, sms" in status.stdout
        drained = db.cli("workoff", "--import", "tests.jobs", "-q", "mail")
        assert "queue mail is paused (1 ready, not run)" in drained.stdout, drained.stdout
        assert db.cli("resume", "mail").returncode == 0
        wait_status(held, "succeeded", timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert "paused queues now: mail,sms" in err


def test_cancel_a_queued_task_at_once_and_refuse_a_finished_one(db):
    queued = dbqueue.enqueue(jobs.add, args=(1, 1))
    done = dbqueue.enqueue(jobs.add, args=(2, 2))
    work_off(db, max_tasks=1)  # runs `queued`: lowest id first
    assert queued.refresh().status is dbqueue.Status.SUCCEEDED
    assert done.cancel() is True
    assert done.status is dbqueue.Status.CANCELLED
    with pytest.raises(dbqueue.InvalidOperation, match="already succeeded"):
        queued.cancel()
    with pytest.raises(dbqueue.TaskNotFound):
        dbqueue.Task(999999).cancel()
    refused = db.cli("cancel", str(queued.id))
    assert refused.returncode == 1 and "already succeeded" in refused.stderr


def test_cancel_every_queued_task_of_a_queue(db):
    dbqueue.enqueue_many(jobs.noop, [()] * 3, queue="reports")
    keep = dbqueue.enqueue(jobs.noop, queue="mail")
    out = db.cli("cancel", "--queue", "reports")
    assert out.returncode == 0 and "cancelled 3 queued task(s) of reports" in out.stdout
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'cancelled'") == 3
    assert keep.refresh().status is dbqueue.Status.QUEUED


@pytest.mark.slow
@pytest.mark.parametrize("threads", ["1", "2"])
def test_cancel_a_running_task_raises_in_it_and_the_worker_goes_on(db, threads):
    proc = db.popen("work", "--import", "tests.jobs", "--sleep-delay", "0.1", "--threads", threads)
    try:
        # threads: the exception is set on the thread, raised at its next bytecode
        running = dbqueue.enqueue(jobs.busy_loop if threads == "2" else jobs.sleep, args=(60,))
        wait_status(running, "running")
        pid = db.scalar("SELECT pid FROM workers")
        asked = time.monotonic()
        assert running.cancel() is False  # running: asked to stop
        wait_status(running, "cancelled", timeout=15)
        took = time.monotonic() - asked
        after = dbqueue.enqueue(jobs.add, args=(1, 2))
        wait_status(after, "succeeded")
        assert db.scalar("SELECT pid FROM workers") == pid  # the same process went on
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    print(f"CANCEL db={db.kind} threads={threads} seconds={took:.2f}")
    assert running.attempts == 1 and "TaskCancelled" in (running.error or "")
    assert "cancel requested" in err and f"task {running.id} tests.jobs" in err


@pytest.mark.slow
def test_a_task_ignoring_cancellation_is_stopped_at_the_process_boundary(db):
    proc = db.popen("work", "--import", "tests.jobs", "--sleep-delay", "0.1")
    try:
        stubborn = dbqueue.enqueue(jobs.stubborn, args=(120,), max_attempts=5)
        wait_status(stubborn, "running")
        stubborn.cancel()
        wait_status(stubborn, "cancelled", timeout=20)
        after = dbqueue.enqueue(jobs.add, args=(1, 2))
        wait_status(after, "succeeded", timeout=30)  # a fresh child took over
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert "did not stop (the process was stopped)" in (stubborn.error or "")
    assert stubborn.attempts == 1
    assert "was cancelled and did not stop" in err


@pytest.mark.parametrize("returned", [False, True])
def test_snooze_puts_the_task_back_without_spending_an_attempt(db, returned):
    marker = str(db.tmp_path / "snoozed")
    task = dbqueue.enqueue(jobs.snooze_once, args=(marker, 1.0, returned), max_attempts=1)
    summary = work_off(db)
    task.refresh()
    assert task.status is dbqueue.Status.QUEUED
    assert (task.attempts, task.snoozes, task.error) == (0, 1, None)
    assert summary.failed == 0
    assert db.scalar("SELECT count(*) FROM tasks WHERE run_at > created_at") == 1
    time.sleep(1.1)
    work_off(db)
    task.refresh()
    assert task.status is dbqueue.Status.SUCCEEDED and task.result == "ran after the snooze"
    assert (task.attempts, task.snoozes) == (1, 1)  # max_attempts=1 was never spent


def test_snooze_refuses_a_bad_duration():
    with pytest.raises(ValueError, match="seconds >= 0"):
        dbqueue.Snooze(-1)


def test_bad_queue_names_are_refused(db):
    with pytest.raises(dbqueue.ConfigurationError, match="name at least one queue"):
        dbqueue.pause()
    with pytest.raises(dbqueue.ConfigurationError, match="at most 100 characters"):
        dbqueue.pause("x" * 101)
    with pytest.raises(dbqueue.ConfigurationError, match="positive integer"):
        dbqueue.configure_queue("mail", max_concurrency=0)
