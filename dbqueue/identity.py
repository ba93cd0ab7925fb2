"""Who and where a worker is: its name, and the process table it can probe.

A worker may judge another worker dead by its pid only when both see the same process
table: the same kernel boot and the same PID namespace. The hostname alone is not that:
containers with `--network host` (or Kubernetes `hostNetwork: true`) share the hostname
and have process tables of their own, so pid 7 in one is not pid 7 in the other. The
`host_id` stored in `workers` is hostname + boot id + PID-namespace inode; workers whose
`host_id` differs from ours are judged by their heartbeat alone.
"""

from __future__ import annotations

import functools
import os
import secrets
import socket


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


@functools.cache
def host_id() -> str:
    """This process table's identity: `hostname/boot id/pid namespace inode`.

    On a system without /proc (macOS) the parts that cannot be read are `-`: the pid probe
    then still runs between workers of one host, which share one process table there.
    """
    boot = _read("/proc/sys/kernel/random/boot_id") or "-"
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = "-"
    return f"{socket.gethostname()}/{boot}/{pidns}"


def worker_name() -> str:
    """`hostname:pid:random`: readable in logs, unique across hosts and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def pid_alive(pid: int) -> bool:
    """Whether `pid` names a live process in this PID namespace."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
