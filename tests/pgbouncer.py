"""A PgBouncer of the test's own, in front of the local PostgreSQL, for tests that cross a pooler.

`PgBouncer.start()` runs Debian's `pgbouncer` binary (never the system service) with its own
ini, auth file and free port, in transaction pooling mode by default, pointing at the server
of the test databases (DBQUEUE_TEST_PG_URL's host, else 127.0.0.1:5432) for any database name.
`url(database)` is a dbqueue URL through it; `stats(database)` reads its admin console, which
shows that traffic really went through the pooler. `stop()` ends it; the `pgbouncer` fixture
of tests/test_pgbouncer.py does both.

PgBouncer refuses to run as root, so under root (CI here) it runs as the owner of the
PostgreSQL data (`-u postgres`) and its files are made readable to that user.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

USER = "postgres"
PASSWORD = "pgbouncer-test-password"


def binary() -> str | None:
    """Debian's pgbouncer (in /usr/sbin, which a non-root PATH may lack), or None."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/sbin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PgBouncer:
    """One pgbouncer process; `log()` is everything it wrote."""

    def __init__(
        self,
        server_url: str,
        *,
        pool_mode: str = "transaction",
        pool_size: int = 2,
        max_client_conn: int = 100,
    ) -> None:
        server = sa.make_url(server_url)
        self.server_host = server.host or "127.0.0.1"
        self.server_port = server.port or 5432
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="dbqueue-pgbouncer-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._log = self.dir / "pgbouncer.log"
        self._final_log = ""  # what it wrote, kept once its directory is removed

    def start(self, timeout: float = 15.0) -> PgBouncer:
        program = binary()
        if program is None:
            raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer)")
        self.dir.chmod(0o755)  # the pgbouncer user reads its ini and auth file here
        users = self.dir / "userlist.txt"
        users.write_text(f'"{USER}" "{PASSWORD}"\n')
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host={self.server_host} port={self.server_port}\n"
            "\n[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = md5\n"
            f"auth_file = {users}\n"
            f"admin_users = {USER}\n"
            f"pool_mode = {self.pool_mode}\n"
            f"default_pool_size = {self.pool_size}\n"
            f"max_client_conn = {self.max_client_conn}\n"
            "server_login_retry = 1\n"
            "query_wait_timeout = 30\n"  # a client waiting that long for a session fails
        )
        for path in (users, ini):
            path.chmod(0o644)
        command = [program]
        if os.geteuid() == 0:
            command += ["-u", USER]
        with self._log.open("wb") as log:
            self.process = subprocess.Popen(
                [*command, str(ini)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited at start:\n{self.log()}")
            try:
                self.stats("pgbouncer")
                return self
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"pgbouncer did not answer in {timeout}s:\n{self.log()}"
                    ) from exc
                time.sleep(0.05)

    def url(self, database: str, **query: str) -> str:
        """A dbqueue URL of `database` through this pooler (query: extra URL parameters)."""
        url = sa.URL.create(
            "postgresql+psycopg",
            username=USER,
            password=PASSWORD,
            host="127.0.0.1",
            port=self.port,
            database=database,
            query=query,
        )
        return url.render_as_string(hide_password=False)

    def stats(self, database: str) -> dict[str, Any]:
        """SHOW STATS of the admin console for `database`: total_xact_count and the rest."""
        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=USER,
            password=PASSWORD,
            dbname="pgbouncer",
            autocommit=True,
            connect_timeout=5,
        ) as conn:
            cursor = conn.execute("SHOW STATS")
            names = [column.name for column in cursor.description or ()]
            for row in cursor.fetchall():
                if row[0] == database:
                    return dict(zip(names, row, strict=True))
        return {}

    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else self._final_log

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the tests are done with it: fast exit
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self._final_log = self.log()
        shutil.rmtree(self.dir, ignore_errors=True)
