"""Tasks of the concurrency-limit tests: each appends when it starts and ends to a log file
(one line per event, O_APPEND, from any worker process), so the test can compute how many
ran at once from the recorded intervals."""

from __future__ import annotations

import os
import time
from pathlib import Path

from dbqueue import handle_asynchronously


def _log(path: str, *fields: object) -> None:
    line = " ".join(str(f) for f in fields) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def hold(path: str, label: str, group: str, seconds: float) -> str:
    """Log start, sleep `seconds`, log end. `group` is what the test counts overlaps by."""
    _log(path, "start", label, group, time.time(), os.getpid())
    time.sleep(seconds)
    _log(path, "end", label, group, time.time(), os.getpid())
    return label


def hold_until_marker(path: str, label: str, group: str, marker: str) -> str:
    """Hold for 60 s until `marker` exists (the test creates it once it killed this run's
    worker), then only briefly: the rescued run finishes."""
    _log(path, "start", label, group, time.time(), os.getpid())
    deadline = time.monotonic() + 60
    while not Path(marker).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    _log(path, "end", label, group, time.time(), os.getpid())
    return label


def _account_key(account: int, path: str, label: str) -> str:
    return f"account:{account}"


@handle_asynchronously(concurrency_key=_account_key, max_concurrency=1)
def sync_account(account: int, path: str, label: str) -> str:
    return hold(path, label, f"account:{account}", 0.2)
