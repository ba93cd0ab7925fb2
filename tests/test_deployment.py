"""Workers deployed as operators deploy them: containers that share a hostname, and
supervisors (supervisord, systemd, Kubernetes) that kill only the process they started.

Real `dbqueue work` processes, real PID and UTS namespaces (`unshare`, root only), real
SIGKILL, on both databases (an SQLite file shared by containers is a real setup).
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

import dbqueue
from tests import jobs

pytestmark = pytest.mark.slow


def _make_runs_table(db) -> None:
    with db.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE runs (label VARCHAR(50) NOT NULL, pid INTEGER)"))


def _run_counts(db) -> collections.Counter[str]:
    return collections.Counter(r.label for r in db.rows("SELECT label FROM runs"))


def _namespaces_usable() -> str | None:
    """Why PID/UTS namespaces cannot be made here, or None when they can."""
    if shutil.which("unshare") is None:
        return "util-linux `unshare` is not installed"
    probe = subprocess.run(
        ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"cannot create PID/UTS namespaces here (needs root): {probe.stderr.strip()}"
    return None


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(p) for p in task.read_text().split()]
    return found


def _session_members(sid: int) -> list[int]:
    """Processes whose session id is `sid` (a supervisor started in a session of its own and
    every worker it spawned, whoever their parent is now)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


class Container:
    """`dbqueue work` as PID 1 of its own PID namespace, with a hostname given by the test
    (the shape of `docker run --network host --hostname H` or a hostNetwork pod)."""

    def __init__(self, db, hostname: str, *args: str) -> None:
        command = " ".join(
            [sys.executable, "-m", "dbqueue", "work", "--import", "tests.jobs", *args]
        )
        self.proc = subprocess.Popen(
            [
                "unshare",
                "--uts",
                "--pid",
                "--fork",
                "--mount-proc",
                "sh",
                "-c",
                f"hostname {hostname} && exec {command}",
            ],
            env=db.env,
            cwd=db.tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> str:
        """SIGTERM to the container's PID 1 (as `docker stop` does); its logs."""
        deadline = time.monotonic() + 10
        while not _children(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for init in _children(self.proc.pid):
            os.kill(init, signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        return err


def test_containers_sharing_a_hostname_do_not_rescue_each_others_tasks(db):
    """Two supervisors (-c 3 and -c 1) in two PID namespaces with one hostname: each sees
    pids of its own namespace only, so neither may judge the other's workers by pid."""
    reason = _namespaces_usable()
    if reason:
        if os.environ.get("CI"):  # CI here is root: these tests must run there
            pytest.fail(f"{reason} (CI is set: these tests must run)")
        pytest.skip(reason)
    _make_runs_table(db)
    labels = [f"t{i}" for i in range(8)]
    dbqueue.enqueue_many(jobs.record_start, [(db.url, label, 3.0) for label in labels])
    options = ("--rescue-after", "15", "--sleep-delay", "0.2")
    first = Container(db, "shared-host", "-c", "3", *options)
    second = Container(db, "shared-host", "-c", "1", *options)
    logs = ""
    try:
        db.wait_for(
            "SELECT count(*) FROM tasks WHERE status = 'succeeded'", len(labels), timeout=120
        )
        hosts = {r.host_id for r in db.rows("SELECT host_id FROM workers")}
        hostnames = {r.hostname for r in db.rows("SELECT hostname FROM workers")}
    finally:
        logs = first.stop() + second.stop()
    runs = _run_counts(db)
    print(f"CONTAINERS db={db.kind} runs={dict(runs)} host_ids={len(hosts)}")
    assert hostnames == {"shared-host"}
    assert runs == collections.Counter(labels), "a task ran twice or not at all"
    assert "presumed dead" not in logs
    assert "rescued" not in logs
    assert db.scalar("SELECT max(attempts) FROM tasks") == 1
    assert first.proc.returncode == 0 and second.proc.returncode == 0, logs[-3000:]
    assert len(hosts) == 2  # one identity per PID namespace, though the hostname is one


# When each supervisor is SIGKILLed: at fixed delays after `dbqueue work` started (before its
# children exist, while they are spawned and import), then at events of its workers' start-up
# and work, read from the database and the process table.
KILL_AT = (0.2, 0.6, 1.0, 1.4, "spawned", "registered", "running", "worked")


def _reached(db, moment: float | str, sid: int, elapsed: float) -> bool:
    if isinstance(moment, float):
        return elapsed >= moment
    workers = [pid for pid in _session_members(sid) if pid != sid]
    if moment == "spawned":
        return bool(workers)
    if not workers:
        return False
    marks = ",".join(str(pid) for pid in workers)
    if moment == "registered":
        return bool(db.scalar(f"SELECT count(*) FROM workers WHERE pid IN ({marks})"))
    ran = db.scalar(f"SELECT count(*) FROM runs WHERE pid IN ({marks})")
    return bool(ran) if moment == "running" else ran >= 5


def _runs_by(db, pids: list[int]) -> int:
    if not pids:
        return 0
    return int(db.scalar(f"SELECT count(*) FROM runs WHERE pid IN ({','.join(map(str, pids))})"))


def test_workers_of_a_killed_supervisor_stop_whenever_it_died(db):
    """A supervisor SIGKILLed at any moment of its start-up or work leaves no worker behind:
    each stops claiming within 2 s, finishes its task, unregisters and exits. No log line
    blames the database for the supervisor's broken pipe."""
    _make_runs_table(db)
    dbqueue.enqueue_many(jobs.record_start, [(db.url, f"t{i}", 0.3) for i in range(2000)])
    pending = {}
    for moment in KILL_AT:
        proc = db.popen(
            "work",
            "--import",
            "tests.jobs",
            "-c",
            "2",
            "--sleep-delay",
            "0.2",
            start_new_session=True,
        )
        pending[proc.pid] = (moment, proc, time.monotonic())
    supervisors = [proc for _, proc, _ in pending.values()]
    killed: dict[int, tuple[float, list[int]]] = {}  # sid -> (when, its workers' pids)
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        for sid, (moment, proc, started) in list(pending.items()):
            if _reached(db, moment, sid, time.monotonic() - started):
                proc.kill()
                del pending[sid]
                killed[sid] = (time.monotonic(), [p for p in _session_members(sid) if p != sid])
        time.sleep(0.05)
    assert not pending, f"supervisors never reached their moment: {pending}"
    time.sleep(max(0.0, max(when for when, _ in killed.values()) + 2 - time.monotonic()))
    claimed_later = {sid: _runs_by(db, pids) for sid, (_, pids) in killed.items()}
    logs = []
    leftovers = {}
    for proc in supervisors:
        limit = time.monotonic() + 30
        while _session_members(proc.pid) and time.monotonic() < limit:
            time.sleep(0.1)
        leftovers[proc.pid] = _session_members(proc.pid)
        for pid in leftovers[proc.pid]:
            os.kill(pid, signal.SIGKILL)  # leave nothing behind, even when failing
        logs.append(proc.communicate(timeout=30)[1])
    output = "".join(logs)
    runs = _run_counts(db)
    print(
        f"ORPHANS db={db.kind} supervisors={len(supervisors)} runs={sum(runs.values())} "
        f"orphan_log_lines={output.count('is gone')}"
    )
    assert not any(leftovers.values()), f"workers outlived their supervisor: {leftovers}"
    after = {sid: _runs_by(db, pids) for sid, (_, pids) in killed.items()}
    assert after == claimed_later, "a worker claimed more than 2 s after its supervisor died"
    assert max(runs.values(), default=1) == 1, "a task ran twice"
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'running'") == 0
    assert db.scalar("SELECT count(*) FROM workers") == 0  # each unregistered on its way out
    assert "database error" not in output and "Broken pipe" not in output, output[-3000:]
