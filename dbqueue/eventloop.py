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
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from dbqueue import config, executor, store

log = logging.getLogger("dbqueue.worker")


class EventLoop:
    """An asyncio loop on a daemon thread, and the async tasks running on it."""

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
        self.running: dict[int, executor.Running] = {}
        self._futures: dict[concurrent.futures.Future[store.Outcome], int] = {}
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

    def free(self) -> int:
        """Async tasks that could start now."""
        return self.capacity - len(self.running)

    def start(self, prepared: executor.Prepared, default_timeout: float | None) -> None:
        """Run `prepared` on the loop (never waits for it)."""
        row = prepared.row
        timeout = row.timeout if row.timeout is not None else default_timeout
        running = executor.Running(row, timeout, time.monotonic())
        self.running[row.id] = running
        future = asyncio.run_coroutine_threadsafe(self._run_one(prepared, running), self.loop)
        self._futures[future] = row.id
        future.add_done_callback(lambda _: self.wake())

    async def _run_one(
        self, prepared: executor.Prepared, running: executor.Running
    ) -> store.Outcome:
        outcome = await executor.execute_async(self.settings, prepared, running, self.hook_pool)
        running.ended = True
        self.on_done(prepared.row, outcome, time.monotonic() - running.started)
        return outcome

    def hook_pool(self) -> concurrent.futures.Executor:
        """Threads for around_task hooks of async tasks (one per running task at most)."""
        if self._hook_pool is None:
            self._hook_pool = concurrent.futures.ThreadPoolExecutor(
                self.capacity, thread_name_prefix=f"dbqueue-hooks-{self._name}"
            )
        return self._hook_pool

    def finished(self) -> list[store.Outcome]:
        """The outcomes of the runs that ended since the last call (called by the worker)."""
        done = [f for f in self._futures if f.done()]
        outcomes = []
        for future in done:
            task_id = self._futures.pop(future)
            running = self.running.pop(task_id)
            try:
                outcomes.append(future.result())
            except BaseException as exc:  # the loop itself failed the run: it goes back
                log.error("async task %s ended outside its run: %r", task_id, exc)
                outcomes.append(executor.interrupted(running.row, executor.describe(exc)))
        return outcomes

    def ids(self) -> set[int]:
        return set(self.running)

    def cancel(self, task_id: int, reason: str) -> None:
        """Cancel one run (reason 'cancel': an operator's request; 'stop': shutdown)."""
        running = self.running.get(task_id)
        if running is not None:
            self.loop.call_soon_threadsafe(running.cancel, reason)

    def cancel_all(self, reason: str) -> None:
        for task_id in list(self.running):
            self.cancel(task_id, reason)

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every run to end; whether they all did."""
        pending = list(self._futures)
        if pending:
            concurrent.futures.wait(pending, timeout)
        return all(f.done() for f in pending)

    def overdue(self) -> list[tuple[Any, float, float | None]]:
        """(row, started, timeout) of each unfinished run with a timeout, for the watchdog."""
        return [
            (r.row, r.started, r.timeout)
            for r in list(self.running.values())
            if r.timeout is not None and not r.ended
        ]

    def close(self) -> None:
        """Stop the loop (its remaining runs are abandoned: the worker has recorded or given
        them up) and its hook threads."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if self._hook_pool is not None:
            self._hook_pool.shutdown(wait=False, cancel_futures=True)
