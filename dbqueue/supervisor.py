"""Several worker processes: start them, restart a crashed one, recycle, stop them all.

The supervisor is the process boundary the worker relies on: a task that segfaults, calls
os._exit or is stopped by the hard timeout takes down only its child, whose tasks the
supervisor rescues at once (it saw the death through waitpid) before starting a new child.
Children are started with the `spawn` method, so none inherits a database connection.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

from dbqueue import config, database, errors, identity, logs, store, worker

log = logging.getLogger("dbqueue.supervisor")

EXIT_ZOMBIE = 3
EXIT_RECYCLE = 4
EXIT_ORPHANED = 5
CRASH_WINDOW = 60.0  # seconds over which crashes count towards the restart backoff


@dataclasses.dataclass
class ChildSpec:
    """Everything a child needs, picklable: it rebuilds its own Settings and Engine."""

    database_url: str
    queues: list[str] | None = None
    imports: list[str] = dataclasses.field(default_factory=list)
    burst: bool = False
    sleep_delay: float = 1.0
    rescue_after: float = 15.0
    default_timeout: float | None = None
    max_tasks: int | None = None
    max_memory_mb: float | None = None
    threads: int = 1
    async_concurrency: int | None = None  # None: DBQUEUE_ASYNC_CONCURRENCY or the default
    grace: float = 30.0  # the supervisor's: coroutines are cancelled just before it ends
    log_level: str = "INFO"
    log_format: str = "text"
    sys_path: list[str] = dataclasses.field(default_factory=lambda: list(sys.path))


def import_modules(modules: Sequence[str]) -> None:
    """Import the application's task modules (`--import`), from the current directory too."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            if exc.name is not None and module.startswith(exc.name):
                raise errors.ConfigurationError(
                    f"--import {module}: no module named {exc.name!r} (run from your project "
                    "directory, or set PYTHONPATH)"
                ) from exc
            raise errors.ConfigurationError(
                f"--import {module} failed: {type(exc).__name__}: {exc} "
                f"(python -c 'import {module}' shows the traceback)"
            ) from exc
        except Exception as exc:
            raise errors.ConfigurationError(
                f"--import {module} failed: {type(exc).__name__}: {exc} "
                f"(python -c 'import {module}' shows the traceback)"
            ) from exc


def rss_mb() -> float:
    """Resident memory of this process now (not the peak), in MiB."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1024 / 1024
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def die_with_parent(supervisor_pid: int) -> None:
    """Ask Linux to send this child SIGTERM when its supervisor dies (even by SIGKILL), so no
    orphaned worker keeps claiming; then exit at once if the supervisor died before that.

    The death signal only covers deaths after it is set, and a spawned child takes a second
    or more to get here: a supervisor killed meanwhile has already left this child with
    another parent. The worker's heartbeat thread also compares getppid() with
    `supervisor_pid`, which covers systems without prctl.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the getppid() check in the heartbeat thread covers it
    if os.getppid() != supervisor_pid:
        log.error(
            "supervisor %s is gone before worker %s started: exiting",
            supervisor_pid,
            os.getpid(),
            extra={"event": "orphaned"},
        )
        sys.exit(EXIT_ORPHANED)


def child_main(
    spec: ChildSpec, name: str, progress: Any, supervisor_pid: int, rescuer: bool = True
) -> None:
    """Entry point of a worker process; `rescuer`: it looks for dead workers (one child of
    each supervisor does: worker.Worker's rescuer)."""
    sys.path[:] = spec.sys_path
    logs.setup(spec.log_level, spec.log_format)
    die_with_parent(supervisor_pid)
    import_modules(spec.imports)
    settings = config.Settings(database_url=spec.database_url)
    config.configure(database_url=spec.database_url)
    last = worker.Summary()
    reporting = threading.Lock()  # the heart thread reports the task that ends the process

    def report(summary: worker.Summary) -> None:
        with reporting:
            _report(summary)

    def _report(summary: worker.Summary) -> None:
        if progress is not None and not w.stopping.is_set():
            try:
                progress.send(
                    (
                        summary.succeeded - last.succeeded,
                        summary.retried - last.retried,
                        summary.failed - last.failed,
                    )
                )
            except OSError as exc:  # the supervisor's end of the pipe is closed: it is gone
                log.error(
                    "supervisor %s is gone (progress pipe: %s): worker %s stops",
                    supervisor_pid,
                    exc.strerror or exc,
                    name,
                    extra={"event": "orphaned"},
                )
                w.stop()
        last.succeeded, last.retried, last.failed = (
            summary.succeeded,
            summary.retried,
            summary.failed,
        )
        if spec.max_memory_mb and rss_mb() > spec.max_memory_mb:
            log.info(
                "worker %s uses %.0f MiB > %.0f MiB: recycling",
                name,
                rss_mb(),
                spec.max_memory_mb,
                extra={"event": "recycle"},
            )
            w.recycle = True
            w.stop()

    w = worker.Worker(
        settings,
        spec.queues,
        name=name,
        sleep_delay=spec.sleep_delay,
        rescue_after=spec.rescue_after,
        default_timeout=spec.default_timeout,
        max_tasks=spec.max_tasks,
        on_progress=report,
        parent_pid=supervisor_pid,
        threads=spec.threads,
        async_concurrency=spec.async_concurrency,
        grace=spec.grace,
        rescuer=rescuer,
    )
    w.install_signal_handlers()
    if os.getppid() != supervisor_pid:  # died while the task modules were imported
        log.error(
            "supervisor %s is gone: worker %s exits",
            supervisor_pid,
            name,
            extra={"event": "orphaned"},
        )
        sys.exit(EXIT_ORPHANED)
    try:
        if spec.burst:
            w.work_off()
        else:
            w.work()
    except sa.exc.DBAPIError as exc:  # one readable line (what to do) above the traceback
        log.error("worker %s stops: %s", name, database.describe_error(settings, exc))
        raise
    if w.zombie:
        sys.exit(EXIT_ZOMBIE)
    if getattr(w, "recycle", False) or (
        spec.max_tasks is not None and w.summary.done >= spec.max_tasks
    ):
        sys.exit(EXIT_RECYCLE)


def exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "worker process vanished while running the task"
    if exitcode < 0:
        try:
            signame = signal.Signals(-exitcode).name
        except ValueError:
            signame = "unknown"
        return f"worker process exited with signal {-exitcode} ({signame}) while running the task"
    return f"worker process exited with status {exitcode} while running the task"


class Supervisor:
    """Runs `concurrency` children; restarts crashes; stops them all on SIGTERM/SIGINT."""

    def __init__(
        self,
        spec: ChildSpec,
        concurrency: int = 1,
        grace: float = 30.0,
        on_progress: Callable[[worker.Summary], None] | None = None,
        reload_dirs: Sequence[str] | None = None,
    ) -> None:
        self.spec = spec
        self.reload_dirs = list(reload_dirs) if reload_dirs else None
        self._reload_requested = False
        self._reload_pending = False  # children were sent SIGTERM for a reload
        self.concurrency = max(1, concurrency)
        self.grace = grace
        self.on_progress = on_progress
        self.context = multiprocessing.get_context("spawn")
        # One pipe per child, never a shared Queue: a child SIGKILLed while writing to a shared
        # Queue leaves its lock held, and every other process then blocks on it forever.
        self.pipes: dict[str, Any] = {}
        self.children: dict[str, multiprocessing.process.BaseProcess] = {}
        self.summary = worker.Summary()
        self.stopping = False
        self.forced = False
        self.crashes = 0
        self._crash_times: list[float] = []  # monotonic times of recent crashes (backoff)
        self._restarts: list[float] = []  # monotonic times at which to start a child again
        self.settings = config.Settings(database_url=spec.database_url)
        self._rescuer: str | None = None  # the child that looks for dead workers

    def _start_child(self) -> None:
        """Start a child; the first one, and the one started after the rescuer ended, takes
        the rescuer role, so one child per supervisor scans for dead workers (this
        supervisor's own children are rescued by _reap the moment they die)."""
        name = identity.worker_name()
        rescuer = self._rescuer not in self.children
        if rescuer:
            self._rescuer = name
        reader, writer = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=child_main,
            args=(self.spec, name, writer, os.getpid(), rescuer),
            name=name,
            daemon=False,
        )
        process.start()
        writer.close()
        self.children[name] = process
        self.pipes[name] = reader

    def _signals(self) -> None:
        def stop(signum: int, frame: Any) -> None:
            if self.stopping and signum == signal.SIGINT:
                log.warning("second interrupt: killing workers now")
                self.forced = True
                for process in self.children.values():
                    if process.pid:
                        os.kill(process.pid, signal.SIGKILL)
                return
            self.stopping = True
            self.stop_deadline = time.monotonic() + self.grace
            for process in self.children.values():
                if process.pid and process.is_alive():
                    os.kill(process.pid, signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def run(self) -> worker.Summary:
        """Supervise until stopped (or, in burst mode, until every child drained and exited)."""
        self._signals()
        reloader = None
        if self.reload_dirs:
            from dbqueue import reload

            reloader = reload.Reloader(self.reload_dirs, self._request_reload)
            reloader.start()
        for _ in range(self.concurrency):
            self._start_child()
        while self.children or (self._restarts and not self.stopping):
            self._drain_progress(timeout=0.2)
            self._start_due()
            if self._reload_requested and not self.stopping:
                self._reload_requested = False
                self._reload_pending = True
                for process in self.children.values():  # graceful: they are started again
                    if process.pid and process.is_alive():
                        os.kill(process.pid, signal.SIGTERM)
            for name, process in list(self.children.items()):
                if process.is_alive():
                    continue
                process.join()
                del self.children[name]
                self._reap(name, process.exitcode)
            if self.stopping and time.monotonic() > self.stop_deadline:
                for name, process in self.children.items():
                    log.warning("worker %s did not stop within %.0fs: killing it", name, self.grace)
                    if process.pid:
                        os.kill(process.pid, signal.SIGKILL)
                self.stop_deadline = float("inf")
        if reloader is not None:
            reloader.stop()
        for _ in range(50):  # every child has exited: read what their pipes still hold
            if not self.pipes:
                break
            self._drain_progress(timeout=0.1)
        return self.summary

    def _request_reload(self, paths: list[str]) -> None:
        self._reload_requested = True  # read by run()'s loop, which owns the children

    def _start_due(self) -> None:
        """Start the children whose crash backoff has passed (never sleeping in the loop:
        the other children's deaths and progress are still watched meanwhile)."""
        now = time.monotonic()
        due = [t for t in self._restarts if t <= now]
        if not due or self.stopping:
            return
        self._restarts = [t for t in self._restarts if t > now]
        for _ in due:
            self._start_child()

    def _backoff(self) -> float:
        """Seconds before restarting a crashed child: doubling with the crashes of the last
        minute (0.2 s, 0.4 s ... 5 s), so a poison task cannot make a restart loop spin, and
        back to short once the crashes stop."""
        now = time.monotonic()
        self._crash_times = [t for t in self._crash_times if now - t < CRASH_WINDOW]
        self._crash_times.append(now)
        return min(5.0, 0.1 * 2.0 ** min(len(self._crash_times), 6))

    def _reap(self, name: str, exitcode: int | None) -> None:
        if exitcode == -signal.SIGTERM and (self.stopping or self._reload_pending):
            # stopped while it was still starting (before its SIGTERM handler): not a crash
            log.info("worker %s stopped before it started", name, extra={"worker": name})
            exitcode = 0
        crashed = exitcode not in (0, EXIT_RECYCLE)
        if crashed:
            rescued = self._rescue(name, exit_reason(exitcode))
            log.warning(
                "worker %s exited (%s); rescued tasks %s",
                name,
                exit_reason(exitcode).replace(" while running the task", ""),
                rescued,
                extra={"event": "worker_exited", "worker": name},
            )
            self.crashes += 1
        if self.stopping:
            return
        if self.spec.burst and exitcode == 0:
            return
        if crashed:
            self._restarts.append(time.monotonic() + self._backoff())
            return
        self._start_child()

    def _close_pipe(self, reader: Any) -> None:
        for name, pipe in list(self.pipes.items()):
            if pipe is reader:
                del self.pipes[name]
        reader.close()

    def _rescue(self, name: str, reason: str) -> list[int]:
        try:
            with self.settings.get_engine().begin() as conn:
                store.limit_idle(conn, self.spec.rescue_after / 3)
                ids = store.rescue(conn, [name], reason)
                store.remove_workers(conn, [name])
            return ids
        except Exception as exc:  # the heartbeat rescue will do it once the database is back
            log.error(
                "could not rescue tasks of %s now (%s); a live worker's heartbeat will",
                name,
                database.describe_error(self.settings, exc),
                extra={"event": "rescue_deferred", "worker": name},
            )
            return []

    def _drain_progress(self, timeout: float) -> None:
        changed = False
        readers = list(self.pipes.values())
        ready = multiprocessing.connection.wait(readers, timeout) if readers else []
        if not readers:
            time.sleep(timeout)
        for reader in ready:
            assert isinstance(reader, multiprocessing.connection.Connection)
            try:
                while reader.poll():
                    s, r, f = reader.recv()
                    self.summary.succeeded += s
                    self.summary.retried += r
                    self.summary.failed += f
                    changed = True
            except (EOFError, OSError):  # the child exited: its pipe is done
                self._close_pipe(reader)
        if changed and self.on_progress is not None:
            self.on_progress(self.summary)
