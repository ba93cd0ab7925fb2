"""The chaos run's verdict: what the run log, the fault log and the tasks table must agree on.

Pure functions over plain records, so a test can feed a made-up run log and see a violation
reported (tests/test_chaos.py). The rules:

* **Nothing lost**: every task in the ledger ends `succeeded`. One left queued or running,
  missing, or `failed` counts as lost, unless a fault hit the run that failed it.
* **Every duplicate explained**: a task run more than once is at-least-once delivery only
  when a fault hit the worker of each run whose outcome was not kept, and it is a fault that
  can cause that. A run that owned the row when it started was taken over only if its worker
  was presumed dead: it needs a fault aimed at its worker (SIGKILL, SIGSTOP, its supervisor
  killed), or a database outage longer than half of --rescue-after, between its start and
  the start of the run that took the task over. A run that started on a row it no longer
  owned (its claim was rescued while it was paused, or undone by a crash of the server:
  claims commit asynchronously) needs such a fault, or an immediate restart, in the minute
  before it started. A fast restart or terminated connections explain nothing: they lose
  no commit and presume no one dead.
* **No stale writer**: a succeeded row holds the result of the last run that owned it,
  and that run did own it; nobody holds it (`locked_by` is empty).
* **No orphan**: no worker process outlives its supervisor for longer than the limit, and
  none is alive once the supervisors have stopped.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict

CLAIM_SLACK = 2.0  # seconds between a claim and the run's own start stamp, and clock reading
STALE_WINDOW = 60.0  # seconds a claim may wait (paused worker, server down) before its run
AIMED = frozenset({"kill-worker", "kill-supervisor", "stop-worker"})  # faults on one worker
UNDOES_CLAIMS = frozenset({"restart-immediate"})  # a crash loses asynchronous commits


@dataclasses.dataclass(frozen=True)
class Run:
    """One execution of a task, as the task itself logged it (scripts/chaos_tasks.py)."""

    run_id: str
    task_id: int
    worker: str
    pid: int
    started: float
    owner: str | None  # the row's locked_by when the run started: the worker, if it owned it
    attempt: int | None = None
    ended: float | None = None

    @property
    def owning(self) -> bool:
        return self.owner == self.worker


@dataclasses.dataclass(frozen=True)
class TaskRow:
    """A ledger task's row at the end of the run."""

    task_id: int
    label: str
    status: str | None  # None: the row is gone
    attempts: int = 0
    locked_by: str | None = None
    finished_at: float | None = None
    result_run: str | None = None  # the run_id in the stored result
    error: str | None = None


@dataclasses.dataclass
class Fault:
    """One injected fault: whom it hit, when, and the tasks running on the victim then."""

    kind: str
    at: float
    workers: frozenset[str] = frozenset()
    pids: frozenset[int] = frozenset()
    db_wide: bool = False
    hit: tuple[int, ...] = ()
    release_delay: float | None = None  # seconds until the victim held none of `hit`
    outage: float = 0.0  # seconds the server was down (restarts)
    note: str = ""

    def hits(self, run: Run) -> bool:
        return self.db_wide or run.worker in self.workers or run.pid in self.pids

    def presumes_dead(self, rescue_after: float) -> bool:
        """Whether it can get a worker presumed dead (so its task is run again)."""
        return self.kind in AIMED or self.outage >= rescue_after / 2


@dataclasses.dataclass(frozen=True)
class Orphan:
    """A chaos process seen alive while its supervisor was gone."""

    pid: int
    what: str
    first_seen: float
    last_seen: float
    alive_at_end: bool = False

    @property
    def lifetime(self) -> float:
        return self.last_seen - self.first_seen


@dataclasses.dataclass
class RunLog:
    tasks: list[TaskRow]
    runs: list[Run]
    faults: list[Fault]
    orphans: list[Orphan] = dataclasses.field(default_factory=list)
    supervisor_exits: list[int] = dataclasses.field(default_factory=list)
    unledgered: int = 0  # chaos tasks in `tasks` without a ledger row
    supervisor_deaths: int = 0  # supervisors that exited without being killed
    orphan_limit: float = 15.0
    rescue_after: float = 5.0


@dataclasses.dataclass
class Verdict:
    violations: list[str]
    duplicates: int
    explained: int
    by_kind: dict[str, int]  # explained duplicate runs per fault kind
    lost: int
    stale: int
    explanations: list[tuple[int, str, str, float]]  # task, worker of the run, fault, its time

    @property
    def ok(self) -> bool:
        return not self.violations


def check(log: RunLog) -> Verdict:
    """Every violation of the rules in the module docstring, each one line naming the task."""
    violations: list[str] = []
    runs_of: dict[int, list[Run]] = defaultdict(list)
    for run in sorted(log.runs, key=lambda r: r.started):
        runs_of[run.task_id].append(run)
    duplicates = explained = lost = stale = 0
    by_kind: Counter[str] = Counter()
    explanations = []
    for task in log.tasks:
        runs = runs_of.get(task.task_id, [])
        kept = next((r for r in runs if r.run_id == task.result_run), None)
        if task.status != "succeeded":
            if not _failure_explained(task, runs, log):
                lost += 1
                violations.append(_lost(task, runs))
            continue
        if not runs:
            violations.append(f"task {task.task_id} ({task.label}) succeeded with no run logged")
            continue
        problem = _stale_write(task, runs, kept)
        if problem:
            stale += 1
            violations.append(problem)
        for run in runs:
            if run is kept:
                continue
            duplicates += 1
            fault = _explanation(run, runs, task, log)
            if fault is None:
                violations.append(_unexplained(task, run, runs))
            else:
                explained += 1
                by_kind[fault.kind] += 1
                explanations.append((task.task_id, run.worker, fault.kind, fault.at))
    if log.unledgered:
        violations.append(f"{log.unledgered} chaos task(s) in `tasks` without a ledger row")
    for orphan in log.orphans:
        if orphan.alive_at_end:
            violations.append(
                f"orphan {orphan.what} pid {orphan.pid} still alive after every supervisor stopped"
            )
        elif orphan.lifetime > log.orphan_limit:
            violations.append(
                f"orphan {orphan.what} pid {orphan.pid} outlived its supervisor by "
                f"{orphan.lifetime:.1f}s (limit {log.orphan_limit:g}s)"
            )
    for code in log.supervisor_exits:
        if code != 0:
            violations.append(f"a supervisor exited with status {code} on SIGTERM (expected 0)")
    if log.supervisor_deaths:
        violations.append(f"{log.supervisor_deaths} supervisor(s) exited without being killed")
    return Verdict(violations, duplicates, explained, dict(by_kind), lost, stale, explanations)


def _explanation(run: Run, runs: list[Run], task: TaskRow, log: RunLog) -> Fault | None:
    """The fault that explains why `run`'s outcome was not the one kept, or None."""
    if run.owning:
        later = [r.started for r in runs if r.owning and r.started > run.started]
        end = min(later) if later else (task.finished_at or float("inf"))
        start = run.started - CLAIM_SLACK
    else:
        start, end = run.started - STALE_WINDOW, run.started + CLAIM_SLACK

    def can(f: Fault) -> bool:
        return f.presumes_dead(log.rescue_after) or (not run.owning and f.kind in UNDOES_CLAIMS)

    candidates = [f for f in log.faults if f.hits(run) and start <= f.at <= end and can(f)]
    # The most specific one: a fault aimed at this worker over one that hit everybody.
    candidates.sort(key=lambda f: (f.db_wide, abs(f.at - run.started)))
    return candidates[0] if candidates else None


def _stale_write(task: TaskRow, runs: list[Run], kept: Run | None) -> str | None:
    owning = [r for r in runs if r.owning]
    name = f"task {task.task_id} ({task.label})"
    if task.locked_by is not None:
        return f"{name} is succeeded but still locked by {task.locked_by}"
    if kept is None:
        return f"{name}: its result names run {task.result_run}, which no run log holds"
    if not kept.owning:
        return (
            f"{name}: the row keeps the outcome of run {kept.run_id} on {kept.worker}, "
            f"which did not own the row when it started (owner then: {kept.owner}): a stale write"
        )
    if owning and owning[-1] is not kept:
        last = owning[-1]
        return (
            f"{name}: the row keeps the outcome of run {kept.run_id} on {kept.worker} "
            f"(attempt {kept.attempt}), but {last.worker} took the task over later "
            f"(attempt {last.attempt}): a stale writer overwrote the newer outcome"
        )
    return None


def _failure_explained(task: TaskRow, runs: list[Run], log: RunLog) -> bool:
    if task.status != "failed" or not runs:
        return False
    return _explanation(runs[-1], runs, task, log) is not None


def _lost(task: TaskRow, runs: list[Run]) -> str:
    name = f"task {task.task_id} ({task.label})"
    if task.status is None:
        return f"{name} is lost: its row is gone"
    if task.status == "failed":
        first = (task.error or "").strip().splitlines()[-1:] or ["no error text"]
        return f"{name} is lost: failed with no fault to explain it ({first[0]})"
    where = f" by {task.locked_by}" if task.locked_by else ""
    return f"{name} is lost: still {task.status}{where} after the drain ({len(runs)} run(s))"


def _unexplained(task: TaskRow, run: Run, runs: list[Run]) -> str:
    others = ", ".join(f"{r.worker} at {r.started:.2f}" for r in runs if r is not run)
    kind = "owned the row" if run.owning else f"did not own the row (owner: {run.owner})"
    return (
        f"task {task.task_id} ({task.label}) ran more than once with no fault to explain it: "
        f"run on {run.worker} (pid {run.pid}) at {run.started:.2f} {kind}; other runs: {others}"
    )
