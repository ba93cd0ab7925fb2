"""Crash recovery, graceful shutdown, timeouts, poison tasks and fencing, with real processes
and real signals (reliability.md R1-R3, R10-R12)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
import sqlalchemy as sa

import dbqueue
from tests import jobs

pytestmark = pytest.mark.slow


def make_runs_table(db) -> None:
    with db.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE runs (label VARCHAR(50) NOT NULL, pid INTEGER)"))


def worker_pids(db) -> dict[str, int]:
    return {r.name: r.pid for r in db.rows("SELECT name, pid FROM workers")}


def wait_workers(db, count: int, timeout: float = 60) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = worker_pids(db)
        if len(pids) >= count:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"{count} workers did not register within {timeout}s: {worker_pids(db)}")


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 60) -> str:
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return err


def test_killed_child_is_rescued_at_once_by_the_supervisor(db):
    task = dbqueue.enqueue(jobs.sleep, args=(30,), max_attempts=5)
    proc = db.popen("work", "--import", "tests.jobs", "--rescue-after", "60")
    try:
        db.wait_for("SELECT status FROM tasks", "running")
        (pid,) = worker_pids(db).values()
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        db.wait_for("SELECT count(*) FROM tasks WHERE error LIKE '%signal 9%'", 1, timeout=10)
        detected = time.monotonic() - killed
        print(f"RESCUE db={db.kind} detector=waitpid seconds={detected:.2f}")
        assert detected < 5  # far below the 60 s heartbeat window: waitpid saw it
        # the new child takes the task again
        db.wait_for("SELECT attempts FROM tasks", 2, timeout=30)
    finally:
        proc.send_signal(signal.SIGINT)  # twice: exit now, don't wait for the 30 s task
        time.sleep(0.5)
        stop(proc, signal.SIGINT)
    assert task.refresh().status is dbqueue.Status.QUEUED  # rescued again at the forced exit


def test_dead_worker_on_another_host_is_rescued_by_heartbeat(db):
    """A worker whose whole process group died, on a host we cannot probe: heartbeat only."""
    dbqueue.enqueue_many(jobs.sleep, [(30,)] * 3, max_attempts=5)
    rescuer = db.popen("work", "--import", "tests.jobs", "--rescue-after", "3", "-q", "other")
    (rescuer_name,) = wait_workers(db, 1)
    victim = db.popen(
        "work", "--import", "tests.jobs", "--rescue-after", "3", start_new_session=True
    )
    try:
        names = wait_workers(db, 2)
        (name,) = set(names) - {rescuer_name}
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'running'", 1)
        with db.engine.begin() as conn:  # pretend it runs elsewhere: the pid probe cannot apply
            conn.execute(
                sa.text("UPDATE workers SET hostname = 'elsewhere' WHERE name = :n"), {"n": name}
            )
        os.killpg(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=30)
        killed = time.monotonic()
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'running'", 0, timeout=30)
        detected = time.monotonic() - killed
    finally:
        stop(rescuer)
    print(f"RESCUE db={db.kind} detector=heartbeat rescue_after=3 seconds={detected:.2f}")
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'queued'") == 3
    assert db.scalar("SELECT count(*) FROM workers WHERE name = :n", n=name) == 0
    assert detected < 3 + 3  # rescue_after + one heartbeat interval, with room for load


@pytest.mark.timeout(600)
def test_kill_storm_loses_nothing_and_bounds_duplicates(db):
    """R1, scaled to CI: SIGKILL worker processes again and again while tasks flow."""
    tasks, kills_wanted = 1000, 12
    make_runs_table(db)
    dbqueue.enqueue_many(jobs.probe, [(db.url, f"t{i}", 50) for i in range(tasks)], max_attempts=25)
    supervisors = [
        db.popen(
            "--log-level",
            "WARNING",
            "work",
            "--import",
            "tests.jobs",
            "-c",
            "2",
            "--rescue-after",
            "5",
        )
        for _ in range(2)
    ]
    kills, in_flight, recoveries = 0, 0, []
    try:
        wait_workers(db, 4)
        rng = random.Random(7)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            left = db.scalar("SELECT count(*) FROM tasks WHERE status <> 'succeeded'")
            if left == 0:
                break
            time.sleep(rng.uniform(0.2, 0.6))
            if kills >= kills_wanted:
                continue
            alive = worker_pids(db)
            if not alive:
                continue
            name, pid = rng.choice(sorted(alive.items()))
            in_flight += db.scalar(
                "SELECT count(*) FROM tasks WHERE status = 'running' AND locked_by = :n", n=name
            )
            t0 = time.monotonic()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            kills += 1
            db.wait_for("SELECT count(*) FROM workers WHERE name = :n", 0, timeout=30, n=name)
            recoveries.append(time.monotonic() - t0)
    finally:
        for proc in supervisors:
            stop(proc)
    executions = db.scalar("SELECT count(*) FROM runs")
    distinct = db.scalar("SELECT count(DISTINCT label) FROM runs")
    succeeded = db.scalar("SELECT count(*) FROM tasks WHERE status = 'succeeded'")
    duplicates = executions - tasks
    recoveries.sort()
    p99 = recoveries[int(len(recoveries) * 0.99) - 1] if recoveries else 0.0
    print(
        f"KILLTEST db={db.kind} tasks={tasks} kills={kills} lost={tasks - succeeded} "
        f"dup={duplicates} bound={in_flight} p99_recover_s={p99:.2f}"
    )
    assert kills >= 3  # the queue may drain before all 12: what matters is nothing lost
    assert succeeded == tasks and distinct == tasks  # nothing lost
    assert 0 <= duplicates <= in_flight
    assert db.scalar("SELECT max(attempts) FROM tasks") <= 25


def test_sigterm_finishes_the_running_task_and_exits_zero(db):
    running = dbqueue.enqueue(jobs.sleep, args=(2,), priority=-1)
    waiting = dbqueue.enqueue_many(jobs.noop, [()] * 50)
    proc = db.popen("work", "--import", "tests.jobs", "--sleep-delay", "0.2")
    db.wait_for("SELECT status FROM tasks WHERE id = :i", "running", i=running.id)
    err = stop(proc, signal.SIGTERM)
    assert proc.returncode == 0, err[-2000:]
    assert running.refresh().status is dbqueue.Status.SUCCEEDED
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'running'") == 0
    assert db.scalar("SELECT count(*) FROM workers") == 0
    # nothing was claimed after the signal
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'queued'") == len(waiting)


def test_second_sigint_exits_at_once_and_the_task_is_rescued(db):
    task = dbqueue.enqueue(jobs.sleep, args=(60,))
    proc = db.popen("work", "--import", "tests.jobs")
    db.wait_for("SELECT status FROM tasks", "running")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    started = time.monotonic()
    err = stop(proc, signal.SIGINT, timeout=20)
    assert time.monotonic() - started < 10, err[-2000:]
    assert proc.returncode == 130
    task.refresh()
    assert task.status is dbqueue.Status.QUEUED and "signal 9" in task.error


def test_timeout_stops_the_task_and_records_it(db):
    task = dbqueue.enqueue(jobs.sleep, args=(10,), timeout=1, max_attempts=1)
    retried = dbqueue.enqueue(jobs.sleep, args=(10,), timeout=1, max_attempts=3)
    result = db.cli("workoff", "--import", "tests.jobs", timeout=60)
    assert result.returncode == 1
    task.refresh()
    assert task.status is dbqueue.Status.FAILED and "timed out after 1s" in task.error
    assert isinstance(task.exception, dbqueue.TaskTimeout)
    assert retried.refresh().status is dbqueue.Status.QUEUED  # retried per its policy


def test_task_ignoring_the_timeout_is_stopped_by_ending_its_process(db):
    task = dbqueue.enqueue(jobs.stubborn, args=(60,), timeout=1, max_attempts=1)
    after = dbqueue.enqueue(jobs.add, args=(1, 2))
    proc = db.popen("work", "--import", "tests.jobs", "--sleep-delay", "0.2")
    try:
        task.wait(timeout=30)
        after.wait(timeout=30)
    finally:
        err = stop(proc)
    assert task.status is dbqueue.Status.FAILED
    assert "timed out after 1s (the process was stopped)" in task.error
    assert after.result == 3  # the supervisor replaced the process and went on
    assert "did not stop: exiting the process" in err


@pytest.mark.parametrize("poison", [jobs.exit_process, jobs.segfault, jobs.kill_self])
def test_poison_task_is_retried_then_failed_without_taking_the_queue_down(db, poison):
    bad = dbqueue.enqueue(poison, max_attempts=2)
    good = dbqueue.enqueue_many(jobs.add, [(i, i) for i in range(20)])
    proc = db.popen("work", "--import", "tests.jobs", "--sleep-delay", "0.2")
    try:
        bad.wait(timeout=60)
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'succeeded'", 20, timeout=60)
        wait_workers(db, 1)  # the supervisor is back to its configured count
    finally:
        stop(proc)
    assert bad.status is dbqueue.Status.FAILED and bad.attempts == 2
    assert "worker process exited with" in bad.error
    if poison is jobs.segfault:
        assert "signal 11" in bad.error
    assert [dbqueue.Task.get(i).result for i in good] == [2 * i for i in range(20)]


def test_fencing_a_paused_worker_cannot_overwrite_the_run_that_replaced_it(db):
    """R3: SIGSTOP A past the rescue, B runs the task, SIGCONT A: the row keeps B's outcome."""
    task = dbqueue.enqueue(jobs.whoami, args=(3,), max_attempts=5)
    a = db.popen("work", "--import", "tests.jobs", "--rescue-after", "2")
    db.wait_for("SELECT status FROM tasks", "running")
    (a_name, a_pid) = next(iter(worker_pids(db).items()))
    os.kill(a_pid, signal.SIGSTOP)
    b = db.popen("work", "--import", "tests.jobs", "--rescue-after", "2")
    try:
        task.wait(timeout=60)
        assert task.result != a_pid and task.attempts == 2
        b_result = task.result
        os.kill(a_pid, signal.SIGCONT)
        # A wakes up, finishes its sleep, tries to record, is fenced, and exits as a zombie
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and a_name in worker_pids(db):
            time.sleep(0.1)
        time.sleep(4)
    finally:
        a_err = stop(a)
        stop(b)
    task.refresh()
    assert task.status is dbqueue.Status.SUCCEEDED
    assert task.result == b_result and task.attempts == 2
    assert f"lost ownership of task {task.id}" in a_err


def test_busy_task_does_not_starve_the_heartbeat(db):
    """R5: a task spinning in pure Python for 3x rescue_after is not declared dead."""
    task = dbqueue.enqueue(jobs.busy_loop, args=(6,))
    a = db.popen("work", "--import", "tests.jobs", "--rescue-after", "2")
    b = db.popen("work", "--import", "tests.jobs", "--rescue-after", "2", "-q", "other")
    try:
        task.wait(timeout=60)
    finally:
        stop(a)
        stop(b)
    assert task.status is dbqueue.Status.SUCCEEDED and task.attempts == 1
    assert task.error is None


def test_worker_declared_dead_stops_claiming_and_is_replaced(db):
    """R4: a worker whose row was removed (presumed dead) exits; the supervisor replaces it."""
    proc = db.popen("work", "--import", "tests.jobs", "--rescue-after", "2")
    try:
        (name,) = wait_workers(db, 1)
        with db.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM workers"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            names = set(worker_pids(db))
            if names and name not in names:
                break
            time.sleep(0.1)
        assert names and name not in names  # a new child registered
        task = dbqueue.enqueue(jobs.add, args=(2, 2))
        assert task.wait(timeout=30).result == 4
    finally:
        err = stop(proc)
    assert "stops claiming and exits" in err


def test_dead_worker_on_this_host_is_rescued_by_pid_probe_before_the_heartbeat_expires(db):
    """R2 (pid probe): supervisor and child killed together; a worker on the same host sees the
    pid is gone within about a second, long before the 30 s heartbeat window."""
    dbqueue.enqueue(jobs.sleep, args=(60,), max_attempts=5)
    rescuer = db.popen("work", "--import", "tests.jobs", "--rescue-after", "30", "-q", "other")
    victim = db.popen(
        "work", "--import", "tests.jobs", "--rescue-after", "30", start_new_session=True
    )
    try:
        wait_workers(db, 2)
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'running'", 1)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=30)
        killed = time.monotonic()
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'running'", 0, timeout=25)
        detected = time.monotonic() - killed
    finally:
        stop(rescuer)
    print(f"RESCUE db={db.kind} detector=pid-probe rescue_after=30 seconds={detected:.2f}")
    assert detected < 5
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'queued'") == 1


def test_one_child_per_supervisor_rescues_and_its_replacement_takes_over(db):
    """Only one child of `dbqueue work -c 3` scans for dead workers (32 children all
    scanning cost 8% of a 2-core machine); when that child dies the child started after it
    takes the role: a worker of another supervisor killed afterwards is still rescued by
    the pid probe within seconds."""
    rescuers = db.popen(
        "work", "--import", "tests.jobs", "--rescue-after", "30", "-c", "3", "-q", "other"
    )
    try:
        first = wait_workers(db, 3)
        for pid in first.values():  # the rescuer among them, whichever it is
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while set(worker_pids(db)) & set(first) or len(worker_pids(db)) < 3:
            assert time.monotonic() < deadline, f"children not replaced: {worker_pids(db)}"
            time.sleep(0.1)
        dbqueue.enqueue(jobs.sleep, args=(60,), max_attempts=5, queue="victim")
        victim = db.popen(
            "work", "--import", "tests.jobs", "--rescue-after", "30", "-q", "victim",
            start_new_session=True,
        )  # fmt: skip
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'running'", 1, timeout=60)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=30)
        killed = time.monotonic()
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'running'", 0, timeout=25)
        detected = time.monotonic() - killed
    finally:
        err = stop(rescuers)
    print(f"RESCUE db={db.kind} detector=pid-probe (replacement rescuer) seconds={detected:.2f}")
    assert detected < 5, err[-3000:]
    roles = {  # worker name -> rescuer?, from the start lines (a child killed at once has none)
        line.split(" started (queues: ")[0].split()[-1]: "rescuer: looks for" in line
        for line in err.splitlines()
        if " started (queues: " in line
    }
    assert sum(rescuer for name, rescuer in roles.items() if name in first) <= 1, roles
    replacements = {name: rescuer for name, rescuer in roles.items() if name not in first}
    assert len(replacements) == 3 and sum(replacements.values()) == 1, roles


def test_a_worker_presumed_dead_claims_nothing_and_does_not_rescue_itself(db):
    """Found by scripts/chaos: a worker whose row was removed (presumed dead after a pause)
    claimed a task, and its own heartbeat's rescue then named itself dead and returned that
    task, which ran twice. Now the claim needs the worker's row, and a beat that finds its
    row gone rescues nothing: the task runs once, on the fresh worker the supervisor starts."""
    make_runs_table(db)
    proc = db.popen(
        "work", "--import", "tests.jobs", "--rescue-after", "15", "--sleep-delay", "0.2"
    )
    try:
        (name,) = wait_workers(db, 1)
        with db.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM workers"))  # another worker's rescue did this
        task = dbqueue.enqueue(jobs.record_start, args=(db.url, "once", 2.0))
        db.wait_for("SELECT status FROM tasks WHERE id = :i", "succeeded", timeout=60, i=task.id)
    finally:
        err = stop(proc)
    runs = db.scalar("SELECT count(*) FROM runs WHERE label = 'once'")
    print(f"PRESUMED_DEAD db={db.kind} runs={runs} attempts={task.refresh().attempts}")
    assert runs == 1 and task.attempts == 1, err[-3000:]
    assert task.locked_by is None and db.scalar("SELECT count(*) FROM workers") == 0
    assert f"dead worker(s) {name}" not in err
    assert "presumed dead" in err  # the zombie noticed and was replaced


def test_a_rescued_task_keeps_its_place_in_the_queue(db):
    """Rescue used to set run_at = now: under a backlog the rescued task waited behind every
    task enqueued while it ran (seen by scripts/chaos: 12 s)."""
    from dbqueue import store

    first = dbqueue.enqueue(jobs.noop)
    with db.engine.begin() as conn:
        store.register_worker(conn, "ghost:1:aa", "ghost", 1, None, "elsewhere")
        (claimed,) = store.claim(conn, "ghost:1:aa", 1)
    later = [dbqueue.enqueue(jobs.noop).id for _ in range(3)]
    with db.engine.begin() as conn:
        assert store.rescue(conn, ["ghost:1:aa"], "worker died (test)") == [first.id]
        (next_up,) = store.claim(conn, "w", 1)
    assert claimed.id == first.id and next_up.id == first.id, later
