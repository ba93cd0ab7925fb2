"""Task: a handle on one row of `tasks`, usable from any process.

Reading `result` or `exception` verifies the signature before unpickling; an exception is
only ever rebuilt from its signed pickle, never from stored class names.
"""

from __future__ import annotations

import datetime as dt
import pickle
import time
from typing import Any

from dbqueue import config, database, errors, serializer, store
from dbqueue.schema import FINISHED, Status

_COLUMNS = (
    "queue",
    "priority",
    "run_at",
    "status",
    "handler",
    "attempts",
    "max_attempts",
    "timeout",
    "locked_by",
    "locked_at",
    "error",
    "unique_key",
    "meta",
    "snoozes",
    "cancel_requested_at",
    "concurrency_key",
    "created_at",
    "started_at",
    "finished_at",
)


class Task:
    """A handle on one task (one row of `tasks`), usable from any process.

    Attributes mirror the row as of the last read (the first attribute read loads it;
    `refresh()` reads it again): `id`, `status`, `queue`, `priority`, `run_at`, `handler`
    (`module:qualname`), `attempts`, `max_attempts`, `timeout`, `locked_by` (the worker
    running it), `locked_at`, `error` (the last exception's text and traceback), `unique_key`,
    `meta`, `snoozes`, `cancel_requested_at`, `concurrency_key`, `created_at`, `started_at`,
    `finished_at`. Times are aware datetimes from the database clock.

    Args:
        task_id: the task's id (`Task(42)` reads nothing until an attribute is asked for).
        settings: the database and keys to read with. Default: `dbqueue.configure()`'s.

    Reading an attribute raises `TaskNotFound` if the row does not exist (any more), and
    `DatabaseUnavailable` if the database cannot be reached.
    """

    queue: str
    priority: int
    run_at: dt.datetime
    handler: str
    attempts: int
    max_attempts: int
    timeout: float | None
    locked_by: str | None
    locked_at: dt.datetime | None
    error: str | None
    unique_key: str | None
    meta: dict[str, Any] | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    def __init__(self, task_id: int, *, settings: config.Settings | None = None) -> None:
        self.id = int(task_id)
        self._settings = settings
        self._row: Any = None

    @property
    def settings(self) -> config.Settings:
        """The settings this handle reads with."""
        return self._settings or config.current()

    @classmethod
    def get(cls, task_id: int, *, settings: config.Settings | None = None) -> Task:
        """The task with this id, its row read now.

        Args:
            task_id: the task's id.
            settings: the database and keys to read with. Default: `dbqueue.configure()`'s.

        Raises:
            TaskNotFound: there is no such task (it may have been pruned).
            DatabaseUnavailable: the database cannot be reached.
        """
        task = cls(task_id, settings=settings)
        task.refresh()
        return task

    def cancel(self) -> bool:
        """Cancel this task: a queued one at once, a running one by asking its worker.

        The worker raises `dbqueue.TaskCancelled` inside a running task within about a second;
        a task that ignores it is stopped with its process.

        Returns:
            True if the task is `cancelled` now (it was queued); False if it was running and
            its worker has been asked to stop it.

        Raises:
            InvalidOperation: the task has already finished.
            TaskNotFound: there is no such task.
        """
        from dbqueue import control

        done = control.cancel([self.id], settings=self._settings)
        self._row = None
        return bool(done.cancelled)

    def refresh(self) -> Task:
        """Re-read the row; returns the task itself (`task.refresh().status`).

        Raises:
            TaskNotFound: the row no longer exists (pruned, or deleted).
            DatabaseUnavailable: the database cannot be reached.
        """
        settings = self.settings
        with database.errors_translated(settings), settings.get_engine().connect() as conn:
            row = store.get(conn, self.id)
            conn.rollback()
        if row is None:
            raise errors.TaskNotFound(f"task {self.id} does not exist (it may have been pruned)")
        self._row = row
        return self

    def _get_row(self) -> Any:
        if self._row is None:
            self.refresh()
        return self._row

    def __getattr__(self, name: str) -> Any:
        if name in _COLUMNS:
            return getattr(self._get_row(), name)
        raise AttributeError(name)

    @property
    def status(self) -> Status:
        """The task's `Status` as of the last read."""
        return Status(self._get_row().status)

    @property
    def success(self) -> bool:
        """True once the task succeeded."""
        return self.status is Status.SUCCEEDED

    @property
    def finished(self) -> bool:
        """True once the task succeeded, failed for good or was cancelled."""
        return self.status.value in FINISHED

    @property
    def result(self) -> Any:
        """The task's return value, verified then unpickled; None until it succeeded.

        Raises:
            ResultNotStored: the value could not be stored (it did not pickle, or was too
                large: the task still succeeded), or the stored pickle does not verify with
                this process's keys or no longer unpickles.
        """
        row = self._get_row()
        if row.result is None:
            if row.status == Status.SUCCEEDED.value and row.error:
                raise errors.ResultNotStored(row.error)
            return None
        return self._load("result", row)

    @property
    def exception(self) -> BaseException | None:
        """The last exception raised by the task, rebuilt from its verified pickle; None if
        none. `error` holds its text and traceback.

        Raises:
            ResultNotStored: the stored pickle does not verify or no longer unpickles.
        """
        row = self._get_row()
        if row.exception is None:
            return None
        value = self._load("exception", row)
        return value if isinstance(value, BaseException) else None

    def _load(self, purpose: str, row: Any) -> Any:
        """Verify, then unpickle, one stored column; any failure is a ResultNotStored."""
        envelope = getattr(row, purpose)
        try:
            body = serializer.verify(self.settings.keyring(), purpose, row.handler, envelope)
        except errors.SignatureError as exc:
            raise errors.ResultNotStored(f"task {self.id}: {exc}") from exc
        try:
            return pickle.loads(body)
        except Exception as exc:
            raise errors.ResultNotStored(
                f"task {self.id}: the stored {purpose} could not be unpickled: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def wait(self, timeout: float | None = None, poll: float = 0.05) -> Task:
        """Block until the task is finished (succeeded, failed or cancelled); returns it.

        Check `success` or `status` before reading `result`, which is None for a failed task.

        Args:
            timeout: seconds to wait at most; None waits forever.
            poll: the first interval between reads, growing by half each time (at most 1 s).

        Raises:
            TaskTimeout: `timeout` seconds passed and the task is still queued or running.
            TaskNotFound: the task does not exist.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.refresh().finished:
                return self
            if deadline is not None and time.monotonic() >= deadline:
                raise errors.TaskTimeout(
                    f"task {self.id} is still {self.status.value} after {timeout:g}s"
                )
            time.sleep(min(poll, 1.0))
            poll *= 1.5

    def __repr__(self) -> str:
        status = self._row.status if self._row is not None else "?"
        return f"<Task {self.id} {status}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Task) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)
