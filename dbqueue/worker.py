"""The worker loop: claim -> execute -> record, with heartbeats, rescue and signals.

    work()        until stopped (SIGTERM/SIGINT), sleeping when idle
    work_off()    until nothing is ready, then return a Summary
    run_batch()   one claim, its tasks run one by one, their outcomes recorded together

A heartbeat thread with its own connection stamps `workers`, rescues tasks of dead workers
(in the worker holding the rescuer role: one per supervisor, each standalone worker), and
turns this worker into one that stops claiming when its heartbeats fail for longer than
`rescue_after` (it may have been declared dead). No transaction is ever held while a task
runs. SQL lives in store.py; running one task lives in executor.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import sqlalchemy as sa

from dbqueue import (
    config,
    control,
    database,
    engines,
    errors,
    executor,
    hooks,
    identity,
    limits,
    listener,
    logs,
    store,
)

# A name, not the module: `dbqueue.periodic` is the decorator once the package is imported.
from dbqueue.periodic import Scheduler
from dbqueue.schema import Status

log = logging.getLogger("dbqueue.worker")

# At most this many tasks per claim. 100 made each of 32 claimers on 2 cores pay the claim's
# contention for every 100 tasks (PostgreSQL's CPU per task doubled); 500 measured 0.83-0.97x of
# the 2-process drain with 32 processes against 0.54-0.74x in A/B pairs (docs/performance.md).
MAX_BATCH = 500
# ... and at most about this many payload bytes: a claim of 500 tasks of a megabyte each would
# hold 500 MB in the worker; the average payload of the last claims bounds the next one.
BATCH_BYTES = 16 * 1024 * 1024
BATCH_WINDOW = 0.05  # seconds of expected work claimed at once
BATCH_GROWTH = 8  # a claim asks for at most this many times the last one's limit
RECORD_EVERY = 0.5  # seconds a finished outcome may wait for its batch
PROBE_INTERVAL = 1.0  # seconds between checks of local pids, paused queues, cancel requests
CANCEL_GRACE = 2.0  # seconds a task asked to stop gets before its process is ended
CANCEL_SIGNAL = getattr(signal, "SIGUSR2", signal.SIGTERM)


@dataclasses.dataclass
class Summary:
    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    lost: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.succeeded + self.retried + self.failed

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def count(self, outcome: store.Outcome) -> None:
        if outcome.status is Status.SUCCEEDED:
            self.succeeded += 1
        elif outcome.status is Status.QUEUED:
            self.retried += 1
        else:
            self.failed += 1


class Worker:
    """One worker process's loop. Configuration is passed in, never read from globals."""

    def __init__(
        self,
        settings: config.Settings,
        queues: Sequence[str] | None = None,
        *,
        name: str | None = None,
        sleep_delay: float = 1.0,
        rescue_after: float = 15.0,
        default_timeout: float | None = None,
        max_batch: int = MAX_BATCH,
        max_tasks: int | None = None,
        on_progress: Callable[[Summary], None] | None = None,
        parent_pid: int | None = None,
        threads: int = 1,
        listen: bool = True,
        async_concurrency: int | None = None,
        grace: float = 30.0,
        rescuer: bool = True,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        if async_concurrency is None:
            async_concurrency = settings.async_concurrency
        if async_concurrency < 1:
            raise ValueError(f"async_concurrency must be at least 1, not {async_concurrency}")
        self.settings = settings
        self.queues = list(queues) if queues else None
        self.name = name or identity.worker_name()
        self.sleep_delay = sleep_delay
        self.rescue_after = rescue_after
        self.default_timeout = default_timeout
        self.max_batch = max_batch
        self.max_tasks = max_tasks
        self.on_progress = on_progress
        self.parent_pid = parent_pid
        # Looks for dead workers (stale heartbeats, vanished local pids, orphaned tasks) on
        # every beat and second. A supervisor gives the role to one of its children: the
        # others would repeat the same scans (measured: the heart's reads were ~5 ms of CPU
        # per worker per second, 8% of the machine with 32 workers on 2 cores).
        self.rescuer = rescuer
        self.engine = settings.get_engine()
        self.summary = Summary()
        self.stopping = threading.Event()
        self.wakeup = threading.Event()
        self.zombie = False
        self.recycle = False
        self._claim_uncertain = False
        # Seconds per task, None until a task has run (then the first claim is of one task);
        # each claim may ask for at most BATCH_GROWTH times the last one (batch_size).
        self._avg_duration: float | None = None
        self._avg_payload: float | None = None  # bytes per task of the last claims (BATCH_BYTES)
        self._last_limit = 1
        self._heart: Heart | None = None
        self.registered = False  # has had a row in `workers`: then claims only while it has
        self.paused: frozenset[str] = frozenset()  # read every second by the heart
        self.capped: frozenset[str] = frozenset()  # queues with a max_concurrency, likewise
        self.limited_waiting = False  # tasks with a concurrency_key queued in its queues
        self._blocked = False  # the last claim was limited and took nothing
        self._executing: dict[int, tuple[int, Any]] = {}  # task id -> (thread, row) running
        self._cancel: dict[int, float] = {}  # task id -> monotonic time it was asked to stop
        self._batch: set[int] = set()  # ids of the batch being run (claimed, not recorded)
        self.scheduler = Scheduler(settings, min(1.0, max(sleep_delay, 0.1)))
        self.threads = threads
        self.listen = listen and settings.notify
        self.listener: listener.Listener | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self._conn: sa.Connection | None = None  # autocommit statements on PostgreSQL
        self._running: dict[futures.Future[store.Outcome], int] = {}  # --threads: future -> id
        self.async_concurrency = async_concurrency
        self.grace = grace  # seconds coroutines get after SIGTERM before they are cancelled
        self._loop: Any = None  # eventloop.EventLoop, started with the first async task
        self._async_seen = False  # the last claim held async tasks: claim for the loop
        self._stop_at: float | None = None  # monotonic time of stop()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Register in `workers` and start heartbeating (retrying while the database is down)."""
        self._with_db_retry(lambda: self._transaction(self._register), "register")
        self._heart = Heart(self)
        self._heart.start()
        log.info(
            "worker %s started (queues: %s%s)",
            self.name,
            ",".join(self.queues or ["*"]),
            "; rescuer: looks for dead workers" if self.rescuer else "",
            extra={"event": "worker_started", "worker": self.name, "rescuer": self.rescuer},
        )
        hooks.fire("worker_started", self)

    def _register(self, conn: sa.Connection) -> None:
        store.register_worker(
            conn, self.name, socket.gethostname(), os.getpid(), self.queues, identity.host_id()
        )
        self.registered = True
        self.read_controls(conn)  # before the first claim
        # Tasks of workers that died are queued again before this one's first claim: they
        # keep their place in the queue instead of waiting for the first heartbeat, after
        # the newer tasks claimed meanwhile (or for the next worker: `workoff` had exited).
        rescue(conn, self.rescue_after)

    def read_controls(self, conn: sa.Connection) -> None:
        """Paused and capped queues, and whether tasks with a key wait in this worker's
        queues: what decides which claim it makes (read by the heart every second)."""
        settings = control.read_settings(conn)
        self.paused = frozenset(s.queue for s in settings if s.paused)
        self.capped = frozenset(s.queue for s in settings if s.max_concurrency is not None)
        self.limited_waiting = limits.limited_waiting(conn, self.queues)

    def stop(self) -> None:
        """Stop claiming; the running task finishes, the rest of its batch is released."""
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self.stopping.set()
        self.wakeup.set()

    def shutdown(self) -> None:
        hooks.fire("worker_stopping", self)
        if self._heart is not None:
            self._heart.stop()
        try:
            self._transaction(lambda c: store.unregister_worker(c, self.name))
        except sa.exc.DBAPIError:
            log.warning("could not unregister %s; the rescue will remove it", self.name)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: stop gracefully; a second SIGINT exits at once (rescue recovers)."""

        def graceful(signum: int, frame: Any) -> None:
            if self.stopping.is_set() and signum == signal.SIGINT:
                log.warning("second interrupt: exiting now; running tasks will be rescued")
                os._exit(130)
            log.info(
                "%s received: finishing running tasks, then exiting",
                signal.Signals(signum).name,
                extra={"event": "stopping"},
            )
            self.stop()

        signal.signal(signal.SIGTERM, graceful)
        signal.signal(signal.SIGINT, graceful)
        signal.signal(CANCEL_SIGNAL, self._cancel_here)

    def _cancel_here(self, signum: int, frame: Any) -> None:
        """SIGUSR2, sent by this worker's heart to its own main thread: raise TaskCancelled
        in the task running there if it was asked to stop (a signal, unlike an exception set
        from another thread, also interrupts a sleep or a blocking read)."""
        me = threading.get_ident()
        for task_id, (thread, _) in list(self._executing.items()):
            if thread == me and task_id in self._cancel:
                raise errors.TaskCancelled(f"task {task_id} was cancelled while running")

    def interrupt(self, task_id: int) -> None:
        """Raise TaskCancelled in the thread running `task_id`, or cancel its coroutine
        (called by the heart)."""
        if self._loop is not None and task_id in self._loop.running:
            self._loop.cancel(task_id, "cancel")
            return
        if task_id not in self._executing:
            return
        thread = self._executing[task_id][0]
        if thread == threading.main_thread().ident and hasattr(signal, "pthread_kill"):
            signal.pthread_kill(thread, CANCEL_SIGNAL)
            return
        import ctypes  # a --threads worker: the exception is raised at its next bytecode

        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread), ctypes.py_object(errors.TaskCancelled)
        )

    def running_row(self, task_id: int) -> Any:
        """The row of `task_id` if this process runs it now (thread or coroutine), else None."""
        if task_id in self._executing:
            return self._executing[task_id][1]
        running = self._loop.running.get(task_id) if self._loop is not None else None
        return None if running is None or running.ended else running.row

    def cancel_candidates(self) -> list[int]:
        """Ids a cancel request could concern now: claimed in this batch or running."""
        return sorted(self._batch | set(self._executing) | self.in_flight())

    # -- loops --------------------------------------------------------------------------------

    def work(self) -> Summary:
        """Run until stopped, sleeping when idle (woken early by LISTEN/NOTIFY when enabled)."""
        self.start()
        self._start_listener()
        try:
            while not self._should_stop():
                self.scheduler.tick()  # enqueue due periodic tasks (at most once a second)
                self.wakeup.clear()  # before the claim: a NOTIFY arriving during it still counts
                if self._with_db_retry(self.run_batch, "claim"):
                    continue
                if self.stopping.is_set():
                    break
                self.wakeup.wait(self.idle_wait())
            self._finish_threads()
            self._finish_async()
        finally:
            if self.listener is not None:
                self.listener.stop()
            self._close_conn()
            self.shutdown()
        return self.summary

    def work_off(self) -> Summary:
        """Run what is ready now, then return (delayed_job's work_off)."""
        self.start()
        try:
            while not self._should_stop():
                self.wakeup.clear()
                if self._with_db_retry(self.run_batch, "claim"):
                    continue
                if not self._running and not self.async_running():
                    break
                self.wakeup.wait(self.sleep_delay)  # a finishing thread or coroutine sets it
            self._finish_threads()
            self._finish_async()
        finally:
            self._close_conn()
            self.shutdown()
        return self.summary

    def _start_listener(self) -> None:
        if self.listen:
            self.listener = listener.start(
                self.settings,
                self.engine,
                self.wakeup,
                self.queues,
                name=f"dbqueue-listener-{self.name}",
            )

    def idle_wait(self) -> float:
        """Seconds to sleep with nothing ready: until the next run_at, at most --sleep-delay.

        A NOTIFY (or a finishing thread in --threads mode) cuts the sleep short.
        """
        if self.threads > 1 and len(self._running) >= self.threads:
            return self.sleep_delay  # no free slot: only a finishing task matters
        if self._async_seen and self._async_free() <= 0:
            return self.sleep_delay  # the loop is full: only a finishing coroutine matters
        try:
            until_next: float | None = self._single_statement(
                lambda c: store.seconds_until_next(c, self.queues)
            )
            if until_next == 0 and not self.limits_apply():
                # ready rows the unlimited claim left: paused, locked by another claim, or
                # with a key and enqueued since the heart's last look (then the next claim
                # honours limits at once rather than in up to a second)
                self.limited_waiting = self._single_statement(
                    lambda c: limits.limited_waiting(c, self.queues)
                )
        except sa.exc.DBAPIError:
            return self.sleep_delay  # the next claim reports the outage
        if until_next == 0 and self._blocked:
            until_next = None  # ready rows wait on limits: a slot frees when a task ends
        wait = self.sleep_delay if until_next is None else max(until_next, 0.005)
        catch_up = self.listener.catch_up_in() if self.listener is not None else None
        return min(self.sleep_delay, wait, catch_up if catch_up is not None else wait)

    def _should_stop(self) -> bool:
        if self.zombie:
            return True
        if self.max_tasks is not None and self.summary.done >= self.max_tasks:
            return True
        return self.stopping.is_set()

    # -- one batch ----------------------------------------------------------------------------

    def batch_size(self) -> int:
        """Claim about BATCH_WINDOW seconds of work: many no-ops, one long task.

        A new worker claims one task, then BATCH_GROWTH times more each claim until the
        window is full (1, 8, 64, 500 for no-ops). Blending the first measurement into the
        1-second guess instead took about 20 claims of one or two tasks before batches
        reached 100: with 32 processes draining a burst on 2 cores that was 640 claims and
        as many outcome writes of a task or two, and the drain ran at a third of its rate
        with 2 processes. The bounded growth keeps one fast first task from making the
        worker take 100 tasks that turn out to be slow, which other workers would then
        wait for."""
        if self._avg_duration is None:
            return 1
        size = int(BATCH_WINDOW / max(self._avg_duration, 1e-6))
        size = min(size, self._last_limit * BATCH_GROWTH)
        if self._avg_payload:
            size = min(size, int(BATCH_BYTES / self._avg_payload))
        if self.max_tasks is not None:
            size = min(size, self.max_tasks - self.summary.done)
        return max(1, min(self.max_batch, size))

    def claimable_queues(self) -> list[str] | None:
        """The queues to claim from now: the worker's own less the paused ones ([]: none)."""
        if self.queues is None:
            return None
        return [q for q in self.queues if q not in self.paused]

    def limits_apply(self) -> bool:
        """Whether the next claim must honour concurrency limits (limits.py): tasks with a
        key wait in this worker's queues, or one of its queues has a cap."""
        if self.limited_waiting:
            return True
        if self.queues is None:
            return bool(self.capped - self.paused)
        return any(q in self.capped for q in self.claimable_queues() or [])

    def claim(self, limit: int) -> list[Any]:
        """Claim a batch. After a claim whose commit was cut off, first give back what that
        claim may have taken: the rows say `running` under this worker, which is alive, so no
        rescue would ever return them. The usual claim is one statement, sent in autocommit
        on PostgreSQL (no BEGIN/COMMIT round trips); the limited claim is a transaction."""
        self._blocked = False
        if self.limits_apply() and not self._claim_uncertain:
            return self._claim_limited(limit)
        queues = self.claimable_queues()
        exclude = sorted(self.paused) if queues is None else []
        if self.capped:  # capped queues are the limited claim's (limits_apply is false here)
            if queues is None:
                exclude = sorted(self.paused | self.capped)
            else:
                queues = [q for q in queues if q not in self.capped]
        try:
            if self._claim_uncertain:
                with self.begin() as conn:
                    store.release_unknown(conn, self.name, self.in_flight())
                    self._claim_uncertain = False
                    if queues == []:
                        return []
                    return store.claim(
                        conn, self.name, limit, queues, registered=self.registered, exclude=exclude
                    )
            if queues == []:
                return []  # every queue of this worker is paused
            with self._one_statement() as conn:
                return store.claim(
                    conn, self.name, limit, queues, registered=self.registered, exclude=exclude
                )
        except Exception as exc:
            if database.is_disconnect(exc):
                self._claim_uncertain = True
            raise

    def _claim_limited(self, limit: int) -> list[Any]:
        queues = self.claimable_queues()
        if queues == []:
            return []
        exclude = sorted(self.paused) if queues is None else []
        try:
            with self.engine.begin() as conn:
                rows = store.claim(
                    conn,
                    self.name,
                    limit,
                    queues,
                    registered=self.registered,
                    exclude=exclude,
                    limited=True,
                )
        except Exception as exc:
            if database.is_disconnect(exc):
                self._claim_uncertain = True
            raise
        self._blocked = not rows
        return rows

    def in_flight(self) -> set[int]:
        """Ids of tasks this process is running right now (none between batches, except in
        --threads mode, and its coroutines)."""
        return set(self._running.values()) | self.async_running()

    def run_batch(self) -> int:
        """Claim a batch, run its tasks in order, record outcomes; returns tasks claimed."""
        if self.threads > 1:
            return self.run_threaded()
        ended = self._ended_async()
        size = self._last_limit = self.batch_size()
        limit = self.claim_limit(size)
        if limit <= 0:
            self._record_async(ended)
            return len(ended)
        try:
            claimed = self.claim(limit)
            self._note_payloads(claimed)
            self._batch = {r.id for r in claimed}
            rows = self.dispatch(claimed, size)
        finally:  # written once the new coroutines run: their first await hides this write
            self._record_async(ended)
        pending: list[store.Outcome] = []
        first_pending = 0.0
        for index, prepared in enumerate(rows):
            if self.stopping.is_set() or self.zombie:
                self.release([p.row for p in rows[index:]])
                break
            outcome = self.run_one(prepared.row, prepared)
            if not pending:
                first_pending = time.monotonic()
            pending.append(outcome)
            if time.monotonic() - first_pending > RECORD_EVERY:
                self.record(pending)
                pending = []
                self._collect_async()
        if pending:
            self.record(pending)
        self._batch = set()
        return len(ended) + len(claimed)

    def _note_payloads(self, claimed: Sequence[Any]) -> None:
        """Blend the claimed tasks' average payload size into the one batch_size bounds
        claims by (BATCH_BYTES)."""
        if not claimed:
            return
        mean = sum(len(row.payload) for row in claimed) / len(claimed)
        previous = self._avg_payload
        self._avg_payload = mean if previous is None else 0.5 * previous + 0.5 * mean

    # -- async tasks: up to async_concurrency coroutines on the worker's event loop -----------

    def claim_limit(self, sync_room: int) -> int:
        """How many tasks to claim: room for the sync path, or, when the last claim held
        async tasks, the loop's free slots (0 when it is full: a finishing coroutine wakes
        the worker). Never more than max_tasks leaves."""
        limit = self._async_free() if self._async_seen else sync_room
        if self.max_tasks is not None:
            running = len(self._running) + len(self.async_running())
            limit = min(limit, self.max_tasks - self.summary.done - running)
        return limit

    def dispatch(self, rows: Sequence[Any], sync_room: int) -> list[executor.Prepared]:
        """Start the async tasks among `rows` on the loop; return the sync ones to run here
        (at most `sync_room`). What has no room is given back to the queue at once."""
        prepared = [executor.prepare(self.settings, row) for row in rows]
        self._async_seen = any(p.is_async for p in prepared)
        if not self._async_seen and len(prepared) <= sync_room:
            return prepared  # the usual sync batch: nothing else to do
        sync: list[executor.Prepared] = []
        coroutines: list[executor.Prepared] = []
        extra: list[Any] = []
        room = self._async_free()
        for item in prepared:
            if item.is_async and len(coroutines) < room:
                coroutines.append(item)
            elif not item.is_async and len(sync) < sync_room:
                sync.append(item)
            else:
                extra.append(item.row)
        self._start_async(coroutines)
        if extra:
            self.release(extra)
        return sync

    def _async_free(self) -> int:
        if self._loop is None:
            return self.async_concurrency
        return int(self._loop.free())

    def async_running(self) -> set[int]:
        """Ids of the coroutines on the loop (not yet recorded)."""
        return set() if self._loop is None else set(self._loop.ids())

    def _start_async(self, prepared: list[executor.Prepared]) -> None:
        cancelled = [p.row for p in prepared if p.row.id in self._cancel]
        if cancelled:  # asked to stop before they started
            for row in cancelled:
                self._cancel.pop(row.id, None)
            self.record(
                [
                    executor.cancelled(r, f"task {r.id} was cancelled before it started")
                    for r in cancelled
                ]
            )
            prepared = [p for p in prepared if p.row not in cancelled]
        if not prepared:
            return
        if self._loop is None:
            from dbqueue import eventloop

            self._loop = eventloop.EventLoop(
                self.settings, self.async_concurrency, self.name, self._log_outcome, self.wakeup.set
            )
            log.info(
                "worker %s runs async tasks on its event loop, %d at once",
                self.name,
                self.async_concurrency,
                extra={"event": "event_loop_started", "worker": self.name},
            )
        self._loop.start(prepared, self.default_timeout)

    def _collect_async(self) -> int:
        """Record the outcomes of the coroutines that ended; returns how many."""
        return self._record_async(self._ended_async())

    def _ended_async(self) -> list[store.Outcome]:
        """The outcomes of the coroutines that ended (their slots are free from now on)."""
        if self._loop is None:
            return []
        outcomes: list[store.Outcome] = self._loop.finished()
        for outcome in outcomes:
            self._cancel.pop(outcome.id, None)
        return outcomes

    def _record_async(self, outcomes: list[store.Outcome]) -> int:
        if outcomes:
            self.record(outcomes)
        return len(outcomes)

    def _finish_async(self) -> None:
        """Stopping (or drained): let the coroutines end, recording them as they do. After
        SIGTERM they get the grace period less a margin to record in (the supervisor kills
        the process at the grace period); then they are cancelled and given back to the
        queue, as the rescue of a killed sync task would."""
        if self._loop is None:
            return
        margin = min(3.0, self.grace / 2)  # to cancel, record and exit before the kill
        if self._stop_at is not None:  # what has not started goes back at once
            unstarted = self._loop.give_back(margin)
            if unstarted:
                self.release(unstarted)
        while self._loop.running:
            self.wakeup.clear()  # before collecting: a run ending meanwhile still wakes it
            self._collect_async()
            if not self._loop.running:
                break
            left = self.sleep_delay
            if self._stop_at is not None:
                left = self._stop_at + self.grace - margin - time.monotonic()
                if left <= 0:
                    break
            self.wakeup.wait(min(left, self.sleep_delay))
        if self._loop.running:
            log.warning(
                "worker %s: %d async task(s) still running %gs before the end of the %gs "
                "grace period: cancelling them (they go back to the queue; raise --grace to "
                "let them finish)",
                self.name,
                len(self._loop.running),
                margin,
                self.grace,
                extra={"event": "async_cancelled_at_stop", "worker": self.name},
            )
            self._loop.cancel_all("stop")
            end = time.monotonic() + margin / 2  # the other half: record them, exit
            while self._loop.running and time.monotonic() < end:
                self.wakeup.clear()
                self._collect_async()
                if self._loop.running:
                    self.wakeup.wait(min(0.1, max(0.0, end - time.monotonic())))
            self._collect_async()
            stuck = [r.row for r in list(self._loop.running.values())]
            if stuck:  # ignored their cancellation: given back here, as a rescue would
                log.warning(
                    "worker %s: async task(s) %s did not stop after their cancellation: "
                    "giving them back to the queue",
                    self.name,
                    [row.id for row in stuck],
                    extra={"event": "async_cancel_ignored", "worker": self.name},
                )
                self.record(
                    [
                        executor.interrupted(
                            row,
                            f"task {row.id} was cancelled: its worker stopped and the grace "
                            "period ran out (returned to the queue; it ignored the cancellation)",
                        )
                        for row in stuck
                    ]
                )
        self._loop.close()

    def release(self, rows: Sequence[Any]) -> None:
        """Give claimed-but-unstarted tasks back to the queue (stopping mid-batch)."""
        unstarted = [(r.id, r.attempts) for r in rows]
        with self.begin() as conn:
            store.release(conn, self.name, unstarted)

    def run_one(self, row: Any, prepared: executor.Prepared | None = None) -> store.Outcome:
        """Execute one claimed task and log its outcome."""
        started = time.monotonic()
        if self._heart is not None:
            self._heart.watch(row, self.default_timeout)
        try:
            outcome = self._execute(row, prepared)
        finally:
            if self._heart is not None:
                self._heart.watch(None, None)
        duration = time.monotonic() - started
        previous = self._avg_duration
        self._avg_duration = duration if previous is None else 0.8 * previous + 0.2 * duration
        self._log_outcome(row, outcome, duration)
        return outcome

    def _execute(self, row: Any, prepared: executor.Prepared | None = None) -> store.Outcome:
        """executor.execute, stoppable by a cancel request while it runs (see interrupt)."""
        if row.id in self._cancel:  # asked to stop before it started
            return executor.cancelled(row, f"task {row.id} was cancelled before it started")
        outcome: store.Outcome | None = None
        thread = threading.get_ident()
        try:
            self._executing[row.id] = (thread, row)
            try:
                outcome = executor.execute(
                    self.settings, row, self.default_timeout, prepared=prepared
                )
            finally:
                del self._executing[row.id]
                if row.id in self._cancel and thread != threading.main_thread().ident:
                    _clear_async_exception(thread)
        except errors.TaskCancelled as exc:  # arrived just after the task returned
            if outcome is None:
                outcome = executor.cancelled(row, str(exc))
        self._cancel.pop(row.id, None)
        return outcome

    def record(self, outcomes: list[store.Outcome]) -> None:
        """Write outcomes, retrying until the database answers: a result is never dropped."""
        if len({o.status for o in outcomes}) == 1:  # one statement: no BEGIN/COMMIT needed
            written = self._with_db_retry(
                lambda: self._single_statement(lambda c: store.record(c, self.name, outcomes)),
                "record",
            )
        else:
            written = self._with_db_retry(
                lambda: self._transaction(lambda c: store.record(c, self.name, outcomes)),
                "record",
            )
        self.summary.lost += len(outcomes) - written
        for outcome in outcomes:
            self.summary.count(outcome)
        if self.on_progress is not None:
            self.on_progress(self.summary)

    # -- --threads T: T tasks at once in this process (I/O-bound work) ------------------------

    def run_threaded(self) -> int:
        """Record what finished, claim for the free slots, start those tasks; returns both.

        Claims never exceed the free threads, so every claimed task starts at once and none
        waits behind another. SIGALRM timeouts only work in the main thread: here a task's
        timeout is enforced for coroutines (asyncio) only.
        """
        finished = self._collect_finished() + self._collect_async()
        free = self.threads - len(self._running)
        if self.stopping.is_set() or self.zombie:
            return finished
        limit = self.claim_limit(free)
        if limit <= 0:
            return finished
        if self._pool is None:
            self._pool = futures.ThreadPoolExecutor(
                self.threads, thread_name_prefix=f"dbqueue-task-{self.name}"
            )
        rows = self.claim(limit)
        for prepared in self.dispatch(rows, free):
            future = self._pool.submit(self._run_in_thread, prepared.row, prepared)
            self._running[future] = prepared.row.id
            future.add_done_callback(self._thread_done)
        return finished + len(rows)

    def _thread_done(self, future: futures.Future[store.Outcome]) -> None:
        self.wakeup.set()

    def _run_in_thread(self, row: Any, prepared: executor.Prepared) -> store.Outcome:
        started = time.monotonic()
        outcome = self._execute(row, prepared)
        self._log_outcome(row, outcome, time.monotonic() - started)
        return outcome

    def _collect_finished(self) -> int:
        done = [f for f in self._running if f.done()]
        if done:
            for future in done:
                del self._running[future]
            self.record([f.result() for f in done])
        return len(done)

    def _finish_threads(self) -> None:
        """Wait for running threads and record their outcomes (graceful stop, end of drain)."""
        if self._running:
            futures.wait(self._running)
            self._collect_finished()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- helpers ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _one_statement(self) -> Iterator[sa.Connection]:
        """A connection for work that is one statement: autocommit on PostgreSQL, where a
        statement is atomic on its own (saving the BEGIN and COMMIT round trips); a
        transaction elsewhere (SQLite's BEGIN IMMEDIATE serialises the claim; MySQL's claim
        is a locking read and an update)."""
        if engines.of(self.engine).autocommit_statements:
            # Kept between statements (no transaction is open on it), so the pool's pre-ping
            # round trip is not paid twice a batch; a broken one is dropped and replaced, and
            # _with_db_retry waits out the outage.
            if self._conn is None or self._conn.invalidated or self._conn.closed:
                conn = self.engine.connect()
                self._conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            try:
                yield self._conn
            except BaseException:
                self._close_conn()
                raise
        else:
            with self.engine.begin() as conn:
                yield conn

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # a broken connection may fail to close; it is discarded
                log.debug("closing the worker's connection failed", exc_info=True)

    def _single_statement(self, body: Callable[[sa.Connection], Any]) -> Any:
        with self._one_statement() as conn:
            return body(conn)

    def _transaction(self, body: Callable[[sa.Connection], Any]) -> Any:
        with self.begin() as conn:
            return body(conn)

    @contextlib.contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        """A transaction on the queue's tables that the server ends if this worker goes
        silent inside it for a third of rescue_after (store.limit_idle): a worker cut off
        mid-transaction must not leave locks that the rescue of its tasks would wait on.
        A rescuer held up that long still heartbeats well within rescue_after."""
        with self.engine.begin() as conn:
            store.limit_idle(conn, self.rescue_after / 3)
            yield conn

    def _with_db_retry(self, action: Callable[[], Any], what: str) -> Any:
        """Run `action`, waiting out database outages with capped backoff (never giving up)."""
        delay = 0.5
        while True:
            try:
                return action()
            except Exception as exc:
                if database.is_transient(exc):
                    # A deadlock or lock wait timeout: the server undid the work and
                    # the transaction is gone with it; running it again is safe.
                    log.warning(
                        "%s; running the %s again",
                        database.describe_error(self.settings, exc),
                        what,
                        extra={"event": "lock_conflict_retried"},
                    )
                    continue
                if not database.is_disconnect(exc):
                    raise
                message = database.describe_error(self.settings, exc)
                if self.zombie:
                    # Presumed dead and still cut off: its tasks are the rescuers' now (a late
                    # outcome would be refused by the fence anyway). Stop, don't wait.
                    log.error(
                        "%s; worker %s gives up its %s: it is presumed dead",
                        message,
                        self.name,
                        what,
                        extra={"event": "database_unavailable"},
                    )
                    return 0
                log.error(
                    "%s; retrying %s in %.1fs",
                    message,
                    what,
                    delay,
                    extra={"event": "database_unavailable"},
                )
                if self.stopping.wait(delay) and what in {"register", "claim"}:
                    return 0
                delay = min(delay * 2, 10.0)

    def _log_outcome(self, row: Any, outcome: store.Outcome, duration: float) -> None:
        if outcome.status is Status.SUCCEEDED:
            if log.isEnabledFor(logging.INFO):  # at WARNING: nothing to build
                logs.task_succeeded(log, row.id, row.handler, row.queue, duration, row.attempts)
            return
        extra = logs.task_fields(
            row.id, row.handler, row.queue, duration, outcome.status.value, row.attempts
        )
        if outcome.snooze:
            extra["outcome"] = "snoozed"
            log.info(
                "task %s %s snoozed for %gs", row.id, row.handler, outcome.retry_in, extra=extra
            )
            return
        if outcome.status is Status.CANCELLED:
            log.info("task %s %s cancelled", row.id, row.handler, extra=extra)
            return
        first_line = (outcome.error or "").strip().splitlines()[-1:] or [""]
        level = logging.WARNING
        if "signature did not verify" in (outcome.error or ""):
            level = logging.WARNING
        verb = "will retry" if outcome.status is Status.QUEUED else "failed"
        log.log(
            level,
            "task %s %s %s (attempt %s): %s",
            row.id,
            row.handler,
            verb,
            row.attempts,
            first_line[0],
            extra=extra,
        )


class Heart(threading.Thread):
    """Heartbeats, rescue and the task watchdog, on a thread with its own connection.

    It never shares the task's thread or connection, so a busy task cannot starve it.
    """

    def __init__(self, worker: Worker) -> None:
        super().__init__(name=f"dbqueue-heart-{worker.name}", daemon=True)
        self.worker = worker
        self.interval = max(0.2, worker.rescue_after / 5)
        self._stop_event = threading.Event()
        self._watched: tuple[Any, float, float | None] | None = None
        self._last_ok = time.monotonic()
        self._next_complaint = 0.0

    def watch(self, row: Any, default_timeout: float | None) -> None:
        """Tell the watchdog which task runs now (None: none)."""
        if row is None:
            self._watched = None
            return
        timeout = row.timeout if row.timeout is not None else default_timeout
        self._watched = (row, time.monotonic(), timeout)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def run(self) -> None:
        next_beat = 0.0
        while not self._stop_event.wait(self._tick_interval()):
            if time.monotonic() >= next_beat:
                self.beat()
                next_beat = time.monotonic() + self.interval
            elif self.worker.rescuer:
                self.probe_local()
            self.poll_controls()
            self.check_timeout()
            self.check_cancelled()
            self.check_parent()

    def _tick_interval(self) -> float:
        """Tick at least every second: the local pid probe and the watchdog are cheap."""
        return min(self.interval, PROBE_INTERVAL)

    def check_parent(self) -> None:
        """A worker whose supervisor died stops (finishing its task) instead of living on."""
        parent = self.worker.parent_pid
        if parent is not None and os.getppid() != parent and not self.worker.stopping.is_set():
            log.error(
                "supervisor %s is gone: worker %s stops",
                parent,
                self.worker.name,
                extra={"event": "orphaned"},
            )
            self.worker.stop()

    def poll_controls(self) -> None:
        """Read the paused and capped queues, whether tasks with a key wait, and the cancel
        requests for this worker's tasks (every second: an operator's pause, cap or cancel
        reaches every host within about a second)."""
        worker = self.worker
        before = worker.paused
        try:
            with worker.engine.begin() as conn:
                worker.read_controls(conn)
                paused = worker.paused
                candidates = worker.cancel_candidates()
                requested = (
                    store.cancel_requests(conn, worker.name, candidates) if candidates else []
                )
        except Exception:  # the next heartbeat reports database trouble
            return
        if paused != before:
            log.info(
                "paused queues now: %s",
                ",".join(sorted(paused)) or "none",
                extra={"event": "paused_queues", "worker": worker.name},
            )
        for task_id in requested:
            if task_id not in worker._cancel:
                worker._cancel[task_id] = time.monotonic()
                log.info(
                    "task %s: cancel requested; stopping it",
                    task_id,
                    extra={"event": "cancel_requested", "task_id": task_id},
                )
                worker.interrupt(task_id)

    def check_cancelled(self) -> None:
        """A task asked to stop that ignored TaskCancelled for CANCEL_GRACE seconds (stuck in
        C code, or catching everything) is stopped at the process boundary, as timeouts are."""
        worker = self.worker
        for task_id, asked in list(worker._cancel.items()):
            row = worker.running_row(task_id)
            if row is None or time.monotonic() - asked < CANCEL_GRACE:
                continue
            outcome = store.Outcome(
                id=task_id,
                attempts=int(row.attempts),
                status=Status.CANCELLED,
                error=f"task {task_id} was cancelled and did not stop (the process was stopped)",
            )
            try:
                self._record_before_exit(outcome)
            finally:
                log.error(
                    "task %s was cancelled and did not stop within %gs: exiting the process",
                    task_id,
                    CANCEL_GRACE,
                    extra={"event": "hard_cancel", "task_id": task_id},
                )
                os._exit(70)

    def probe_local(self) -> None:
        """Rescue at once the tasks of workers in this process table whose process is gone."""
        try:
            with self.worker.engine.begin() as conn:
                here = store.list_workers(conn, host_id=identity.host_id())
                if any(not identity.pid_alive(w.pid) for w in here):
                    store.limit_idle(conn, self.worker.rescue_after / 3)
                    rescue(conn, self.worker.rescue_after)
        except Exception:  # the next heartbeat reports database trouble
            return

    def beat(self) -> None:
        worker = self.worker
        try:
            with worker.begin() as conn:
                alive = store.heartbeat(conn, worker.name)
                # not when its row is gone: its own running tasks would look orphaned to it
                if alive and worker.rescuer:
                    rescue(conn, worker.rescue_after)
            if not alive:
                self._become_zombie("its row in workers was removed (it was presumed dead)")
                return
            self._last_ok = time.monotonic()
            self._next_complaint = 0.0
        except Exception as exc:
            silent = time.monotonic() - self._last_ok
            if silent < self._next_complaint:
                if silent > worker.rescue_after:
                    self._become_zombie(f"heartbeats failed for {silent:.0f}s")
                return
            self._next_complaint = silent + 10
            log.error(
                "heartbeat of %s failed for %.0fs: %s",
                worker.name,
                silent,
                database.describe_error(worker.settings, exc),
                extra={"event": "heartbeat_failed"},
            )
            if silent > worker.rescue_after:
                self._become_zombie(f"heartbeats failed for {silent:.0f}s")

    def _become_zombie(self, why: str) -> None:
        if self.worker.zombie:
            return  # said once: later failed heartbeats add nothing
        log.error(
            "worker %s stops claiming and exits: %s",
            self.worker.name,
            why,
            extra={"event": "zombie"},
        )
        self.worker.zombie = True
        self.worker.stop()

    def check_timeout(self) -> None:
        """Hard limit: a task past timeout + grace that ignored TaskTimeout ends the process."""
        watched = [self._watched] if self._watched is not None else []
        if self.worker._loop is not None:  # coroutines blocking the loop or ignoring cancel
            watched += self.worker._loop.overdue()
        for row, started, timeout in watched:
            if timeout is not None and time.monotonic() - started >= timeout + max(
                2.0, timeout * 0.1
            ):
                self._hard_timeout(row, timeout)

    def _record_before_exit(self, outcome: store.Outcome) -> None:
        """Write the outcome of the task that ends the process, and count it in the worker's
        summary: `dbqueue workoff` reported '0 failed' and exited 0 after such a task."""
        worker = self.worker
        with worker.begin() as conn:
            written = store.record(conn, worker.name, [outcome])
        if written:
            worker.summary.count(outcome)
            if worker.on_progress is not None:
                worker.on_progress(worker.summary)

    def _hard_timeout(self, row: Any, timeout: float) -> None:
        loop = self.worker._loop
        blocker = loop.blocking() if loop is not None else None
        why = ""
        if blocker is not None and blocker.id != row.id:
            why = f": the event loop is blocked by task {blocker.id} {blocker.handler}"
        exc = errors.TaskTimeout(f"timed out after {timeout:g}s (the process was stopped{why})")
        outcome = executor.failure(self.worker.settings, row, exc)
        try:
            self._record_before_exit(outcome)
        finally:
            log.error(
                "task %s %s timed out after %gs and did not stop%s: exiting the process",
                row.id,
                row.handler,
                timeout,
                why,
                extra={"event": "hard_timeout"},
            )
            os._exit(70)


def _clear_async_exception(thread: int) -> None:
    """Drop a TaskCancelled set for `thread` that has not been raised yet (its task ended
    first), so it cannot surface in the thread pool's own code."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), None)


def rescue(conn: sa.Connection, rescue_after: float) -> list[int]:
    """Return the tasks of dead workers to the queue: stale heartbeats, and vanished pids of
    workers in this process table (same boot and PID namespace; see identity.host_id)."""
    dead = set(store.stale_workers(conn, rescue_after))
    for row in store.list_workers(conn, host_id=identity.host_id()):
        if not identity.pid_alive(row.pid):
            dead.add(row.name)
    dead.update(store.orphaned_owners(conn))
    if not dead:
        return []
    ids = store.rescue(conn, sorted(dead), "worker died while running the task (rescued)")
    store.remove_workers(conn, sorted(dead))
    if ids:
        log.warning(
            "rescued %d task(s) of dead worker(s) %s: %s",
            len(ids),
            ", ".join(sorted(dead)),
            ids[:20],
            extra={"event": "rescued"},
        )
    return ids
