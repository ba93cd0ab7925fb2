"""LISTEN/NOTIFY wake-ups for idle workers (PostgreSQL only).

Owns one thread per worker process with its own psycopg connection (never from the pool: a
LISTENing session must stay open and must not be handed to anyone else) that LISTENs on
`engines.postgresql.NOTIFY_CHANNEL` and sets the worker's `wakeup` event when a notification
names one of its queues. Enqueue sends at most one NOTIFY per queue per interval
(engines.postgresql.NotifyLimiter), so notifications are hints, never the only way a task is
found: the worker keeps polling at `--sleep-delay` and sleeps until the next `run_at` at the
latest.

LISTEN sessions die silently (server restart, pg_terminate_backend, a half-open TCP
connection: graphile-worker #541, pg-boss #850). The thread notices the broken connection
(TCP keepalives catch the half-open case), logs one WARNING, and reconnects with a short,
capped backoff; while it is down, polling covers the gap. Once back it wakes the worker,
since notifications sent meanwhile are lost.

Behind a transaction pooler (PgBouncer's `pool_mode = transaction`) a LISTEN registers in a
server session the pooler hands to other clients as soon as the statement ends: its
notifications go nowhere. There the listener connects to DBQUEUE_LISTEN_URL, a direct URL of
the same database, when one is given; without it there is no listener and workers poll at
`--sleep-delay`, which `announce_polling` says once at startup.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from dbqueue import config, database, errors
from dbqueue.engines import postgresql

if TYPE_CHECKING:  # imported when a listener starts: `dbqueue` stays quick to start
    import psycopg

log = logging.getLogger("dbqueue.listener")

LIVENESS_CHECK = 30.0  # seconds between looks at a silent connection's state
RECONNECT_FIRST = 0.1  # seconds before the first reconnection attempt
RECONNECT_MAX = 2.0  # cap of the reconnection backoff (the issue asks for "within seconds")


def supported(engine: sa.Engine) -> bool:
    """Whether this engine's database can LISTEN (PostgreSQL through psycopg 3)."""
    return database.is_psycopg(engine)


def connect_params(engine: sa.Engine, url: str | None = None) -> dict[str, Any]:
    """psycopg.connect() keyword arguments for the engine's database (or for `url`, the
    direct DBQUEUE_LISTEN_URL), with keepalives."""
    target = engine.url
    if url is not None:
        target = config.driver_url(url)
        if target.get_backend_name() not in {"postgresql", "postgres"}:
            raise errors.ConfigurationError(
                f"DBQUEUE_LISTEN_URL={config.redact(target)} is not a PostgreSQL URL: give the "
                "database's own address (not the pooler's), e.g. postgresql://user@db-host/dbname"
            )
    _, params = engine.dialect.create_connect_args(target)
    params = {k: v for k, v in params.items() if k != "context"}
    params.update(
        autocommit=True,
        connect_timeout=10,
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
        application_name="dbqueue-listener",
    )
    return params


def start(
    settings: config.Settings,
    engine: sa.Engine,
    wakeup: threading.Event,
    queues: Sequence[str] | None = None,
    *,
    name: str = "dbqueue-listener",
) -> Listener | None:
    """A started listener for a worker, or None when the worker must poll: the database
    cannot LISTEN (SQLite), or it is reached through a transaction pooler and no direct
    DBQUEUE_LISTEN_URL was given (a LISTEN through the pooler would hear nothing)."""
    if not supported(engine):
        return None
    if settings.listen_url is None and settings.transaction_pooled():
        return None
    listener = Listener(engine, wakeup, queues, name=name, url=settings.listen_url)
    listener.start()
    return listener


def announce_polling(settings: config.Settings, sleep_delay: float) -> None:
    """Say once, at the start of `dbqueue work`, that its workers will poll because they
    are behind a transaction pooler without DBQUEUE_LISTEN_URL, or on MySQL/MariaDB."""
    if database.is_mysql(settings.get_engine()):
        log.info(
            "workers poll for new tasks every %gs (--sleep-delay): MySQL/MariaDB has no "
            "LISTEN/NOTIFY, so an idle worker starts a new task within that delay; lower it "
            "for less latency (docs/engines.md)",
            sleep_delay,
            extra={"event": "listener_polling"},
        )
        return
    if not settings.notify or settings.listen_url is not None:
        return
    if not settings.transaction_pooled():
        return
    log.info(
        "workers poll for new tasks every %gs (--sleep-delay): LISTEN cannot work through a "
        "transaction pooler (PgBouncer) and DBQUEUE_LISTEN_URL is not set; set it to the "
        "database's direct URL to wake workers at once",
        sleep_delay,
        extra={"event": "listener_polling"},
    )


class Listener(threading.Thread):
    """Sets `wakeup` when a NOTIFY names one of `queues` (any queue when `queues` is None)."""

    def __init__(
        self,
        engine: sa.Engine,
        wakeup: threading.Event,
        queues: Sequence[str] | None = None,
        *,
        name: str = "dbqueue-listener",
        url: str | None = None,
    ) -> None:
        super().__init__(name=name, daemon=True)
        if not supported(engine):
            raise ValueError(
                f"LISTEN/NOTIFY needs PostgreSQL through psycopg, not {engine.dialect.name}"
                f"+{engine.dialect.driver}"
            )
        self.params = connect_params(engine, url)
        self.wakeup = wakeup
        self.queues = frozenset(queues) if queues else None
        self.connected = threading.Event()
        self.backend_pid: int | None = None
        self.losses = 0  # times the connection was lost (each logged once)
        self.last_notify = float("-inf")  # time.monotonic() of the last matching NOTIFY
        self._stop_event = threading.Event()
        # stop() writes a byte here: the wait for notifications wakes at once, with no polling
        self._stop_reader, self._stop_writer = socket.socketpair()
        self._conn: psycopg.Connection[Any] | None = None

    def catch_up_in(self) -> float | None:
        """Seconds until one more look is due after the last NOTIFY, or None.

        Enqueuers skip a NOTIFY sent less than `postgresql.NOTIFY_MIN_INTERVAL` after the previous
        one, so a task committed just after the one that woke us may come unannounced: one
        claim two intervals after the last notification finds it.
        """
        due = self.last_notify + 2 * postgresql.NOTIFY_MIN_INTERVAL - time.monotonic()
        return due if due > 0 else None

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_event.set()
        try:
            self._stop_writer.send(b"x")
        except OSError:  # stopped before: the pair is closed
            pass
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        import psycopg

        delay = RECONNECT_FIRST
        lost = False
        while not self._stop_event.is_set():
            try:
                conn = self._connect()
                if lost:
                    log.info(
                        "LISTEN connection re-established (backend %s)",
                        self.backend_pid,
                        extra={"event": "listener_reestablished"},
                    )
                lost, delay = False, RECONNECT_FIRST
                self._relay(conn)
            except psycopg.Error as exc:
                self.connected.clear()
                self.backend_pid = None
                if not lost:
                    lost = True
                    self.losses += 1
                    first_line = (str(exc).strip().splitlines() or [""])[0]
                    log.warning(
                        "LISTEN connection lost (%s: %s); reconnecting, polling meanwhile",
                        type(exc).__name__,
                        first_line,
                        extra={"event": "listener_lost"},
                    )
                if self._stop_event.wait(delay):
                    break
                delay = min(delay * 2, RECONNECT_MAX)
            finally:
                self._close()
        self.connected.clear()
        self._stop_reader.close()
        self._stop_writer.close()

    def _connect(self) -> psycopg.Connection[Any]:
        import psycopg

        conn = psycopg.connect(**self.params)
        self._conn = conn
        conn.execute(f"LISTEN {postgresql.NOTIFY_CHANNEL}")
        self.backend_pid = conn.info.backend_pid
        self.connected.set()
        self.wakeup.set()  # notifications sent while we were not listening are lost: look now
        return conn

    def _relay(self, conn: psycopg.Connection[Any]) -> None:
        """Relay notifications until stopped; raises when the connection breaks.

        The thread sleeps in select() on the connection's socket and the stop pair, and
        reads notifications only when the socket has data. `conn.notifies(timeout=...)`
        polled instead: each call costs about 0.7 ms of CPU, four per second were ~2.7 ms
        of CPU per second per idle worker (measured; a tenth of 32 idle workers' whole
        cost on 2 cores). A dead server or a half-open connection (keepalives) makes the
        socket readable, and notifies() then raises.
        """
        sockets = [conn.fileno(), self._stop_reader.fileno()]
        while not self._stop_event.is_set():
            ready, _, _ = select.select(sockets, [], [], LIVENESS_CHECK)
            if sockets[1] in ready:
                return
            if ready:
                for notify in conn.notifies(timeout=0):
                    if self.queues is None or notify.payload in self.queues:
                        self.last_notify = time.monotonic()
                        self.wakeup.set()
            if conn.closed or conn.broken:
                import psycopg

                raise psycopg.OperationalError("the LISTEN connection was closed")

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a broken connection may raise; nothing to save
                pass
