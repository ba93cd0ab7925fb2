"""`dbqueue work --reload`: a changed task module is picked up without restarting by hand,
and a task running at the change finishes instead of being killed (real processes, real
inotify through watchfiles, both databases)."""

from __future__ import annotations

import importlib
import signal
import sys
import time

import pytest

import dbqueue

pytestmark = pytest.mark.slow

MODULE = """
import time

from dbqueue import handle_asynchronously


@handle_asynchronously
def version():
    return {version}


@handle_asynchronously
def slow(seconds):
    time.sleep(seconds)
    return "finished"
"""


def _write(path, version: int) -> None:
    path.write_text(MODULE.format(version=version))


def _result_of(task, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task.refresh()
        if task.status is dbqueue.Status.SUCCEEDED:
            return task.result
        time.sleep(0.1)
    raise AssertionError(f"task {task.id} is {task.status} after {timeout}s")


def test_reload_restarts_workers_on_new_code_after_their_running_task(db, monkeypatch):
    app = db.tmp_path / "reloadable_tasks.py"
    _write(app, 1)
    monkeypatch.syspath_prepend(str(db.tmp_path))
    sys.modules.pop("reloadable_tasks", None)
    tasks = importlib.import_module("reloadable_tasks")
    proc = db.popen(
        "work", "--import", "reloadable_tasks", "--reload", "--sleep-delay", "0.2", "-c", "1"
    )
    try:
        assert _result_of(tasks.version()) == 1
        first_pid = db.scalar("SELECT pid FROM workers")
        running = tasks.slow(3)
        db.wait_for("SELECT status FROM tasks WHERE id = :i", "running", i=running.id)
        _write(app, 2)  # while `slow` runs
        assert _result_of(running) == "finished"  # not killed by the reload
        deadline = time.monotonic() + 60
        while db.scalar("SELECT count(*) FROM workers WHERE pid <> :p", p=first_pid) == 0:
            assert time.monotonic() < deadline, "no fresh worker after the change"
            time.sleep(0.1)
        assert _result_of(tasks.version()) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "code changed" in err and "reloadable_tasks.py" in err
    assert running.refresh().attempts == 1  # ran once: finished, not rescued and re-run


def test_reload_dir_without_reload_is_a_usage_error(db):
    done = db.cli("work", "--reload-dir", str(db.tmp_path))
    assert done.returncode == 2 and "add --reload" in done.stderr
