"""A throwaway MariaDB server from the local binaries, for tests that restart the server.

The suite must own the server it restarts (never the machine's), so this runs
`mariadb-install-db` into a temporary data directory and `mariadbd` on a free port and its own
socket (as the `mysql` user when the tests run as root). Same interface as tests/pgcluster.py:
`url`, `start()`, `stop(mode)`, `restart(mode)`, `destroy()`, `wait_ready()`. The modes map to
PostgreSQL's: "fast" is a clean shutdown (SIGTERM), "immediate" a crash (SIGKILL: InnoDB
recovers on start), "smart" the same as "fast".
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

DATABASE = "dbqueue"


def _bin(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(
        f"{name} not found: install the MariaDB server (apt-get install mariadb-server)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    kind = "mariadb"

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="dbqueue-mariadb-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        self.socket = os.path.join(self.dir, "mariadb.sock")
        self.port = _free_port()
        self.as_mysql = os.geteuid() == 0
        self.process: subprocess.Popen[bytes] | None = None
        if self.as_mysql:
            shutil.chown(self.dir, "mysql", "mysql")
        user = ["--user=mysql"] if self.as_mysql else []
        subprocess.run(
            [
                _bin("mariadb-install-db"),
                "--no-defaults",
                f"--datadir={self.data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
                *user,
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
        self.start()
        try:
            admin = self._admin()
            admin(f"CREATE DATABASE {DATABASE}")
        finally:
            self.stop()

    @property
    def url(self) -> str:
        return f"mysql+mysqldb://root@127.0.0.1:{self.port}/{DATABASE}"

    def _admin(self) -> _Admin:
        return _Admin(self.socket)

    def _command(self) -> list[str]:
        command = [
            _bin("mariadbd"),
            "--no-defaults",
            f"--datadir={self.data}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.socket}",
            f"--pid-file={os.path.join(self.dir, 'mariadbd.pid')}",
            f"--log-error={self.log}",
            "--skip-name-resolve",
            # a server crash (SIGKILL) keeps every commit; only the OS crashing could lose some
            "--innodb-flush-log-at-trx-commit=2",
            "--innodb-doublewrite=0",
            "--innodb-buffer-pool-size=64M",
            "--max-connections=500",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
        ]
        if self.as_mysql:
            command.append("--user=mysql")
        return command

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("throwaway MariaDB is already running")
        self.process = subprocess.Popen(
            self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.wait_ready(timeout=120)

    def stop(self, mode: str = "fast") -> None:
        process = self.process
        if process is None or process.poll() is not None:
            self.process = None
            return
        process.send_signal(signal.SIGKILL if mode == "immediate" else signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        self.process = None

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def wait_ready(self, timeout: float = 30) -> None:
        """Until the server accepts a login (its port opens before InnoDB is ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"throwaway MariaDB exited; its log: {self._log_tail()}")
            try:
                self._admin()("SELECT 1")
                return
            except subprocess.CalledProcessError:
                time.sleep(0.1)
        raise RuntimeError(f"throwaway MariaDB did not come up; its log: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with open(self.log, errors="replace") as fh:
                return fh.read()[-2000:]
        except OSError:
            return "(no log)"


class _Admin:
    """One statement through the `mariadb` client on the server's socket (no Python driver
    needed, and no TCP: the port may not be open yet)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def __call__(self, sql: str) -> str:
        result = subprocess.run(
            [
                _bin("mariadb"),
                "--no-defaults",
                f"--socket={self.socket_path}",
                "-uroot",
                "-N",
                "-e",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return result.stdout
