"""Task functions for the network tests (tests/netns.py hosts import them with --import)."""

from __future__ import annotations

import os
import socket
import time

import sqlalchemy as sa


def where() -> str:
    """Which host ran the task: its hostname (each network-test host has its own)."""
    return socket.gethostname()


def visit(label: str, seconds: float) -> tuple[str, int]:
    """Record this run (label, host, pid) in `runs`, committed at once over the host's own
    link, then sleep `seconds`: every execution is counted, duplicates included. Returns
    (host, pid), so a task's final row tells which process's outcome was written."""
    engine = sa.create_engine(os.environ["DBQUEUE_DATABASE_URL"], poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO runs (label, host, pid) VALUES (:label, :host, :pid)"),
                {"label": label, "host": socket.gethostname(), "pid": os.getpid()},
            )
    finally:
        engine.dispose()
    time.sleep(seconds)
    return socket.gethostname(), os.getpid()
