"""Hosts over a real network, for tests: Linux network namespaces linked to a database host.

Every other process-level test shares one host and one loopback; a fleet does not. This
harness makes, for one test:

    database host   a network namespace with a bridge (10.231.0.1/24) and a throwaway
                    PostgreSQL cluster listening on that address (tests/pgcluster.py)
    worker hosts    one network namespace each, linked to the bridge by a veth pair
                    (10.231.0.11, .12, ...), with its own hostname (UTS namespace) and its
                    own process table (PID namespace, pid 1 a small reaping init)

Workers reach PostgreSQL over TCP through their veth; the test itself talks to the server
through its Unix socket (the root namespace gets no address or route: nothing outside the
namespaces made here is touched, and no packet leaves them). Use it as

    def test_x(network):                       # the fixture: 3 hosts, migrated database
        host = network.hosts[0]
        worker = host.work("--import", "tests.netjobs", "--rescue-after", "3")
        network.db.wait_for("SELECT count(*) FROM workers", 1)
        host.cut()          # the switch port goes down: packets vanish, nothing errors
        host.restore()
        host.kill()         # SIGKILL to the host's init: every process on it dies
        worker.output()     # what the host's `dbqueue work` logged

or `with Network(hosts=2, tmp_path=...) as net:` for another shape. Everything is removed
at the end, failed test or not: processes, PostgreSQL, namespaces (their veths go with
them) and files. Root only: `skip_reason()` says why it cannot run elsewhere.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import dbqueue
from dbqueue import config, database
from tests import pgcluster
from tests.conftest import DB, ROOT, SECRET, Background

SUBNET = "10.231.0"  # private, and only ever configured inside namespaces made here
DB_ADDRESS = f"{SUBNET}.1"
PG_PORT = 5432  # the database host's own network namespace: no other server listens there
NS_PREFIX = "dbqnet"

# pid 1 of a worker host: names the host, then reaps orphans (a killed supervisor's children
# are re-parented to it) so they don't linger as zombies in the host's process table.
_INIT = """
import os, socket, sys, time
socket.sethostname(sys.argv[1])
print("up", flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.2)
"""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


def _die_with_test() -> None:
    """preexec_fn: SIGKILL this child when the test process dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _children(pid: int) -> list[int]:
    """Pids (root namespace) whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # the command name, in parentheses, may hold spaces: fields start after the last ')'
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _wait_child(pid: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = _children(pid)
        if children:
            return children[0]
        time.sleep(0.02)
    raise RuntimeError(f"process {pid} started no child within {timeout}s")


def skip_reason() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root: it makes network namespaces with `ip netns` (CI runs as root)"
    for tool in ("ip", "unshare", "nsenter", "runuser"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"{NS_PREFIX}-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as exc:
        return f"`ip netns add` is not permitted here: {exc}"
    _ip("netns", "del", probe)
    return None


def remove_leftovers() -> None:
    """Delete namespaces this harness made in runs that died before their teardown."""
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != NS_PREFIX or not parts[1].isdigit():
            continue
        if not os.path.exists(f"/proc/{parts[1]}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


class NetCluster(pgcluster.Cluster):
    """A throwaway cluster started inside the database host's network namespace."""

    def __init__(self, netns: str, address: str) -> None:
        self.netns = netns
        super().__init__()
        with open(os.path.join(self.data, "postgresql.conf"), "a") as fh:
            fh.write(f"port = {PG_PORT}\nlisten_addresses = '{address}'\nmax_connections = 200\n")
        with open(os.path.join(self.data, "pg_hba.conf"), "a") as fh:
            fh.write(f"host all all {SUBNET}.0/24 trust\n")
        self.port = PG_PORT

    def _run(self, *args: str) -> None:
        command = ["ip", "netns", "exec", self.netns]
        if self.as_postgres:
            command += ["runuser", "-u", "postgres", "--"]
        subprocess.run([*command, *args], check=True, capture_output=True, timeout=120)

    @property
    def url(self) -> str:
        """For the test process: the Unix socket (the root namespace has no route to it)."""
        return f"postgresql+psycopg://postgres@/postgres?host={self.dir}&port={self.port}"

    @property
    def tcp_url(self) -> str:
        """For the worker hosts: over their link."""
        return f"postgresql+psycopg://postgres@{DB_ADDRESS}:{self.port}/postgres"


class HostProcess(Background):
    """A command running on a worker host (`nsenter` into its namespaces, then the command).

    `pid` is the command's own pid in the root namespace, for signals: nsenter waits for it
    but does not pass signals on.
    """

    def __init__(self, command: list[str], **kwargs: Any) -> None:
        super().__init__(command, **kwargs)
        self.pid_in_root = _wait_child(self.pid)

    def send(self, sig: int) -> None:
        try:
            os.kill(self.pid_in_root, sig)
        except ProcessLookupError:
            pass

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> str:
        """Signal the command, wait for it, return everything it logged."""
        if self.poll() is None:
            self.send(sig)
        return self.communicate(timeout=timeout)[1]


class Host:
    """One worker host: a network, UTS and PID namespace, linked to the database host."""

    def __init__(self, network: Network, index: int) -> None:
        self.network = network
        self.index = index
        self.hostname = f"host{index}"
        self.netns = f"{network.prefix}-h{index}"
        self.address = f"{SUBNET}.{11 + index}"
        self.port = f"h{index}"  # its end of the veth on the database host's bridge
        self.init: subprocess.Popen[str] | None = None
        self.init_pid = 0
        self.processes: list[HostProcess] = []

    def create(self) -> None:
        db = self.network.db_netns
        _ip("netns", "add", self.netns)
        _ip("-n", self.netns, "link", "set", "lo", "up")
        _ip("-n", self.netns, "link", "add", "eth0", "type", "veth", "peer", self.port, "netns", db)
        _ip("-n", self.netns, "addr", "add", f"{self.address}/24", "dev", "eth0")
        _ip("-n", self.netns, "link", "set", "eth0", "up")
        _ip("-n", db, "link", "set", self.port, "master", "br0", "up")
        self.boot()

    def boot(self) -> None:
        """Start the host's init: a fresh PID namespace (a killed host can be booted again)."""
        with open(self.network.tmp_path / f"{self.hostname}-init.log", "ab") as log:
            self.init = subprocess.Popen(
                [
                    *("ip", "netns", "exec", self.netns),
                    *("unshare", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child"),
                    *(sys.executable, "-c", _INIT, self.hostname),
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                preexec_fn=_die_with_test,
            )
        assert self.init.stdout is not None
        if self.init.stdout.readline().strip() != "up":
            raise RuntimeError(f"{self.hostname}: init did not start")
        self.init_pid = _wait_child(self.init.pid)

    def run(self, *command: str, env: dict[str, str] | None = None) -> HostProcess:
        """Start `command` on this host (in its network, UTS, PID and mount namespaces)."""
        if self.init_pid == 0 or not os.path.exists(f"/proc/{self.init_pid}"):
            raise RuntimeError(f"{self.hostname} is not running (killed? call boot())")
        enter = ["nsenter", "-t", str(self.init_pid), "-p", "-u", "-n", "-m", "--"]
        process = HostProcess(
            [*enter, *command],
            env=self.network.env(env),
            cwd=self.network.tmp_path,
            preexec_fn=_die_with_test,
        )
        self.processes.append(process)
        return process

    def dbqueue(self, *args: str, env: dict[str, str] | None = None) -> HostProcess:
        """`dbqueue ARGS` on this host, against the database over the link."""
        return self.run(sys.executable, "-m", "dbqueue", *args, env=env)

    def work(self, *args: str, env: dict[str, str] | None = None) -> HostProcess:
        """`dbqueue work ARGS` on this host."""
        return self.dbqueue("work", *args, env=env)

    def cut(self) -> None:
        """Take the host's switch port down: its packets vanish without an error on either
        side (a pulled cable, a dead switch), so open connections hang rather than fail."""
        _ip("-n", self.network.db_netns, "link", "set", self.port, "down")

    def restore(self) -> None:
        _ip("-n", self.network.db_netns, "link", "set", self.port, "up")

    def kill(self) -> None:
        """SIGKILL the host's init: the kernel then kills every process in its PID namespace
        at once (a machine losing power, as far as its processes can tell)."""
        if self.init is None:
            return
        os.kill(self.init_pid, signal.SIGKILL)
        self.init.wait(timeout=30)
        if self.init.stdout is not None:
            self.init.stdout.close()
        self.init = None
        for process in self.processes:
            process.communicate(timeout=30)

    def destroy(self) -> None:
        try:
            self.kill()
        finally:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=30)


class Network:
    """A database host and `hosts` worker hosts; a context manager that removes them all."""

    def __init__(self, tmp_path: Path, hosts: int = 3) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError(f"hosts must be between 1 and 200, not {hosts}")
        self.tmp_path = tmp_path
        self.prefix = f"{NS_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.db_netns = f"{self.prefix}-db"
        self.hosts = [Host(self, i) for i in range(hosts)]
        self.cluster: NetCluster | None = None
        self._db: DB | None = None

    @property
    def db(self) -> DB:
        """The database, from the test's side: `scalar`, `rows`, `wait_for`, `engine`."""
        if self._db is None:
            raise RuntimeError("the network is not up: use it as a context manager")
        return self._db

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment of processes on worker hosts: the database over the link, the key."""
        assert self.cluster is not None
        env = dict(os.environ)
        env.update(
            DBQUEUE_DATABASE_URL=self.cluster.tcp_url,
            DBQUEUE_SECRET_KEY=SECRET,
            PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        env.pop("DBQUEUE_INLINE", None)
        env.update(extra or {})
        return env

    def __enter__(self) -> Network:
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _up(self) -> None:
        remove_leftovers()
        _ip("netns", "add", self.db_netns)
        _ip("-n", self.db_netns, "link", "set", "lo", "up")
        _ip("-n", self.db_netns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.db_netns, "addr", "add", f"{DB_ADDRESS}/24", "dev", "br0")
        _ip("-n", self.db_netns, "link", "set", "br0", "up")
        self.cluster = NetCluster(self.db_netns, DB_ADDRESS)
        self.cluster.start()
        settings = dbqueue.configure(database_url=self.cluster.url)
        database.migrate(settings)
        self._db = DB("postgresql", self.cluster.url, settings, self.tmp_path)
        for host in self.hosts:
            host.create()

    def close(self) -> None:
        """Remove everything, each step even when another failed."""
        for host in self.hosts:
            try:
                host.destroy()
            except Exception as exc:  # every host must be tried
                print(f"netns teardown: {host.hostname}: {exc}", file=sys.stderr)
        if self._db is not None:
            self._db.engine.dispose()
        if self.cluster is not None:
            self.cluster.destroy()
        subprocess.run(["ip", "netns", "del", self.db_netns], capture_output=True, timeout=30)

    def wait_workers(self, count: int, timeout: float = 60) -> None:
        """Wait until `count` workers are registered; else fail with what each host's
        processes logged (a `dbqueue work` that exited says why there)."""
        deadline = time.monotonic() + timeout
        registered = None
        while time.monotonic() < deadline:
            registered = self.db.scalar("SELECT count(*) FROM workers")
            if registered == count:
                return
            time.sleep(0.05)
        logs = "\n".join(
            f"--- {host.hostname}: {' '.join(map(str, p.args))[-120:]} "
            f"(exit {p.poll()})\n{p.output()[-2000:]}"
            for host in self.hosts
            for p in host.processes
        )
        raise AssertionError(f"{registered} workers registered, not {count}, in {timeout}s\n{logs}")

    def sql(self, statement: str, **params: Any) -> list[Any]:
        """Run one statement on the database (committed); its rows, if it returns any."""
        with self.db.engine.begin() as conn:
            result = conn.execute(sa.text(statement), params)
            return list(result) if result.returns_rows else []


@pytest.fixture
def network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Network]:
    """3 worker hosts and a database host with a migrated dbqueue schema (PostgreSQL only:
    SQLite is a file, not a server on a network). dbqueue in the test process is configured
    for it, so `dbqueue.enqueue` and `Task.get` work as usual."""
    reason = skip_reason()
    if reason is not None:
        if os.environ.get("CI"):  # CI here is root: these tests must run there
            pytest.fail(f"{reason} (CI is set: these tests must run)")
        pytest.skip(reason)
    monkeypatch.setenv("DBQUEUE_SECRET_KEY", SECRET)
    monkeypatch.delenv("DBQUEUE_INLINE", raising=False)
    with Network(tmp_path, hosts=3) as net:
        yield net
    config._current = None
