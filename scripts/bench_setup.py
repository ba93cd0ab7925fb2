"""What every dbqueue benchmark scenario stands on: throwaway databases with dbqueue's schema,
real `dbqueue workoff` processes, and the drain rate read from the database clock.

Shared by scripts/bench.py and the scenario modules it runs (bench_load.py, bench_history.py,
bench_io.py), so that none of them imports the script itself."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bench_peers
import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict

from dbqueue import config, database
from dbqueue.schema import tasks

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
Figures = dict[str, Any]
SECRET = "bench-" + secrets.token_hex(24)
WORKER_TIMEOUT = 600  # seconds a workoff may take before the scenario is reported as an error

# -- settings, databases, worker processes -----------------------------------------------------


def sa_url(dsn: str) -> str:
    """A libpq DSN (bench_peers' throwaway databases) as a SQLAlchemy psycopg URL."""
    params = conninfo_to_dict(dsn)
    return sa.URL.create(
        "postgresql+psycopg",
        username=params.get("user"),
        password=params.get("password"),
        host=params.get("host"),
        port=int(params["port"]) if params.get("port") else None,
        database=params.get("dbname"),
    ).render_as_string(hide_password=False)


@contextlib.contextmanager
def pg_settings(admin_dsn: str, name: str) -> Iterator[config.Settings]:
    """A migrated throwaway PostgreSQL database, dropped afterwards."""
    with bench_peers.throwaway_db(admin_dsn, name) as dsn:
        settings = config.Settings(database_url=sa_url(dsn), secret_key=SECRET)
        try:
            database.migrate(settings)
            yield settings
        finally:
            settings.get_engine().dispose()


@contextlib.contextmanager
def sqlite_settings() -> Iterator[config.Settings]:
    with tempfile.TemporaryDirectory(prefix="dbqueue_bench_") as tmp:
        settings = config.Settings(
            database_url=f"sqlite:///{Path(tmp) / 'bench.sqlite3'}", secret_key=SECRET
        )
        try:
            database.migrate(settings)
            yield settings
        finally:
            settings.get_engine().dispose()


def worker_env(settings: config.Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DBQUEUE_DATABASE_URL=settings.database_url,
        DBQUEUE_SECRET_KEY=SECRET,
        PYTHONPATH=os.pathsep.join([str(SCRIPTS), str(ROOT), env.get("PYTHONPATH", "")]),
    )
    env.pop("DBQUEUE_INLINE", None)
    return env


def dbqueue_command(*args: str, log_level: str = "WARNING", log_format: str = "text") -> list[str]:
    # WARNING by default: no per-task INFO line (the peers' loggers are silenced too);
    # logging_drains measures what the line costs
    return [
        sys.executable,
        "-m",
        "dbqueue",
        "--log-level",
        log_level,
        "--log-format",
        log_format,
        *args,
    ]


def workoff(
    settings: config.Settings,
    concurrency: int,
    *extra: str,
    log_level: str = "WARNING",
    log_format: str = "text",
    stderr: list[str] | None = None,
) -> float:
    """Run `dbqueue workoff` to the end (its stderr read through a pipe, as a terminal or
    journald would); returns its wall-clock seconds, and appends its stderr to `stderr`."""
    started = time.monotonic()
    done = subprocess.run(
        dbqueue_command(
            "workoff",
            "--concurrency",
            str(concurrency),
            "--import",
            "bench_tasks",
            *extra,
            log_level=log_level,
            log_format=log_format,
        ),
        env=worker_env(settings),
        cwd=ROOT,  # `python -m` puts the current directory first on sys.path
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT,
    )
    elapsed = time.monotonic() - started
    if stderr is not None:
        stderr.append(done.stderr)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"dbqueue workoff exited {done.returncode}: {tail}")
    return elapsed


def scalar(settings: config.Settings, sql: str) -> Any:
    with settings.get_engine().connect() as conn:
        return conn.execute(sa.text(sql)).scalar()


def vacuum(settings: config.Settings) -> None:
    if settings.get_engine().dialect.name != "postgresql":
        return
    with settings.get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.exec_driver_sql("VACUUM ANALYZE tasks")


def drain_rate(
    settings: config.Settings, jobs: int, concurrency: int, *extra: str, **workoff_options: Any
) -> Figures:
    """`dbqueue workoff --concurrency N` (and `extra` options) over the queued tasks; the rate
    from the DB clock."""
    vacuum(settings)
    wall = workoff(settings, concurrency, *extra, **workoff_options)
    with settings.get_engine().connect() as conn:
        first, last, done = conn.execute(
            sa.select(
                sa.func.min(tasks.c.started_at),
                sa.func.max(tasks.c.finished_at),
                sa.func.count(),
            ).where(tasks.c.status == "succeeded")
        ).one()
    if done != jobs:
        raise RuntimeError(f"{done} of {jobs} tasks succeeded")
    span = (last - first).total_seconds()
    return {"drain_per_s": jobs / span, "drain_wall_per_s": jobs / wall, "drain_seconds": span}
