"""`dbqueue work --reload`: restart the worker processes when Python code changes.

For development only. The supervisor never imports the application's task modules itself,
so restarting its children (spawned, not forked: each imports everything anew) is a full
reload. Children get SIGTERM, the same graceful stop as a deploy: running tasks finish,
claimed-but-unstarted ones are released, then fresh children start on the new code.
Watching uses `watchfiles` (inotify on Linux), the optional extra `dbqueue[reload]`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from dbqueue import errors

log = logging.getLogger("dbqueue.supervisor")


class Reloader(threading.Thread):
    """Calls `on_change(paths)` after Python files under `directories` changed (debounced)."""

    def __init__(self, directories: Sequence[str], on_change: Callable[[list[str]], None]) -> None:
        super().__init__(name="dbqueue-reloader", daemon=True)
        try:
            import watchfiles
        except ImportError as exc:
            raise errors.ConfigurationError(
                "--reload needs watchfiles: pip install 'dbqueue[reload]'"
            ) from exc
        missing = [d for d in directories if not Path(d).is_dir()]
        if missing:
            raise errors.ConfigurationError(f"--reload-dir {missing[0]}: no such directory")
        self._watchfiles = watchfiles
        self.directories = [str(Path(d).resolve()) for d in directories]
        self.on_change = on_change
        self.stop_event = threading.Event()

    def run(self) -> None:
        for changes in self._watchfiles.watch(
            *self.directories,
            watch_filter=self._watchfiles.PythonFilter(),
            stop_event=self.stop_event,
            raise_interrupt=False,
        ):
            paths = sorted({path for _, path in changes})
            log.info(
                "code changed (%s): restarting workers after their running tasks",
                ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else ""),
                extra={"event": "reload"},
            )
            self.on_change(paths)

    def stop(self) -> None:
        self.stop_event.set()
