"""Task functions the benchmark's worker processes run (`--import bench_tasks`, scripts/ on
PYTHONPATH): a no-op, a start stamp sent over UDP for latency, and the worker's RSS."""

from __future__ import annotations

import socket
import struct
import time

from dbqueue import supervisor


def noop() -> None:
    return None


def stamp(port: int) -> None:
    """Send time.monotonic() (system-wide on Linux) to the benchmark at the task's start."""
    now = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(struct.pack("!d", now), ("127.0.0.1", port))


def rss() -> float:
    """Resident memory of the worker process running this task, in MiB."""
    return supervisor.rss_mb()


async def wait_async(seconds: float) -> None:
    """An I/O-bound task as typical background work is (an HTTP call, a mail): it awaits."""
    import asyncio

    await asyncio.sleep(seconds)


def wait_blocking(seconds: float) -> None:
    """The same wait through a blocking call (a sync HTTP client), for --threads."""
    time.sleep(seconds)
