"""The worker's event loop: one for the life of the worker, on a thread of its own, running
up to `async_concurrency` `async def` tasks at once beside the sync path.

The worker (main thread) claims, hands async rows to `start`, and records what `finished`
returns; each run is executor.execute_async. A cancel request or the end of the grace
period cancels the run's asyncio task; the heart's watchdog reads `overdue` for coroutines
that block the loop or ignore cancellation past their timeout (the process boundary stays
the hard limit, as for sync tasks). Imported only once a worker meets its first async task.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from dbqueue import config, executor, store

log = logging.getLogger("dbqueue.worker")

BATCH_WINDOW = 0.05  # seconds of claimed work that may wait for a slot (worker.BATCH_WINDOW)


class EventLoop:
    """An asyncio loop on a daemon thread, and the async tasks running on it.

    The worker's thread and the loop's meet in two places only: `start` hands a claim's rows
    over in one call (one wake-up of the loop per claim, not per task), and each run appends
    its outcome to `_done` (a deque: appends and pops are atomic) and wakes the worker.

    The worker may claim a few more than `capacity` (`ahead`): they wait on the loop's side
    and start the moment a run ends, instead of a claim's round trip later. As the sync path
    claims about BATCH_WINDOW seconds of work, at most that much waits here: a full second
    set of slots for 50 ms tasks, nothing for tasks of a second or more.
    """

    def __init__(
        self,
        settings: config.Settings,
        capacity: int,
        name: str,
        on_done: Callable[[Any, store.Outcome, float], None],
        wake: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.capacity = capacity
        self.on_done = on_done  # (row, outcome, duration), on the loop's thread
        self.wake = wake  # once a run's outcome is ready for `finished`
        self.running: dict[int, executor.Running] = {}  # until the worker takes the outcome
        self._done: collections.deque[store.Outcome] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()  # strong references while they run
        self._waiting: collections.deque[tuple[executor.Prepared, executor.Running]] = (
            collections.deque()
        )  # claimed, not started: the loop's thread only
        self._active = 0  # runs started and not ended: the loop's thread only
        self.avg_duration = 1.0  # seconds; pessimistic until measured (nothing claimed ahead)
        self._hook_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._name = name
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=f"dbqueue-loop-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    def ahead(self) -> int:
        """How many tasks may wait here for a slot: about BATCH_WINDOW seconds of work."""
        return min(self.capacity, int(self.capacity * BATCH_WINDOW / max(self.avg_duration, 1e-6)))

    def free(self) -> int:
        """Async tasks the worker may claim now."""
        return self.capacity + self.ahead() - len(self.running)

    def start(self, prepared: Sequence[executor.Prepared], default_timeout: float | None) -> None:
        """Run these rows on the loop (never waits for them)."""
        runs = []
        for item in prepared:
            row = item.row
            timeout = row.timeout if row.timeout is not None else default_timeout
            running = executor.Running(row, timeout)
            self.running[row.id] = running
            runs.append((item, running))
        if runs:
            self.loop.call_soon_threadsafe(self._queue, runs)

    def _queue(self, runs: list[tuple[executor.Prepared, executor.Running]]) -> None:
        self._waiting.extend(runs)
        self._fill()

    def _fill(self) -> None:
        while self._active < self.capacity and self._waiting:
            self._launch(*self._waiting.popleft())

    def _launch(self, prepared: executor.Prepared, running: executor.Running) -> None:
        self._active += 1
        running.started = time.monotonic()
        task = self.loop.create_task(self._run_one(prepared, running))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_one(self, prepared: executor.Prepared, running: executor.Running) -> None:
        try:
            outcome = await executor.execute_async(self.settings, prepared, running, self.hook_pool)
        except BaseException as exc:  # the loop itself ended the run: it goes back
            log.error("async task %s ended outside its run: %r", prepared.row.id, exc)
            outcome = executor.interrupted(prepared.row, executor.describe(exc))
        running.ended = True
        self._active -= 1
        duration = time.monotonic() - (running.started or 0.0)
        self.avg_duration = 0.8 * self.avg_duration + 0.2 * duration
        try:
            self.on_done(prepared.row, outcome, duration)
        finally:
            self._done.append(outcome)
            self.wake()
            self._fill()

    def hook_pool(self) -> concurrent.futures.Executor:
        """Threads for around_task hooks of async tasks (one per running task at most)."""
        if self._hook_pool is None:
            self._hook_pool = concurrent.futures.ThreadPoolExecutor(
                self.capacity, thread_name_prefix=f"dbqueue-hooks-{self._name}"
            )
        return self._hook_pool

    def finished(self) -> list[store.Outcome]:
        """The outcomes of the runs that ended since the last call (called by the worker):
        their slots are free from now on."""
        outcomes = []
        while self._done:
            outcome = self._done.popleft()
            self.running.pop(outcome.id, None)
            outcomes.append(outcome)
        return outcomes

    def ids(self) -> set[int]:
        return set(self.running)

    def cancel(self, task_id: int, reason: str) -> None:
        """Cancel one run (reason 'cancel': an operator's request; 'stop': shutdown)."""
        running = self.running.get(task_id)
        if running is not None:
            self.loop.call_soon_threadsafe(self._cancel, running, reason)

    def _cancel(self, running: executor.Running, reason: str) -> None:
        if running.started is None:  # still waiting: start it, to end at once as cancelled
            for index, (prepared, waiting) in enumerate(self._waiting):
                if waiting is running:
                    del self._waiting[index]
                    running.reason = reason
                    self._launch(prepared, running)
                    return
        running.cancel(reason)

    def give_back(self, timeout: float) -> list[Any]:
        """Take the rows that have not started out of the loop (stopping): the worker gives
        them back to the queue, their attempt unspent."""
        taken: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()

        def take() -> None:
            rows = [prepared.row for prepared, _ in self._waiting]
            self._waiting.clear()
            taken.set_result(rows)

        self.loop.call_soon_threadsafe(take)
        try:
            rows = taken.result(timeout)
        except concurrent.futures.TimeoutError:  # the loop is blocked: they stay (rescued)
            return []
        for row in rows:
            self.running.pop(row.id, None)
        return rows

    def cancel_all(self, reason: str) -> None:
        for task_id in list(self.running):
            self.cancel(task_id, reason)

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every run to end; whether they all did."""
        deadline = time.monotonic() + timeout
        while any(not r.ended for r in list(self.running.values())):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def overdue(self) -> list[tuple[Any, float, float | None]]:
        """(row, started, timeout) of each unfinished run with a timeout, for the watchdog."""
        return [
            (r.row, r.started or 0.0, r.timeout)
            for r in list(self.running.values())
            if r.timeout is not None and r.started is not None and not r.ended
        ]

    def blocking(self) -> Any | None:
        """The row of the run whose code holds the loop's thread now (a coroutine running
        blocking code: time.sleep, a sync driver), if one does: the watchdog names it, since
        the runs it holds up are not the culprits."""
        frame = sys._current_frames().get(self.thread.ident or -1)
        chain = set()
        while frame is not None:
            chain.add(frame)
            frame = frame.f_back
        for run in list(self.running.values()):
            coro = run.current.get_coro() if run.current is not None else None
            if getattr(coro, "cr_frame", None) in chain:
                return run.row
        return None

    def close(self) -> None:
        """Stop the loop (its remaining runs are abandoned: the worker has recorded or given
        them up) and its hook threads."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if self._hook_pool is not None:
            self._hook_pool.shutdown(wait=False, cancel_futures=True)
