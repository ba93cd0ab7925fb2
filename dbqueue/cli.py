"""The `dbqueue` command: thin click commands over the library.

Every DbqueueError becomes one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
import importlib
import os
import random
import re
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from dbqueue import errors, logs


class _Lazy:
    """A module imported when first used: `dbqueue --help`, and every command until it needs
    them, runs without SQLAlchemy, alembic, the bus or the counters loaded."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)


if TYPE_CHECKING:
    import sqlalchemy as sa

    from dbqueue import (
        bus,
        config,
        control,
        counters,
        database,
        listener,
        stats,
        store,
        supervisor,
        worker,
    )
else:
    sa = _Lazy("sqlalchemy")
    bus, config, control, counters, database, listener, stats, store, supervisor, worker = (
        _Lazy(f"dbqueue.{name}")
        for name in (
            "bus",
            "config",
            "control",
            "counters",
            "database",
            "listener",
            "stats",
            "store",
            "supervisor",
            "worker",
        )
    )

EXIT_CONFIG = 2


class Context:
    def __init__(self, database_url: str | None, log_level: str, log_format: str) -> None:
        self.database_url = database_url
        self.log_level = log_level
        self.log_format = log_format

    @functools.cached_property
    def settings(self) -> config.Settings:  # made when a command needs it, not for --help
        url = self.database_url
        return config.Settings(database_url=url) if url else config.Settings()

    def spec(
        self, queues: Sequence[str], imports: Sequence[str], **options: Any
    ) -> supervisor.ChildSpec:
        return supervisor.ChildSpec(
            database_url=self.settings.database_url,
            queues=list(queues) or None,
            imports=list(imports),
            log_level=self.log_level,
            log_format=self.log_format,
            **options,
        )


pass_context = click.make_pass_decorator(Context)

queue_option = click.option(
    "--queue",
    "-q",
    "queues",
    multiple=True,
    metavar="NAME",
    help="Only this queue (repeatable). Default: all queues.",
)
import_option = click.option(
    "--import",
    "-i",
    "imports",
    multiple=True,
    metavar="MODULE",
    help="Import this module first, so its tasks are known (repeatable).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--database-url",
    envvar="DBQUEUE_DATABASE_URL",
    metavar="URL",
    help="SQLAlchemy URL [env DBQUEUE_DATABASE_URL; default sqlite:///dbqueue.sqlite3]",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Log lines at this level and above.",
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="One line per event, as text or as JSON objects.",
)
@click.version_option(package_name="dbqueue")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, log_level: str, log_format: str) -> None:
    """dbqueue: background tasks in the database your application already has.

    \b
    First time:      dbqueue migrate
    Run tasks:       dbqueue work --import myapp.tasks
    Drain and exit:  dbqueue workoff --import myapp.tasks
    See the queues:  dbqueue status
    Periodic tasks:  dbqueue periodic list --import myapp.tasks

    Run `dbqueue COMMAND --help` for a command's options.
    """
    logs.setup(log_level, log_format)
    ctx.obj = Context(database_url, log_level, log_format)


def _worker_options(f: Any) -> Any:
    for option in reversed(
        [
            queue_option,
            import_option,
            click.option(
                "--concurrency",
                "-c",
                default=1,
                show_default=True,
                type=click.IntRange(1),
                metavar="N",
                help="Worker processes.",
            ),
            click.option(
                "--threads",
                "-t",
                metavar="T",
                default=1,
                show_default=True,
                type=click.IntRange(1),
                help="Tasks run at once in each process, in threads (for blocking I/O; "
                "per-task timeouts then apply to async tasks only).",
            ),
            click.option(
                "--async-concurrency",
                "async_concurrency",
                metavar="N",
                default=None,
                type=click.IntRange(1),
                help="`async def` tasks run at once in each process, on its event loop "
                "[default: DBQUEUE_ASYNC_CONCURRENCY or 10].",
            ),
            click.option(
                "--sleep-delay",
                default=1.0,
                show_default=True,
                type=float,
                metavar="SECONDS",
                help="Seconds between polls when idle.",
            ),
            click.option(
                "--rescue-after",
                default=15.0,
                show_default=True,
                type=float,
                metavar="SECONDS",
                help="Seconds without heartbeat after which a worker's tasks are rescued.",
            ),
            click.option(
                "--timeout",
                "default_timeout",
                type=float,
                default=None,
                metavar="SECONDS",
                help="Default task timeout in seconds (a task's own timeout wins).",
            ),
        ]
    ):
        f = option(f)
    return f


@cli.command(short_help="Run tasks until stopped.")
@_worker_options
@click.option(
    "--max-tasks",
    type=click.IntRange(1),
    metavar="N",
    help="Recycle a worker process after N tasks.",
)
@click.option(
    "--max-memory",
    type=float,
    metavar="MB",
    help="Recycle a worker process whose memory exceeds MB (between tasks).",
)
@click.option(
    "--grace",
    default=30.0,
    show_default=True,
    type=float,
    metavar="SECONDS",
    help="Seconds running tasks get to finish after SIGTERM.",
)
@click.option(
    "--reload",
    is_flag=True,
    help="Development: restart the workers when a .py file under the current directory (or "
    "--reload-dir) changes, after their running tasks finish. Needs dbqueue[reload].",
)
@click.option(
    "--reload-dir",
    "reload_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    metavar="DIR",
    help="Watch this directory for --reload (repeatable; default: the current directory).",
)
@pass_context
def work(
    obj: Context,
    queues: tuple[str, ...],
    imports: tuple[str, ...],
    concurrency: int,
    threads: int,
    async_concurrency: int | None,
    sleep_delay: float,
    rescue_after: float,
    default_timeout: float | None,
    max_tasks: int | None,
    max_memory: float | None,
    grace: float,
    reload: bool,
    reload_dirs: tuple[str, ...],
) -> None:
    """Run tasks until stopped (SIGTERM/SIGINT finish running tasks first).

    A database that is down at start is waited for (capped backoff), not a reason to exit.
    Periodic tasks (@periodic) of the imported modules are enqueued when due.
    """
    _wait_for_database(obj)
    _preflight(obj, imports)
    spec = obj.spec(
        queues,
        imports,
        sleep_delay=sleep_delay,
        rescue_after=rescue_after,
        default_timeout=default_timeout,
        max_tasks=max_tasks,
        max_memory_mb=max_memory,
        threads=threads,
        async_concurrency=async_concurrency,
        grace=grace,
    )
    if reload_dirs and not reload:
        raise click.UsageError("--reload-dir is for --reload; add --reload")
    watch = (list(reload_dirs) or [os.getcwd()]) if reload else None
    listener.announce_polling(obj.settings, sleep_delay)
    boss = supervisor.Supervisor(spec, concurrency, grace=grace, reload_dirs=watch)
    boss.run()
    if boss.forced:
        sys.exit(130)


@cli.command(short_help="Run what is ready, print a summary, exit.")
@_worker_options
@pass_context
def workoff(
    obj: Context,
    queues: tuple[str, ...],
    imports: tuple[str, ...],
    concurrency: int,
    threads: int,
    async_concurrency: int | None,
    sleep_delay: float,
    rescue_after: float,
    default_timeout: float | None,
) -> None:
    """Run every task that is ready, show progress, print a summary, then exit.

    Exits 1 if any task raised (failed for good, or was scheduled for a retry). With nothing
    ready it exits at once, without starting worker processes.
    """
    _preflight(obj, imports)
    started = time.monotonic()
    with obj.settings.get_engine().connect() as conn:
        ready = store.ready_count(conn, list(queues) or None)
    if not ready:  # a worker process would claim nothing: none is started (cold start, cron)
        click.echo(summary_line(0, time.monotonic() - started, 0, 0, 0))
        _report_paused(obj, queues)
        return
    spec = obj.spec(
        queues,
        imports,
        burst=True,
        threads=threads,
        async_concurrency=async_concurrency,
        sleep_delay=sleep_delay,
        rescue_after=rescue_after,
        default_timeout=default_timeout,
    )
    progress = Progress(obj.settings, queues)
    summary = supervisor.Supervisor(spec, concurrency, on_progress=progress).run()
    progress.finish(summary)
    _report_paused(obj, queues)
    if summary.failed or summary.retried:
        sys.exit(1)


class Progress:
    """Workoff progress: a bar redrawn in place on a terminal, plain lines (one a second)
    otherwise, so logs and CI output stay readable."""

    WIDTH = 30

    def __init__(self, settings: config.Settings, queues: Sequence[str]) -> None:
        self.settings = settings
        self.queues = list(queues) or None
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, summary: worker.Summary) -> None:
        now = time.monotonic()
        if now - self.last < (0.2 if self.tty else 1.0):
            return
        self.last = now
        with self.settings.get_engine().begin() as conn:
            ready = store.ready_count(conn, self.queues)
        counts = (
            f"{summary.done} done ({summary.succeeded} succeeded, {summary.retried} retried, "
            f"{summary.failed} failed), {summary.rate:.0f}/s, {ready} ready"
        )
        if not self.tty:
            click.echo(f"workoff: {counts}", err=True)
            return
        total = max(summary.done + ready, 1)
        filled = int(self.WIDTH * summary.done / total)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        click.echo(
            f"\r[{bar}] {100 * summary.done // total:3d}% {counts}\x1b[K", err=True, nl=False
        )

    def finish(self, summary: worker.Summary) -> None:
        if self.tty and self.last:
            click.echo("", err=True)
        click.echo(
            summary_line(
                summary.done, summary.elapsed, summary.succeeded, summary.retried, summary.failed
            )
        )


def summary_line(done: int, elapsed: float, succeeded: int, retried: int, failed: int) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    return (
        f"workoff: {done} tasks in {elapsed:.1f}s ({rate:.0f}/s): {succeeded} succeeded, "
        f"{retried} retried, {failed} failed"
    )


def _report_paused(obj: Context, queues: Sequence[str]) -> None:
    """After workoff: name the paused queues it skipped that still hold ready tasks, so an
    empty run is not mistaken for an empty queue."""
    with obj.settings.get_engine().connect() as conn:
        paused = control.read_paused(conn)
        skipped = sorted(q for q in paused if not queues or q in queues)
        waiting = {q: store.ready_count(conn, [q]) for q in skipped}
    for queue_name, ready in waiting.items():
        click.echo(
            f"workoff: queue {queue_name} is paused ({ready} ready, not run); "
            f"`dbqueue resume {queue_name}` to run them"
        )


def _wait_for_database(obj: Context) -> None:
    """Retry the schema check while the database is unavailable; SIGTERM/SIGINT exit 0."""

    def leave(signum: int, frame: Any) -> None:
        sys.exit(0)

    previous = {s: signal.signal(s, leave) for s in (signal.SIGTERM, signal.SIGINT)}
    delay = 0.5
    try:
        while True:
            try:
                database.check_schema(obj.settings)
                return
            except errors.DatabaseUnavailable as exc:
                wait = delay * random.uniform(0.8, 1.2)
                click.echo(f"dbqueue: {exc}; retrying in {wait:.1f}s", err=True)
                time.sleep(wait)
                delay = min(delay * 2, 15.0)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _preflight(obj: Context, imports: Sequence[str], *, bus_sync: bool = False) -> None:
    """Fail fast, in one line, on a bad URL, a missing schema or a module that won't import.

    Then store the imported code's bus subscriptions (always with `bus_sync`).
    """
    database.check_schema(obj.settings)
    obj.settings.keyring()
    if imports:
        supervisor.import_modules(imports)
    if bus_sync or ("dbqueue.bus" in sys.modules and bus.subscriptions()):  # else: none
        bus.sync(settings=obj.settings)


@cli.command(short_help="Delete queued tasks.")
@queue_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_context
def clear(obj: Context, queues: tuple[str, ...], yes: bool) -> None:
    """Delete queued tasks (running and finished ones are kept)."""
    database.check_schema(obj.settings)
    where = f"queue(s) {', '.join(queues)}" if queues else "all queues"
    with obj.settings.get_engine().begin() as conn:
        queued = sum(
            q.ready + q.scheduled for q in stats.queued(conn) if not queues or q.queue in queues
        )
    if not yes:
        click.confirm(f"Delete {queued} queued task(s) in {where}?", abort=True)
    with obj.settings.get_engine().begin() as conn:
        deleted = store.clear(conn, list(queues) or None)
    click.echo(f"deleted {deleted} queued task(s) in {where}")


@cli.command(short_help="Create or upgrade dbqueue's tables.")
@click.option(
    "--revision",
    default="head",
    show_default=True,
    metavar="REV",
    help="Upgrade (or downgrade) to this revision of dbqueue's schema.",
)
@pass_context
def migrate(obj: Context, revision: str) -> None:
    """Create or upgrade dbqueue's tables (alembic, with its own version table)."""
    database.migrate(obj.settings, revision)
    with obj.settings.get_engine().connect() as conn:
        current = database.current_revision(conn)
    click.echo(
        f"{config.redact(obj.settings.database_url)} is at dbqueue schema revision {current}"
    )


@cli.command(short_help="Tasks per queue and status; workers alive.")
@pass_context
def status(obj: Context) -> None:
    """Tasks per queue and status, and the workers alive."""
    database.check_schema(obj.settings)
    with obj.settings.get_engine().begin() as conn:
        stats.without_jit(conn)
        rows = stats.counts(conn)
        workers = store.list_workers(conn)
        paused = control.read_paused(conn)
        old_transactions = database.long_transactions(conn, older_than_seconds=60)
    table: dict[str, dict[str, str]] = {}
    for row in rows:
        table.setdefault(row.queue, {})[row.status] = ("~" if row.estimated else "") + str(
            row.count
        )
    columns = ["queued", "running", "succeeded", "failed", "cancelled"]
    width = max([5, *(len(q) for q in table)])
    click.echo(f"{'queue':<{width}}  " + "  ".join(f"{c:>9}" for c in columns))
    for queue_name in sorted(table):
        counts = table[queue_name]
        click.echo(
            f"{queue_name:<{width}}  " + "  ".join(f"{counts.get(c, '0'):>9}" for c in columns)
        )
    if not table:
        click.echo("(no tasks)")
    if any(row.estimated for row in rows):
        click.echo(
            f"~ estimated from a sample: more than {stats.EXACT_FINISHED_UP_TO:,} finished "
            f"tasks, or {stats.EXACT_QUEUED_UP_TO:,} queued in a queue (docs/queues.md)"
        )
    if paused:
        click.echo(f"\npaused: {', '.join(sorted(paused))}  (dbqueue resume QUEUE)")
    click.echo(f"\nworkers: {len(workers)}")
    for w in workers:
        age = (w.now - w.heartbeat_at).total_seconds()
        click.echo(f"  {w.name}  pid={w.pid}  queues={w.queues or '*'}  heartbeat {age:.1f}s ago")
    for tx in old_transactions:
        click.echo(
            f"\nwarning: transaction open for {tx.age_s:.0f}s (pid {tx.pid}, "
            f"{tx.application_name or 'no application name'}, {tx.state}) holds back vacuum: "
            "dead task rows pile up and claims slow down until it ends",
            err=True,
        )


@cli.command(short_help="Pause queues fleet-wide (workers stop claiming from them).")
@click.argument("queue_names", nargs=-1, required=True, metavar="QUEUE...")
@pass_context
def pause(obj: Context, queue_names: tuple[str, ...]) -> None:
    """Pause QUEUEs on every worker within about a second; running tasks finish, enqueueing
    still works. The state is in the database: it survives restarts."""
    database.check_schema(obj.settings)
    control.pause(*queue_names, settings=obj.settings)
    click.echo(f"paused: {', '.join(queue_names)}")


@cli.command(short_help="Resume paused queues.")
@click.argument("queue_names", nargs=-1, required=True, metavar="QUEUE...")
@pass_context
def resume(obj: Context, queue_names: tuple[str, ...]) -> None:
    """Resume paused QUEUEs."""
    database.check_schema(obj.settings)
    control.resume(*queue_names, settings=obj.settings)
    click.echo(f"resumed: {', '.join(queue_names)}")


@cli.command(short_help="Cancel tasks: queued at once, running ones asked to stop.")
@click.argument("task_ids", nargs=-1, type=int)
@click.option("--queue", "-q", "queue_name", metavar="NAME", help="Every queued task of a queue.")
@pass_context
def cancel(obj: Context, task_ids: tuple[int, ...], queue_name: str | None) -> None:
    """Cancel tasks by id: a queued task becomes cancelled at once; a running one gets
    dbqueue.TaskCancelled raised inside it by its worker within about a second. A finished
    task is an error (exit 1), and then nothing is changed."""
    if bool(task_ids) == bool(queue_name):
        raise click.UsageError("give task ids, or --queue NAME (not both)")
    database.check_schema(obj.settings)
    with obj.settings.get_engine().begin() as conn:
        if queue_name:
            ids = store.queued_ids(conn, queue_name)
            count = len(store.cancel(conn, ids, returning=True)) if ids else 0
            click.echo(f"cancelled {count} queued task(s) of {queue_name}")
            return
        done = control.cancel_tasks(conn, task_ids)
    if done.cancelled:
        click.echo(f"cancelled: {' '.join(map(str, done.cancelled))}")
    if done.requested:
        click.echo(
            f"asked to stop (running): {' '.join(map(str, done.requested))}; "
            "their workers cancel them within about a second"
        )


@cli.command("queue-limit", short_help="Cap how many tasks of a queue run at once.")
@click.argument("queue_name", metavar="QUEUE")
@click.argument("limit", metavar="N|none")
@pass_context
def queue_limit(obj: Context, queue_name: str, limit: str) -> None:
    """At most N tasks of QUEUE run at once across every worker ("none" removes the cap)."""
    value: int | None
    if limit.lower() == "none":
        value = None
    else:
        try:
            value = int(limit)
        except ValueError:
            raise click.UsageError(f"N is a positive integer or 'none', not {limit!r}") from None
    database.check_schema(obj.settings)
    control.configure_queue(queue_name, max_concurrency=value, settings=obj.settings)
    click.echo(f"{queue_name}: max_concurrency={value if value is not None else 'none'}")


@cli.command("retry", short_help="Queue failed or cancelled tasks again.")
@click.argument("task_ids", nargs=-1, type=int)
@click.option("--failed", "all_failed", is_flag=True, help="Every failed task.")
@queue_option
@pass_context
def retry_command(
    obj: Context, task_ids: tuple[int, ...], all_failed: bool, queues: tuple[str, ...]
) -> None:
    """Queue failed or cancelled tasks again, with a fresh set of attempts."""
    if not task_ids and not all_failed:
        raise click.UsageError("give task ids, or --failed")
    database.check_schema(obj.settings)
    with obj.settings.get_engine().begin() as conn:
        count = store.requeue(
            conn,
            list(task_ids) if task_ids else None,
            all_failed=all_failed,
            queues=list(queues) or None,
        )
    click.echo(f"queued {count} task(s) again")
    if task_ids and count < len(task_ids):
        with obj.settings.get_engine().begin() as conn:
            for task_id in task_ids:
                row = store.get(conn, task_id)
                if row is None:
                    click.echo(
                        f"  task {task_id}: no such task (it may have been pruned)", err=True
                    )
                elif row.status not in ("failed", "cancelled", "queued"):
                    click.echo(
                        f"  task {task_id}: is {row.status}, only failed or cancelled "
                        "tasks are retried",
                        err=True,
                    )


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def parse_duration(text: str) -> float:
    """'30s', '15m', '12h', '7d', '2w' (or plain seconds) -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 30s, 15m, 12h, 7d")
    factor = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(match.group(1)) * factor


@cli.command(short_help="Delete old finished tasks.")
@click.option(
    "--older-than",
    required=True,
    metavar="DURATION",
    help="Delete finished tasks older than this (30m, 12h, 7d).",
)
@click.option(
    "--batch-size",
    default=5000,
    show_default=True,
    type=click.IntRange(1),
    metavar="N",
    help="Rows deleted per transaction.",
)
@pass_context
def prune(obj: Context, older_than: str, batch_size: int) -> None:
    """Delete finished tasks in batches, each its own short transaction."""
    seconds = parse_duration(older_than)
    database.check_schema(obj.settings)
    total = 0
    while True:
        with obj.settings.get_engine().begin() as conn:
            deleted = store.prune(conn, seconds, batch_size)
        total += deleted
        if deleted:
            click.echo(f"prune: {total} deleted so far", err=True)
        if deleted < batch_size:
            break
    click.echo(f"pruned {total} finished task(s) older than {older_than}")


@cli.group("bus", short_help="Publish/subscribe between applications.")
def bus_group() -> None:
    """Publish/subscribe between applications (docs/guides/event-bus.md)."""


@bus_group.command("sync")
@import_option
@pass_context
def bus_sync(obj: Context, imports: tuple[str, ...]) -> None:
    """Store the imported code's subscriptions for this app (DBQUEUE_APP_KEY), replacing its old."""
    _preflight(obj, imports, bus_sync=True)
    key = bus.app_key()
    with obj.settings.get_engine().begin() as conn:
        rows = [r for r in bus.list_subscriptions(conn) if r.app_key == key]
    click.echo(f"{key}: {len(rows)} subscription(s)")
    _echo_subscriptions(rows)


@bus_group.command("list")
@pass_context
def bus_list(obj: Context) -> None:
    """Every application's subscriptions, as last synced."""
    database.check_schema(obj.settings)
    with obj.settings.get_engine().begin() as conn:
        rows = bus.list_subscriptions(conn)
    if not rows:
        click.echo("(no subscriptions: run `dbqueue bus sync --import APP_MODULE`)")
    apps: dict[str, list[Any]] = {}
    for row in rows:
        apps.setdefault(row.app_key, []).append(row)
    for key, app_rows in apps.items():
        synced = max(r.updated_at for r in app_rows).strftime("%Y-%m-%d %H:%M:%S UTC")
        click.echo(f"{key}: {len(app_rows)} subscription(s), synced {synced}")
        _echo_subscriptions(app_rows)


def _echo_subscriptions(rows: Sequence[Any]) -> None:
    events = [f"/{r.matcher}/" if r.is_regex else r.matcher for r in rows]
    width = max([5, *(len(e) for e in events)])
    queue_width = max([5, *(len(r.queue) for r in rows)])
    for event, row in zip(events, rows, strict=True):
        click.echo(f"  {event:<{width}}  {row.queue:<{queue_width}}  {row.handler}")


WEB_TOKEN_MIN_LENGTH = 16


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@cli.command(short_help="Serve the dashboard and /metrics.")
@click.option(
    "--host", default="127.0.0.1", show_default=True, metavar="HOST", help="Address to bind."
)
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(0, 65535),
    metavar="PORT",
    help="Port to listen on.",
)
@pass_context
def web(obj: Context, host: str, port: int) -> None:
    """Serve the dashboard and /metrics (uvicorn).

    Binding to anything but loopback requires DBQUEUE_WEB_TOKEN: every request then needs it,
    as `Authorization: Bearer <token>` or through the login form.
    """
    import os

    token = os.environ.get("DBQUEUE_WEB_TOKEN") or None
    if not _is_loopback(host) and token is None:
        raise errors.ConfigurationError(
            f"refusing to serve the dashboard on {host}: it is reachable from other machines "
            "and its buttons change tasks. Set DBQUEUE_WEB_TOKEN to a long random secret "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))'), or bind to "
            "127.0.0.1"
        )
    if token is not None and len(token) < WEB_TOKEN_MIN_LENGTH:
        raise errors.ConfigurationError(
            f"DBQUEUE_WEB_TOKEN is {len(token)} characters; use at least {WEB_TOKEN_MIN_LENGTH}"
        )
    try:
        import uvicorn

        from dbqueue import web as web_package
    except ModuleNotFoundError as exc:
        raise errors.ConfigurationError(
            f"the dashboard needs {exc.name}: pip install 'dbqueue[web]'"
        ) from exc
    database.check_schema(obj.settings)
    obj.settings.keyring()
    app = web_package.create_app(obj.settings, token=token)
    shown = f"[{host}]" if ":" in host else host
    click.echo(
        f"dbqueue dashboard on http://{shown}:{port}/ "
        f"({'access token required' if token else 'no access token: loopback only'})",
        err=True,
    )
    uvicorn.run(app, host=host, port=port, log_level=obj.log_level.lower(), access_log=False)


@cli.group(short_help="Periodic tasks: schedule and next run.")
def periodic() -> None:
    """Periodic tasks (@periodic): their schedule and next run."""


@periodic.command("list", short_help="Schedule, last slot and next run of each.")
@import_option
@pass_context
def periodic_list(obj: Context, imports: tuple[str, ...]) -> None:
    """Show each periodic task of the imported modules: schedule, last slot, next run (UTC)."""
    from dbqueue.periodic import registry, upcoming

    _preflight(obj, imports)
    if not registry:
        click.echo("no periodic tasks registered (pass the module that defines them: --import)")
        return
    with obj.settings.get_engine().begin() as conn:
        rows = upcoming(conn)
    width = max(len(entry.name) for entry, _, _ in rows)
    click.echo(f"{'task':<{width}}  {'schedule':<34}  {'last enqueued':<25}  next run")
    for entry, last, next_run in rows:
        last_text = last.isoformat(timespec="seconds") if last else "never"
        click.echo(
            f"{entry.name:<{width}}  {entry.schedule:<34}  {last_text:<25}  "
            f"{next_run.isoformat(timespec='seconds')}"
        )


@cli.group("counters")
def counters_group() -> None:
    """Counter caches (async_counter_cache): recount them from the rows."""


@counters_group.command("reconcile")
@import_option
@click.option(
    "--only",
    "only",
    multiple=True,
    metavar="CHILD.RELATIONSHIP",
    help="Only this counter, e.g. Comment.post (repeatable). Default: every registered one.",
)
@pass_context
def counters_reconcile(obj: Context, imports: tuple[str, ...], only: tuple[str, ...]) -> None:
    """Set every counter cache to count(*) of its rows and drop their pending deltas.

    The counters are the ones the --import modules declare with async_counter_cache().
    """
    _preflight(obj, imports)
    chosen = [c for c in counters.registered() if not only or c.name in only]
    if not chosen:
        raise errors.ConfigurationError(
            "no counter caches to reconcile: --import the module that calls "
            "async_counter_cache()" + (f" (and check --only {', '.join(only)})" if only else "")
        )
    engine = obj.settings.get_engine()
    for counter in chosen:
        fixed = counters.reconcile_counter(counter, engine=engine)
        click.echo(
            f"{counter.parent_table.fullname}.{counter.column} ({counter.name}): {fixed} corrected"
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: errors as one line, never a traceback."""
    try:
        cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except errors.DbqueueError as exc:
        _fail(exc)
    except sa.exc.DBAPIError as exc:
        _fail(database.describe_error(config.current(), exc))


def _fail(exc: errors.DbqueueError) -> None:
    """One line on stderr; exit 2 for settings to fix, 1 for anything else (an outage)."""
    click.echo(f"dbqueue: error: {exc}", err=True)
    sys.exit(EXIT_CONFIG if isinstance(exc, (errors.ConfigurationError, errors.SchemaError)) else 1)


if __name__ == "__main__":
    main()
