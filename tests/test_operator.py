"""What an operator runs into: orphaned workers, configuration typos, failing imports."""

from __future__ import annotations

import os
import signal
import time

import pytest

import dbqueue
from tests import jobs


@pytest.mark.slow
def test_workers_exit_when_their_supervisor_is_killed(db):
    proc = db.popen("work", "-c", "2", "--import", "tests.jobs", start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while db.scalar("SELECT count(*) FROM workers") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [r.pid for r in db.rows("SELECT pid FROM workers")]
        assert len(pids) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        deadline = time.monotonic() + 30
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [p for p in pids if _alive(p)]
            time.sleep(0.1)
        assert not alive, f"orphaned workers still running: {alive}"
        db.wait_for("SELECT count(*) FROM workers", 0, timeout=10)
    finally:
        for pid in [r.pid for r in db.rows("SELECT pid FROM workers")]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skip_locked  # a server (SQLite makes the file)
def test_a_database_that_does_not_exist_is_a_configuration_error_not_an_outage(db):
    url = db.url.rsplit("/", 1)[0] + "/no_such_database_here"
    result = db.cli("--database-url", url, "work", timeout=30)
    assert result.returncode == 2, result.stderr
    expected = {
        "postgresql": 'database "no_such_database_here" does not exist',
        "mariadb": "Unknown database 'no_such_database_here'",
    }
    assert expected[db.kind] in result.stderr
    assert "Traceback" not in result.stderr and "retrying" not in result.stderr


def test_an_import_that_raises_is_one_line(db, tmp_path):
    (tmp_path / "badmod.py").write_text("raise RuntimeError('broken at import')\n")
    result = db.cli("workoff", "--import", "badmod")
    assert result.returncode == 2
    assert "--import badmod failed: RuntimeError: broken at import" in result.stderr
    assert "Traceback" not in result.stderr
    missing = db.cli("workoff", "--import", "no_such_module_anywhere")
    assert missing.returncode == 2 and "no module named" in missing.stderr


def test_retry_says_why_it_skipped_a_task(db):
    from dbqueue import worker

    done = dbqueue.enqueue(jobs.noop)
    worker.Worker(db.settings).work_off()
    result = db.cli("retry", str(done.id), "999999")
    assert result.returncode == 0
    assert "queued 0 task(s) again" in result.stdout
    assert f"task {done.id}: is succeeded, only failed or cancelled" in result.stderr
    assert "task 999999: no such task" in result.stderr
