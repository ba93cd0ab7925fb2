"""The `dbqueue` command against real databases: retry, prune, clear, status, migrate (also
from an installed wheel)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa

import dbqueue
from dbqueue import schema, store, worker
from tests import jobs
from tests.conftest import ROOT

tasks = schema.tasks


def work_off(db) -> worker.Summary:
    return worker.Worker(db.settings).work_off()


def failed_task(queue: str = "default") -> dbqueue.Task:
    return dbqueue.enqueue(jobs.raise_value_error, args=("nope",), queue=queue, max_attempts=1)


def statuses(db) -> dict[int, str]:
    return {r.id: r.status for r in db.rows("SELECT id, status FROM tasks")}


def age_finished(db, task_ids, hours: float) -> None:
    """Move finished_at back in time (test data set up; the clock itself is untouched)."""
    when = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours)
    with db.engine.begin() as conn:
        conn.execute(sa.update(tasks).where(tasks.c.id.in_(task_ids)).values(finished_at=when))


# -- retry -----------------------------------------------------------------------------------


def test_retry_by_id_requeues_with_fresh_attempts(db):
    first, second = failed_task(), failed_task()
    work_off(db)
    assert first.refresh().status is dbqueue.Status.FAILED and first.attempts == 1

    proc = db.cli("retry", str(first.id))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "queued 1 task(s) again"
    first.refresh()
    assert first.status is dbqueue.Status.QUEUED and first.attempts == 0
    assert first.finished_at is None
    assert second.refresh().status is dbqueue.Status.FAILED

    assert work_off(db).failed == 1  # it really runs again, and fails again
    assert first.refresh().attempts == 1 and first.status is dbqueue.Status.FAILED


def test_retry_names_ids_it_did_not_requeue(db):
    failed = failed_task()
    done = dbqueue.enqueue(jobs.noop)
    work_off(db)
    queued = dbqueue.enqueue(jobs.noop)
    proc = db.cli("retry", str(failed.id), str(done.id), str(queued.id), "999999")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "queued 1 task(s) again"
    assert f"task {done.id}: is succeeded, only failed or cancelled tasks are retried" in (
        proc.stderr
    )
    assert "task 999999: no such task (it may have been pruned)" in proc.stderr
    assert f"task {queued.id}" not in proc.stderr  # already queued: nothing to explain
    assert "Traceback" not in proc.stderr
    assert statuses(db) == {failed.id: "queued", done.id: "succeeded", queued.id: "queued"}


def test_retry_cancelled_by_id(db):
    task = dbqueue.enqueue(jobs.noop)
    with db.engine.begin() as conn:
        assert store.cancel(conn, [task.id]) == 1
    proc = db.cli("retry", str(task.id))
    assert proc.returncode == 0 and "queued 1 task(s) again" in proc.stdout
    assert work_off(db).succeeded == 1


def test_retry_failed_all_and_by_queue(db):
    a1, a2, b1 = failed_task("a"), failed_task("a"), failed_task("b")
    cancelled = dbqueue.enqueue(jobs.noop, queue="a")
    ok = dbqueue.enqueue(jobs.noop, queue="a")
    with db.engine.begin() as conn:
        store.cancel(conn, [cancelled.id])
    work_off(db)

    proc = db.cli("retry", "--failed", "--queue", "b")
    assert proc.returncode == 0 and proc.stdout.strip() == "queued 1 task(s) again"
    assert statuses(db)[b1.id] == "queued" and statuses(db)[a1.id] == "failed"

    proc = db.cli("retry", "--failed")
    assert proc.returncode == 0 and proc.stdout.strip() == "queued 2 task(s) again"
    assert statuses(db) == {
        a1.id: "queued",
        a2.id: "queued",
        b1.id: "queued",
        cancelled.id: "cancelled",  # --failed means failed: cancelled ones stay
        ok.id: "succeeded",
    }


def test_retry_needs_ids_or_failed(db):
    proc = db.cli("retry")
    assert proc.returncode == 2
    assert "give task ids, or --failed" in proc.stderr and "Traceback" not in proc.stderr
    proc = db.cli("retry", "seven")
    assert proc.returncode == 2 and "'seven' is not a valid integer" in proc.stderr


# -- prune -----------------------------------------------------------------------------------


def test_prune_deletes_old_finished_rows_in_batches(db):
    old = [t.id for t in (dbqueue.enqueue(jobs.noop) for _ in range(5))]
    old_failed = failed_task().id
    recent = dbqueue.enqueue(jobs.noop).id
    work_off(db)
    old_cancelled = dbqueue.enqueue(jobs.noop).id
    with db.engine.begin() as conn:
        store.cancel(conn, [old_cancelled])
    queued = dbqueue.enqueue(jobs.noop).id
    with db.engine.begin() as conn:
        (running,) = (r.id for r in store.claim(conn, "cli-test-worker", 1, None))
    assert running == queued
    queued = dbqueue.enqueue(jobs.noop).id
    doomed = [*old, old_failed, old_cancelled]
    age_finished(db, doomed, hours=3)
    # queued and running rows with an old finished_at (a previous run) are never pruned
    age_finished(db, [running, queued], hours=3)

    proc = db.cli("prune", "--older-than", "2h", "--batch-size", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "pruned 7 finished task(s) older than 2h"
    progress = [line for line in proc.stderr.splitlines() if line.startswith("prune:")]
    assert progress == [
        "prune: 3 deleted so far",
        "prune: 6 deleted so far",
        "prune: 7 deleted so far",
    ]
    assert statuses(db) == {recent: "succeeded", running: "running", queued: "queued"}

    again = db.cli("prune", "--older-than", "2h")
    assert again.returncode == 0 and "pruned 0 finished task(s)" in again.stdout


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("12h", 43200), ("7d", 604800), ("2w", 1209600), ("90", 90)],
)
def test_prune_duration_units(text, seconds):
    from dbqueue import cli

    assert cli.parse_duration(text) == seconds


def test_prune_refuses_a_bad_duration(db):
    dbqueue.enqueue(jobs.noop)
    proc = db.cli("prune", "--older-than", "yesterday")
    assert proc.returncode == 2
    assert "'yesterday' is not a duration like 30s, 15m, 12h, 7d" in proc.stderr
    proc = db.cli("prune")
    assert proc.returncode == 2 and "--older-than" in proc.stderr
    assert db.scalar("SELECT count(*) FROM tasks") == 1


# -- clear -----------------------------------------------------------------------------------


def test_clear_asks_first_and_keeps_running_and_finished(db):
    done = dbqueue.enqueue(jobs.noop, queue="a")
    work_off(db)
    queued_a = [dbqueue.enqueue(jobs.noop, queue="a").id for _ in range(2)]
    queued_b = dbqueue.enqueue(jobs.noop, queue="b").id

    no = db.cli("clear", input="n\n")
    assert no.returncode == 1
    assert "Delete 3 queued task(s) in all queues?" in no.stdout
    assert "aborted" in no.stderr
    assert db.scalar("SELECT count(*) FROM tasks") == 4

    yes = db.cli("clear", "--queue", "a", input="y\n")
    assert yes.returncode == 0, yes.stderr
    assert "Delete 2 queued task(s) in queue(s) a?" in yes.stdout
    assert "deleted 2 queued task(s) in queue(s) a" in yes.stdout
    assert statuses(db) == {done.id: "succeeded", queued_b: "queued"}
    assert not set(queued_a) & set(statuses(db))

    forced = db.cli("clear", "--yes")
    assert forced.returncode == 0 and "Delete" not in forced.stdout
    assert "deleted 1 queued task(s) in all queues" in forced.stdout
    assert statuses(db) == {done.id: "succeeded"}


# -- status ----------------------------------------------------------------------------------


def test_status_lists_counts_per_queue_and_workers(db):
    empty = db.cli("status")
    assert empty.returncode == 0 and "(no tasks)" in empty.stdout and "workers: 0" in empty.stdout

    failed_task("mail")
    dbqueue.enqueue(jobs.noop, queue="mail")
    work_off(db)
    for _ in range(3):
        dbqueue.enqueue(jobs.noop)
    w = worker.Worker(db.settings)
    w.start()
    try:
        proc = db.cli("status")
    finally:
        w.shutdown()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = lines[0].split()
    assert header == ["queue", "queued", "running", "succeeded", "failed", "cancelled"]
    rows = {line.split()[0]: [int(n) for n in line.split()[1:]] for line in lines[1:3]}
    assert rows == {"default": [3, 0, 0, 0, 0], "mail": [0, 0, 1, 1, 0]}
    assert "workers: 1" in proc.stdout
    assert f"  {w.name}  pid={os.getpid()}  queues=*  heartbeat " in proc.stdout


# -- migrate ---------------------------------------------------------------------------------


def test_migrate_is_idempotent_and_prints_the_revision(db):
    from dbqueue import database

    proc = db.cli("migrate")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(f"is at dbqueue schema revision {database.head_revision()}")
    assert "test-secret" not in proc.stdout


@pytest.mark.slow
def test_migrate_from_an_installed_wheel(tmp_path):
    """Build the wheel, install it (not editable) in a fresh venv, migrate a SQLite file."""
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("dbqueue-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr

    workdir = tmp_path / "elsewhere"  # not the checkout: only the wheel can be imported
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBQUEUE_", "PYTHON"))}
    env["DBQUEUE_DATABASE_URL"] = f"sqlite:///{workdir / 'app.sqlite3'}"

    def run_installed(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, cwd=workdir, env=env, capture_output=True, text=True, timeout=120
        )

    where = run_installed(str(python), "-c", "import dbqueue; print(dbqueue.__file__)")
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr

    migrate = run_installed(str(venv / "bin" / "dbqueue"), "migrate")
    assert migrate.returncode == 0, migrate.stderr
    assert "is at dbqueue schema revision" in migrate.stdout
    engine = sa.create_engine(f"sqlite:///{workdir / 'app.sqlite3'}")
    try:
        names = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"tasks", "workers", "counter_deltas", "bus_subscriptions"} <= names
    assert "dbqueue_alembic_version" in names

    status = run_installed(str(venv / "bin" / "dbqueue"), "status")
    assert status.returncode == 0 and "(no tasks)" in status.stdout, status.stderr
