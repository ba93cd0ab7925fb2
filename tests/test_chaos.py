"""The chaos run (scripts/chaos): a shortened pass of the real thing, and its checker shown
able to fail on made-up run logs (a checker that cannot fail would prove nothing).

PostgreSQL and MariaDB, not SQLite: the run restarts its own throwaway server, which SQLite
has no equivalent of. The checker tests touch no database at all: they feed records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import chaos  # noqa: E402
import chaos_check  # noqa: E402
import chaos_report  # noqa: E402
from chaos_check import Fault, Orphan, Run, RunLog, TaskRow  # noqa: E402

W1, W2 = "host:10:aaaaaa", "host:20:bbbbbb"


def run(
    run_id: str, worker: str, started: float, *, owned: bool = True, owner: str | None = None
) -> Run:
    """A run of task 1; `owned`: the row named this worker as its owner when the run started."""
    pid = 10 if worker == W1 else 20
    return Run(run_id, 1, worker, pid, started, worker if owned else owner)


def task(result_run: str | None = "r1", status: str | None = "succeeded", **kw: object) -> TaskRow:
    return TaskRow(1, "t1", status, result_run=result_run, finished_at=100.0, **kw)  # type: ignore[arg-type]


def kill(worker: str, at: float, kind: str = "kill-worker") -> Fault:
    return Fault(kind, at, frozenset({worker}), frozenset())


def verdict(**kw: object) -> chaos_check.Verdict:
    log = RunLog(**{"tasks": [task()], "runs": [run("r1", W1, 1.0)], "faults": [], **kw})  # type: ignore[arg-type]
    return chaos_check.check(log)


def test_a_clean_run_log_has_no_violation():
    result = verdict()
    assert result.ok and result.duplicates == 0 and result.lost == 0


def test_a_duplicate_with_a_fault_on_its_worker_while_it_ran_is_explained():
    runs = [run("r1", W1, 1.0), run("r2", W2, 5.0)]
    result = verdict(tasks=[task("r2")], runs=runs, faults=[kill(W1, 2.0)])
    assert result.ok, result.violations
    assert (result.duplicates, result.explained, result.by_kind) == (1, 1, {"kill-worker": 1})


def test_an_unexplained_duplicate_is_a_violation():
    runs = [run("r1", W1, 1.0), run("r2", W2, 5.0)]
    for faults in (
        [],  # no fault at all
        [kill(W2, 2.0)],  # a fault, but on another worker
        [kill(W1, 6.0)],  # on this worker, but after the task was taken over
    ):
        result = verdict(tasks=[task("r2")], runs=runs, faults=faults)
        assert not result.ok and result.explained == 0
        assert "ran more than once with no fault to explain it" in result.violations[0]


def test_an_outage_long_enough_to_presume_workers_dead_explains_a_run_on_any_worker():
    runs = [run("r1", W1, 1.0), run("r2", W2, 5.0)]
    long = Fault("restart-fast", 1.5, db_wide=True, outage=3.0)
    assert verdict(tasks=[task("r2")], runs=runs, faults=[long], rescue_after=5.0).ok
    # a short restart or terminated connections presume nobody dead and lose no commit
    for fault in (
        Fault("restart-immediate", 1.5, db_wide=True, outage=0.5),
        Fault("terminate-connections", 1.5, db_wide=True),
    ):
        result = verdict(tasks=[task("r2")], runs=runs, faults=[fault], rescue_after=5.0)
        assert not result.ok and result.explained == 0


def test_an_immediate_restart_explains_a_run_whose_claim_it_undid():
    runs = [run("r1", W1, 1.0, owned=False), run("r2", W2, 5.0)]
    crash = Fault("restart-immediate", 1.5, db_wide=True, outage=0.5)
    assert verdict(tasks=[task("r2")], runs=runs, faults=[crash]).ok
    fast = Fault("restart-fast", 1.5, db_wide=True, outage=0.5)
    assert not verdict(tasks=[task("r2")], runs=runs, faults=[fast]).ok


def test_a_run_that_started_on_a_row_it_no_longer_owned_needs_a_fault_just_before():
    # paused between claim and start: it starts after the task already succeeded elsewhere
    runs = [run("r2", W2, 5.0), run("r1", W1, 9.0, owned=False)]
    assert verdict(tasks=[task("r2")], runs=runs, faults=[kill(W1, 3.0, "stop-worker")]).ok
    result = verdict(tasks=[task("r2")], runs=runs, faults=[])
    assert not result.ok and "did not own the row" in result.violations[0]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (task(None, status="queued"), "still queued after the drain"),
        (task(None, status="running", locked_by=W1), f"still running by {W1}"),
        (task(None, status=None), "its row is gone"),
        (task(None, status="failed", error="boom"), "failed with no fault to explain it (boom)"),
    ],
)
def test_a_lost_task_is_a_violation(row, message):
    result = verdict(tasks=[row])
    assert result.lost == 1 and message in result.violations[0]


def test_a_task_failed_by_a_fault_that_hit_its_run_is_not_lost():
    row = task(None, status="failed", error="worker process exited with signal 9")
    assert verdict(tasks=[row], faults=[kill(W1, 2.0)]).ok


def test_an_outcome_overwritten_by_a_stale_writer_is_a_violation():
    # W1 was presumed dead, W2 took the task over and finished it, then W1's late write won
    runs = [run("r1", W1, 1.0), run("r2", W2, 5.0)]
    result = verdict(tasks=[task("r1")], runs=runs, faults=[kill(W1, 2.0, "stop-worker")])
    assert (
        result.stale == 1 and "a stale writer overwrote the newer outcome" in result.violations[0]
    )


def test_an_outcome_kept_from_a_run_that_did_not_own_the_row_is_a_violation():
    runs = [run("r2", W2, 5.0), run("r1", W1, 9.0, owned=False, owner=W2)]
    result = verdict(tasks=[task("r1")], runs=runs, faults=[kill(W1, 3.0)])
    assert result.stale == 1 and "did not own the row" in result.violations[0]


def test_a_succeeded_row_still_locked_or_naming_an_unknown_run_is_a_violation():
    assert "still locked by" in verdict(tasks=[task(locked_by=W1)]).violations[0]
    assert "which no run log holds" in verdict(tasks=[task("nope")]).violations[0]


def test_orphans_and_bad_supervisor_exits_are_violations():
    short = Orphan(7, "worker", 10.0, 12.0)
    assert verdict(orphans=[short]).ok
    long = Orphan(7, "worker", 10.0, 40.0)
    assert "outlived its supervisor by 30.0s" in verdict(orphans=[long]).violations[0]
    alive = Orphan(8, "worker", 10.0, 11.0, alive_at_end=True)
    assert "still alive after every supervisor stopped" in verdict(orphans=[alive]).violations[0]
    assert "exited with status 1 on SIGTERM" in verdict(supervisor_exits=[0, 1]).violations[0]
    assert "exited without being killed" in verdict(supervisor_deaths=1).violations[0]
    assert "without a ledger row" in verdict(unledgered=2).violations[0]


def test_the_summary_ends_with_the_verdict_the_slow_test_reads():
    runs = [run("r1", W1, 1.0), run("r2", W2, 5.0)]
    for faults, last in (
        ([kill(W1, 2.0)], "CHAOS RESULT: no violation"),
        ([], "CHAOS RESULT: 1 violation(s)"),
    ):
        log = RunLog([task("r2")], runs, faults)
        result = chaos_check.check(log)
        figures = chaos_report.figures(
            log,
            result,
            seconds=10,
            seed=1,
            enqueue_errors=0,
            drained=True,
            drain_seconds=1,
            span=5,
            worker_logs="lost ownership of task 1\n",
        )
        text = chaos_report.summary(log, result, figures, list(chaos.KINDS), "test")
        assert text.splitlines()[-1] == last
        assert ("ran more than once with no fault to explain it" in text) == (not faults)
        assert figures["lost_ownership_lines"] == 1 and figures["duplicates"] == 1


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_short_chaos_run_finds_no_violation(tmp_path, server_kind):
    """scripts/chaos for 40 s, every kind of fault at least once (two rounds of the deck), on a
    throwaway PostgreSQL cluster and a throwaway MariaDB server."""
    env = dict(os.environ, VIRTUAL_ENV=sys.prefix)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    out = tmp_path / "chaos"
    options = ["--duration", "40", "--rescue-after", "3", "--fault-every", "1:2", "--rate", "6"]
    options += ["--db", server_kind]
    done = subprocess.run(
        [str(ROOT / "scripts" / "chaos"), *options, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-6000:]
    assert "CHAOS RESULT: no violation" in done.stdout, report[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    kinds = {f["kind"] for f in summary["faults"]}
    assert kinds == set(chaos.KINDS), report[-6000:]
    figures = summary["figures"]
    assert figures["enqueued"] > 100 and figures["succeeded"] == figures["enqueued"]
    assert figures["duplicates"] == figures["explained"]
