"""The chaos run (issue 14, point 5): faults at random under a steady stream of tasks.

It makes its own throwaway server, PostgreSQL (tests/pgcluster.py) or with `--db mariadb`
MariaDB (tests/mariadbcluster.py): the restarts must not hit a shared server. It migrates it,
enqueues tasks at a steady rate (each enqueue commits a ledger row in the same transaction, so
"enqueued" is what the database holds), runs two `dbqueue work -c 2` supervisors, and every
few seconds injects one fault, dealt from a shuffled deck so each kind comes up once per round:

    kill-worker            SIGKILL one worker process
    kill-supervisor        SIGKILL one supervisor; restarted a second later (Restart=always)
    stop-worker            SIGSTOP one worker past --rescue-after, then SIGCONT
    terminate-connections  pg_terminate_backend (MariaDB: KILL) of every worker connection
    restart-fast           a clean restart (pg_ctl -m fast; MariaDB: SIGTERM)
    restart-immediate      a crash and recovery on start (pg_ctl -m immediate; MariaDB: SIGKILL)

Each fault is logged with its time and the tasks running on the victim then. At the end it
stops enqueuing, lets the workers drain, stops the supervisors with SIGTERM, and checks
(scripts/chaos_check.py) that nothing was lost, every duplicate run has a fault to explain
it, no outcome was overwritten by a stale writer, and no worker outlived its supervisor.
Exit status 1 on any violation. Logs, the fault list and summary.json go to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path[:0] = [str(SCRIPTS), str(ROOT)]

import chaos_check  # noqa: E402
import chaos_report  # noqa: E402
import chaos_tasks  # noqa: E402

import dbqueue  # noqa: E402
from dbqueue import config, database  # noqa: E402
from tests import mariadbcluster, pgcluster  # noqa: E402

KINDS = (
    "kill-worker",
    "kill-supervisor",
    "stop-worker",
    "terminate-connections",
    "restart-fast",
    "restart-immediate",
)
SUPERVISORS, CONCURRENCY = 2, 2
RESTART_SEC = 1.0  # how long "systemd" waits before starting a killed supervisor again
SECRET = "chaos-" + uuid.uuid4().hex + uuid.uuid4().hex
WORKER_APP = "dbqueue-chaos-worker"  # PGAPPNAME of every worker connection (and its tasks')
LISTENER_APP = "dbqueue-listener"
WORKER_USER = "chaos_worker"  # MariaDB: the workers' login, which terminate-connections kills

SIDE_TABLES = """
CREATE TABLE chaos_enqueued (label varchar(100) PRIMARY KEY, task_id bigint NOT NULL);
CREATE TABLE chaos_runs (
    run_id varchar(100) PRIMARY KEY, label varchar(100) NOT NULL, task_id bigint NOT NULL,
    attempt int, owner varchar(300), worker varchar(300) NOT NULL, pid int NOT NULL,
    started double precision NOT NULL, ended double precision
);
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=300, help="seconds of faults (default 300)")
    p.add_argument("--rate", type=float, default=8, help="tasks enqueued per second (default 8)")
    p.add_argument("--task-seconds", default="0.05:0.5", help="each task sleeps in lo:hi")
    p.add_argument("--fault-every", default="2:5", help="seconds between faults, lo:hi")
    p.add_argument("--rescue-after", type=float, default=5, help="the workers' --rescue-after")
    p.add_argument("--kinds", default=",".join(KINDS), help="fault kinds to inject")
    p.add_argument("--drain-timeout", type=float, default=180)
    p.add_argument("--orphan-limit", type=float, default=15, help="seconds an orphan may live")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--db", choices=["postgresql", "mariadb"], default="postgresql", help="the server to run"
    )
    p.add_argument("--out", default=None, help="directory for logs (default: a new temp dir)")
    args = p.parse_args(argv)
    for name in ("task_seconds", "fault_every"):
        lo, _, hi = getattr(args, name).partition(":")
        try:
            span = (float(lo), float(hi or lo))
        except ValueError:
            p.error(f"--{name.replace('_', '-')} takes lo:hi in seconds, e.g. 2:5")
        setattr(args, name, span)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(args.kinds) - set(KINDS)
    if unknown or not args.kinds:
        p.error(f"--kinds: unknown {sorted(unknown)}; choose from {', '.join(KINDS)}")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 30)
    return args


def epoch_seconds(stamp: Any) -> float:
    """A timestamp read by plain SQL as seconds since 1970: PostgreSQL's are aware, MariaDB's
    DATETIME(6) naive UTC."""
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.timezone.utc)
    return float(stamp.timestamp())


# -- the process table --------------------------------------------------------------------


def processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, command line) for every process now."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), fields[0], cmd)
    return table


def marked(pid: int, marker: bytes) -> bool:
    """Whether the process carries this run's CHAOS_RUN variable (a process of this run)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return marker in fh.read().split(b"\0")
    except OSError:
        return False


def what(cmd: str) -> str:
    return "resource tracker" if "resource_tracker" in cmd else "worker"


# -- the run ------------------------------------------------------------------------------


class Chaos:
    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.out = out
        self.rng = random.Random(args.seed)
        self.run_id = uuid.uuid4().hex[:12]
        self.marker = f"CHAOS_RUN={self.run_id}".encode()
        self.cluster: pgcluster.Cluster | mariadbcluster.Cluster
        if args.db == "postgresql":
            self.cluster = pgcluster.Cluster()
            with open(os.path.join(self.cluster.data, "postgresql.conf"), "a") as fh:
                fh.write("max_connections = 200\n")
            self.worker_url = self.cluster.url
        else:
            self.cluster = mariadbcluster.Cluster()  # max_connections 500
            url = sa.make_url(self.cluster.url).set(username=WORKER_USER)
            self.worker_url = url.render_as_string(hide_password=False)
        self.settings = config.Settings(database_url=self.cluster.url, secret_key=SECRET)
        self.admin = sa.create_engine(
            self.cluster.url,
            isolation_level="AUTOCOMMIT",
            pool_size=1,
            connect_args={"connect_timeout": 5},
        )
        self.sups: dict[int, subprocess.Popen[bytes]] = {}
        self.generation: dict[int, int] = {}
        self.all_sup_pids: set[int] = set()
        self.faults: list[chaos_check.Fault] = []
        self.orphans: dict[int, chaos_check.Orphan] = {}
        self.supervisor_deaths = 0
        self.restarting: set[int] = set()  # slots whose killed supervisor is about to restart
        self.enqueued = self.enqueue_errors = 0
        self.stop_enqueue = threading.Event()
        self.stop_watch = threading.Event()
        self._lock = threading.Lock()
        self.t0 = time.monotonic()
        self.fault_log = open(out / "faults.log", "w")

    # database --------------------------------------------------------------------------

    def query(self, sql: str, patience: float = 120, **params: Any) -> list[Any]:
        """One statement on the chaos process's own connection, through restarts. A list or
        tuple parameter is expanded (`id IN :ids`)."""
        stmt = sa.text(sql).bindparams(
            *(
                sa.bindparam(k, expanding=True)
                for k, v in params.items()
                if isinstance(v, (list, tuple))
            )
        )
        deadline = time.monotonic() + patience
        with self._lock:
            while True:
                try:
                    with self.admin.connect() as conn:
                        result = conn.execute(stmt, params)
                        return [tuple(r) for r in result] if result.returns_rows else []
                except sa.exc.OperationalError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    def setup(self) -> None:
        self.cluster.start()
        if self.args.db == "mariadb":  # the workers' own login (terminate-connections kills it)
            for statement in (
                f"CREATE USER '{WORKER_USER}'@'127.0.0.1'",
                f"GRANT ALL ON *.* TO '{WORKER_USER}'@'127.0.0.1'",
            ):
                self.query(statement)
        database.migrate(self.settings)
        for statement in SIDE_TABLES.split(";"):
            if statement.strip():
                self.query(statement)

    # supervisors -----------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("DBQUEUE_INLINE", None)
        env.update(
            DBQUEUE_DATABASE_URL=self.worker_url,
            DBQUEUE_SECRET_KEY=SECRET,
            PYTHONPATH=os.pathsep.join([str(SCRIPTS), str(ROOT), env.get("PYTHONPATH", "")]),
            PGAPPNAME=WORKER_APP,
            CHAOS_URL=self.worker_url,
            CHAOS_RUN=self.run_id,
        )
        return env

    def start_supervisor(self, slot: int) -> None:
        self.generation[slot] = self.generation.get(slot, 0) + 1
        log = open(self.out / f"supervisor-{slot}.log", "ab")
        log.write(f"==== supervisor {slot}, start {self.generation[slot]} ====\n".encode())
        log.flush()
        command = [sys.executable, "-m", "dbqueue", "--log-level", "INFO", "work"]
        command += ["--import", "chaos_tasks", "-c", str(CONCURRENCY)]
        command += ["--rescue-after", f"{self.args.rescue_after:g}"]
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C at the terminal reaches the chaos run only
        )
        log.close()
        self.sups[slot] = proc
        self.all_sup_pids.add(proc.pid)

    def restart_supervisor(self, slot: int) -> None:
        self.start_supervisor(slot)
        self.restarting.discard(slot)

    def keep_supervisors(self) -> None:
        """A supervisor that died on its own is a finding; restart it as systemd would."""
        for slot, proc in list(self.sups.items()):
            if slot not in self.restarting and proc.poll() is not None:
                self.supervisor_deaths += 1
                self.say(f"supervisor {slot} (pid {proc.pid}) exited by itself: {proc.returncode}")
                time.sleep(RESTART_SEC)
                self.start_supervisor(slot)

    def workers_of(self, slot: int) -> list[int]:
        pid = self.sups[slot].pid
        table = processes()
        return sorted(
            p
            for p, (ppid, state, cmd) in table.items()
            if ppid == pid and state != "Z" and what(cmd) == "worker"
        )

    def worker_names(self) -> dict[int, str]:
        return {pid: name for name, pid in self.query("SELECT name, pid FROM workers")}

    def running_on(self, names: list[str] | None) -> list[int]:
        if names is None:
            rows = self.query("SELECT id FROM tasks WHERE status = 'running' ORDER BY id")
        else:
            if not names:
                return []
            rows = self.query(
                "SELECT id FROM tasks WHERE status = 'running' AND locked_by IN :names ORDER BY id",
                names=list(names),
            )
        return [r[0] for r in rows]

    def wait_workers(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.worker_names()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} workers did not register in {timeout:g}s")
            time.sleep(0.2)

    # background threads ----------------------------------------------------------------

    def enqueue_loop(self) -> None:
        """A steady stream: task and ledger row commit together, so the ledger is the truth
        even when a commit's reply is lost in a restart."""
        rng = random.Random(self.args.seed + 1)
        engine = self.settings.get_engine()
        lo, hi = self.args.task_seconds
        n, start = 0, time.monotonic()
        while not self.stop_enqueue.is_set():
            due = start + n / self.args.rate
            if due < time.monotonic() - 2:  # after an outage: steady again, no burst
                start, n = time.monotonic(), 0
                continue
            if self.stop_enqueue.wait(max(0.0, due - time.monotonic())):
                break
            n += 1
            label = f"{self.run_id}-{self.enqueued + self.enqueue_errors}"
            try:
                with engine.begin() as conn:
                    task = dbqueue.enqueue(
                        chaos_tasks.run,
                        args=(label, round(rng.uniform(lo, hi), 3)),
                        connection=conn,
                        settings=self.settings,
                    )
                    conn.execute(
                        sa.text("INSERT INTO chaos_enqueued (label, task_id) VALUES (:l, :t)"),
                        {"l": label, "t": task.id},
                    )
                self.enqueued += 1
            except Exception:  # the server is restarting: the ledger says what committed
                self.enqueue_errors += 1
                time.sleep(0.2)
        engine.dispose()

    def watch_orphans(self) -> None:
        """Every chaos process whose parent is not a live supervisor, and for how long."""
        while not self.stop_watch.wait(0.25):
            self.scan_orphans(at_end=False)

    def scan_orphans(self, at_end: bool) -> list[int]:
        table = processes()
        live = {p for p in self.all_sup_pids if p in table and table[p][1] != "Z"}
        found = []
        now = time.monotonic()
        for pid, (ppid, state, cmd) in table.items():
            if state == "Z" or pid in self.all_sup_pids or ppid in live:
                continue
            if ("multiprocessing" not in cmd and "dbqueue" not in cmd) or not marked(
                pid, self.marker
            ):
                continue
            found.append(pid)
            old = self.orphans.get(pid)
            first = old.first_seen if old else now
            self.orphans[pid] = chaos_check.Orphan(pid, what(cmd), first, now, at_end)
        return found

    # faults ----------------------------------------------------------------------------

    def say(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime())
        text = f"[{stamp} +{time.monotonic() - self.t0:6.1f}s] {line}"
        print(text, flush=True)
        self.fault_log.write(text + "\n")
        self.fault_log.flush()

    def pick_worker(self) -> tuple[int, str | None] | None:
        names = self.worker_names()
        pids = [p for slot in self.sups for p in self.workers_of(slot)]
        registered = [p for p in pids if p in names]
        if not (registered or pids):
            return None
        pid = self.rng.choice(registered or pids)
        return pid, names.get(pid)

    def wait_released(
        self, names: list[str], ids: list[int], t0: float, until: float
    ) -> float | None:
        """Seconds until the victims held none of `ids` (rescued, released or finished)."""
        if not ids or not names:
            return None
        while time.monotonic() < until:
            held = self.query(
                "SELECT count(*) FROM tasks WHERE id IN :ids AND status = 'running' "
                "AND locked_by IN :names",
                ids=list(ids),
                names=list(names),
            )[0][0]
            if held == 0:
                return time.monotonic() - t0
            time.sleep(0.05)
        return None

    def inject(self, kind: str) -> chaos_check.Fault | None:
        if kind in ("kill-worker", "stop-worker"):
            picked = self.pick_worker()
            if picked is None:
                return None
            pid, name = picked
            names = [name] if name else []
            fault = chaos_check.Fault(kind, 0, frozenset(names), frozenset({pid}))
            fault.hit = tuple(self.running_on(names)) if names else ()
            fault.note = f"{name or 'unregistered worker'} (pid {pid})"
            signum = signal.SIGKILL if kind == "kill-worker" else signal.SIGSTOP
            fault.at, t0 = time.time(), time.monotonic()
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                return None
            if kind == "kill-worker":
                fault.release_delay = self.wait_released(names, list(fault.hit), t0, t0 + 30)
                return fault
            interval = max(0.2, self.args.rescue_after / 5)
            paused = self.args.rescue_after + 2 * interval + 1
            fault.release_delay = self.wait_released(names, list(fault.hit), t0, t0 + paused)
            time.sleep(max(0.0, t0 + paused - time.monotonic()))
            os.kill(pid, signal.SIGCONT)
            fault.note += f", paused {paused:.1f}s"
            if fault.hit and fault.release_delay is None:
                fault.note += ", NOT rescued while paused"
            return fault
        if kind == "kill-supervisor":
            slots = sorted(set(self.sups) - self.restarting)
            if not slots:
                return None
            slot = self.rng.choice(slots)
            proc = self.sups[slot]
            kids = self.workers_of(slot)
            names = sorted(n for p, n in self.worker_names().items() if p in kids)
            fault = chaos_check.Fault(kind, 0, frozenset(names), frozenset(kids))
            fault.hit = tuple(self.running_on(names))
            fault.at, t0 = time.time(), time.monotonic()
            self.restarting.add(slot)
            proc.kill()
            proc.wait()
            fault.note = f"supervisor {slot} (pid {proc.pid}), children {kids}"
            restart = threading.Timer(RESTART_SEC, self.restart_supervisor, (slot,))
            restart.start()
            fault.release_delay = self.wait_released(names, list(fault.hit), t0, t0 + 30)
            restart.join()
            return fault
        fault = chaos_check.Fault(kind, 0, db_wide=True)
        fault.hit = tuple(self.running_on(None))
        fault.at, t0 = time.time(), time.monotonic()
        if kind == "terminate-connections":
            fault.note = f"{self.terminate_worker_connections()} connections terminated"
        else:
            self.cluster.restart(kind.removeprefix("restart-"))
            fault.outage = time.monotonic() - t0
            fault.note = f"server back after {fault.outage:.1f}s"
        return fault

    def terminate_worker_connections(self) -> int:
        """End every connection of the workers and their tasks, as an admin would."""
        if self.args.db == "postgresql":
            return int(
                self.query(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name IN :apps AND pid <> pg_backend_pid()",
                    apps=[WORKER_APP, LISTENER_APP],
                )[0][0]
            )
        ids = self.query(
            "SELECT id FROM information_schema.processlist WHERE user = :user", user=WORKER_USER
        )
        killed = 0
        for (connection_id,) in ids:
            try:
                self.query(f"KILL CONNECTION {int(connection_id)}", patience=0)
                killed += 1
            except sa.exc.DBAPIError:  # it ended meanwhile
                pass
        return killed

    def log_fault(self, fault: chaos_check.Fault) -> None:
        hit = ", ".join(map(str, fault.hit)) or "none"
        released = (
            f"; victim's tasks released after {fault.release_delay:.2f}s"
            if fault.release_delay is not None
            else ""
        )
        at = time.strftime("%H:%M:%S", time.localtime(fault.at)) + f"{fault.at % 1:.3f}"[1:]
        self.say(f"{fault.kind} at {at}: {fault.note}; running then: {hit}{released}")

    # phases ----------------------------------------------------------------------------

    def run(self) -> int:
        args = self.args
        self.say(f"cluster {self.cluster.dir} on port {self.cluster.port}; logs in {self.out}")
        self.setup()
        for slot in range(SUPERVISORS):
            self.start_supervisor(slot)
        self.wait_workers(SUPERVISORS * CONCURRENCY)
        enqueuer = threading.Thread(target=self.enqueue_loop, name="enqueue", daemon=True)
        watcher = threading.Thread(target=self.watch_orphans, name="orphans", daemon=True)
        enqueuer.start()
        watcher.start()
        started = time.monotonic()
        deadline = started + args.duration
        deck: list[str] = []
        self.say(f"faults for {args.duration:g}s, seed {args.seed}")
        while time.monotonic() < deadline:
            self.keep_supervisors()
            time.sleep(
                min(self.rng.uniform(*args.fault_every), max(0, deadline - time.monotonic()))
            )
            if time.monotonic() >= deadline:
                break
            if not deck:
                deck = list(args.kinds)
                self.rng.shuffle(deck)
            fault = self.inject(deck.pop())
            if fault is not None:
                self.faults.append(fault)
                self.log_fault(fault)
        self.stop_enqueue.set()
        enqueuer.join()
        stopped = time.monotonic()
        drained = self.drain()
        drain_seconds = time.monotonic() - stopped
        exits = self.stop_supervisors()
        self.stop_watch.set()
        watcher.join()
        self.wait_no_orphans()
        log = self.collect(exits)
        verdict = chaos_check.check(log)
        first, last = self.query(
            "SELECT min(t.created_at), max(t.finished_at) "
            "FROM tasks t JOIN chaos_enqueued e ON e.task_id = t.id"
        )[0]
        span = (last - first).total_seconds() if first is not None and last is not None else None
        figures = chaos_report.figures(
            log,
            verdict,
            seconds=time.monotonic() - started,
            seed=args.seed,
            enqueue_errors=self.enqueue_errors,
            drained=drained,
            drain_seconds=drain_seconds,
            span=span,
            worker_logs="".join(
                p.read_text(errors="replace") for p in self.out.glob("supervisor-*.log")
            ),
        )
        setup = f"{SUPERVISORS} supervisors x {CONCURRENCY} workers, logs {self.out}"
        print(chaos_report.summary(log, verdict, figures, args.kinds, setup), flush=True)
        (self.out / "summary.json").write_text(
            json.dumps(
                {
                    "figures": figures,
                    "violations": verdict.violations,
                    "faults": [dataclasses.asdict(f) for f in self.faults],
                    "explained_duplicates": verdict.explanations,
                    "orphans": [dataclasses.asdict(o) for o in log.orphans],
                    "runs": [dataclasses.asdict(r) for r in log.runs],
                    "tasks": [dataclasses.asdict(t) for t in log.tasks],
                },
                indent=2,
                default=sorted,
            )
        )
        return 0 if verdict.ok else 1

    def drain(self) -> bool:
        self.say("enqueuing stopped; draining")
        deadline = time.monotonic() + self.args.drain_timeout
        while time.monotonic() < deadline:
            self.keep_supervisors()
            left = self.query(
                "SELECT count(*) FROM tasks t JOIN chaos_enqueued e ON e.task_id = t.id "
                "WHERE t.status IN ('queued', 'running')"
            )[0][0]
            if left == 0:
                return True
            time.sleep(0.5)
        return False

    def stop_supervisors(self) -> list[int]:
        for proc in self.sups.values():
            proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in self.sups.values():
            try:
                codes.append(proc.wait(timeout=90))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        self.say(f"supervisors stopped (exit status {codes})")
        return codes

    def wait_no_orphans(self, timeout: float = 10) -> list[int]:
        """Every process of the run should be gone soon after its supervisor: the rest are
        orphans alive at the end (then killed, so nothing outlives the chaos run)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.scan_orphans(at_end=time.monotonic() >= deadline)
            if not found or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return found

    def collect(self, exits: list[int]) -> chaos_check.RunLog:
        rows = self.query(
            "SELECT e.label, e.task_id, t.status, t.attempts, t.locked_by, t.finished_at, t.error "
            "FROM chaos_enqueued e LEFT JOIN tasks t ON t.id = e.task_id ORDER BY e.task_id"
        )
        tasks = []
        for label, task_id, status, attempts, locked_by, finished_at, error in rows:
            finished = None if finished_at is None else epoch_seconds(finished_at)
            result_run = None
            if status == "succeeded":
                try:
                    result = dbqueue.Task.get(task_id, settings=self.settings).result
                    result_run = result["run_id"]
                except Exception as exc:
                    error = f"result unreadable: {exc}"
            tasks.append(
                chaos_check.TaskRow(
                    task_id, label, status, attempts or 0, locked_by, finished, result_run, error
                )
            )
        runs = [
            chaos_check.Run(*r)
            for r in self.query(
                "SELECT run_id, task_id, worker, pid, started, owner, attempt, ended "
                "FROM chaos_runs"
            )
        ]
        unledgered = self.query(
            "SELECT count(*) FROM tasks t WHERE t.handler = 'chaos_tasks:run' "
            "AND NOT EXISTS (SELECT 1 FROM chaos_enqueued e WHERE e.task_id = t.id)"
        )[0][0]
        return chaos_check.RunLog(
            tasks,
            runs,
            self.faults,
            sorted(self.orphans.values(), key=lambda o: o.first_seen),
            exits,
            unledgered,
            self.supervisor_deaths,
            self.args.orphan_limit,
            self.args.rescue_after,
        )

    def cleanup(self) -> None:
        for proc in self.sups.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid in self.scan_orphans(at_end=True):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log = Path(self.cluster.log)
        if log.exists():
            shutil.copy(log, self.out / f"{self.args.db}.log")
        self.admin.dispose()
        self.cluster.destroy()
        self.fault_log.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dbqueue-chaos-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        chaos = Chaos(args, out)
    except (RuntimeError, subprocess.CalledProcessError) as exc:  # no initdb, or it failed
        detail = (
            exc.stderr.decode(errors="replace").strip()
            if isinstance(exc, subprocess.CalledProcessError) and exc.stderr
            else ""
        )
        print(
            f"scripts/chaos: cannot make a throwaway {args.db} server: {exc} {detail}".rstrip(),
            file=sys.stderr,
        )
        return 2
    try:
        return chaos.run()
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        chaos.cleanup()


if __name__ == "__main__":
    sys.exit(main())
