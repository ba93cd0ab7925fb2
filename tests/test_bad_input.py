"""Bad input (reliability.md "Bad inputs" table and R26): each case gets a clear message that
names the thing at fault, nothing is lost, and the worker goes on serving other tasks.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
import re
import socket
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import orm

import dbqueue
from dbqueue import bus, config, database, errors, schema, serializer, worker
from dbqueue.periodic import enqueue_due, periodic, registry
from tests import jobs
from tests.conftest import PG_ADMIN_URL, ROOT, SECRET


def _due_now() -> dt.datetime:
    """A run_at that is due by a margin: the client's "now" to the microsecond can still be
    ahead of SQLite's millisecond clock when the next claim runs (seen once in CI)."""
    return dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)


def work_off(db) -> worker.Summary:
    return worker.Worker(db.settings).work_off()


def task_count(db) -> int:
    return db.scalar("SELECT count(*) FROM tasks")


# -- unpicklable arguments: refused at enqueue, naming the argument ---------------------------


def _unpicklables(engine: sa.Engine):
    session = orm.Session(engine)
    connection = engine.connect()
    sock = socket.socket()
    handle = open(os.devnull)
    values = [
        ("lambda", lambda: 1, "function"),
        ("generator", (n for n in range(3)), "generator: cannot pickle 'generator' object"),
        ("open file", handle, "TextIOWrapper: cannot pickle '_io.TextIOWrapper' object"),
        ("lock", threading.Lock(), "lock: cannot pickle '_thread.lock' object"),
        ("socket", sock, "socket: cannot pickle 'socket' object"),
        ("Session", session, "Session: "),
        ("Connection", connection, "Connection: "),
    ]

    def close() -> None:
        session.close()
        connection.close()
        sock.close()
        handle.close()

    return values, close


def test_unpicklable_positional_argument_is_named_and_nothing_is_inserted(db):
    values, close = _unpicklables(db.engine)
    try:
        for _label, value, reason in values:
            with pytest.raises(dbqueue.EnqueueError) as info:
                dbqueue.enqueue(jobs.add, args=(1, value))
            message = str(info.value)
            assert message.startswith(
                "argument 'b' (position 1) of tests.jobs:add cannot be pickled: "
            ), message
            assert reason in message
            with pytest.raises(
                dbqueue.EnqueueError, match=r"argument 'callback' of tests.jobs:echo"
            ):
                dbqueue.enqueue(jobs.echo, kwargs={"ok": 1, "callback": value})
            with pytest.raises(dbqueue.EnqueueError, match=r"argument 'address' \(position 0\)"):
                jobs.send_mail(value)
    finally:
        close()
    assert task_count(db) == 0


def test_unpicklable_argument_of_varargs_function_gives_its_position(db):
    with pytest.raises(
        dbqueue.EnqueueError,
        match=r"^argument \(position 2\) of tests.jobs:echo cannot be pickled: lock: ",
    ):
        dbqueue.enqueue(jobs.echo, args=(1, 2, threading.Lock()))
    # nested inside a container: the argument holding it is named
    with pytest.raises(dbqueue.EnqueueError, match=r"argument 'b' \(position 1\).*: dict: "):
        dbqueue.enqueue(jobs.add, args=(1, {"inner": [threading.Lock()]}))
    assert task_count(db) == 0


def test_object_whose_method_is_delayed_must_pickle(db):
    greeter = jobs.Greeter("Ann")
    greeter.lock = threading.Lock()
    with pytest.raises(
        dbqueue.EnqueueError, match=r"the object bound to tests.jobs:Greeter.greet cannot be"
    ):
        dbqueue.delay(greeter).greet("hi")
    assert task_count(db) == 0


def test_callers_connection_transaction_stays_usable(db):
    with db.engine.connect() as conn:
        with conn.begin():
            dbqueue.enqueue(jobs.add, args=(1, 1), connection=conn)
            with pytest.raises(dbqueue.EnqueueError):
                dbqueue.enqueue(jobs.add, args=(1, threading.Lock()), connection=conn)
            dbqueue.enqueue(jobs.add, args=(2, 2), connection=conn)
    assert task_count(db) == 2
    assert work_off(db).succeeded == 2


def test_callers_session_transaction_stays_usable(db):
    with orm.Session(db.engine) as session:
        dbqueue.enqueue(jobs.add, args=(1, 1), session=session)
        with pytest.raises(dbqueue.EnqueueError):
            dbqueue.enqueue(jobs.add, args=(1, lambda: 0), session=session)
        dbqueue.enqueue(jobs.add, args=(3, 3), session=session)
        session.commit()
    assert task_count(db) == 2


# -- callables workers cannot import: refused at enqueue -------------------------------------


def test_lambda_and_local_function_are_refused(db):
    def local_job() -> int:
        return 1

    class Local:
        def method(self) -> None:
            pass

    cases = [
        (lambda: 1, "is a lambda"),
        (local_job, "test_lambda_and_local_function_are_refused.<locals>.local_job is a local"),
        (Local().method, "<locals>.Local is a local function"),
    ]
    for func, reason in cases:
        with pytest.raises(dbqueue.EnqueueError) as info:
            dbqueue.enqueue(func)
        assert str(info.value).startswith("tasks must be importable module-level functions; ")
        assert reason in str(info.value)
    with pytest.raises(dbqueue.EnqueueError, match="is a lambda"):
        dbqueue.handle_asynchronously(lambda: 1)
    with pytest.raises(dbqueue.EnqueueError, match="is a local function"):
        dbqueue.handle_asynchronously(queue="q")(local_job)
    assert task_count(db) == 0


def test_function_defined_in_main_is_refused(db):
    script = db.tmp_path / "app_script.py"
    script.write_text(
        textwrap.dedent(
            """
            import dbqueue

            def job():
                return 1

            for attempt in (lambda: dbqueue.enqueue(job),
                            lambda: dbqueue.handle_asynchronously(job)):
                try:
                    attempt()
                except dbqueue.EnqueueError as exc:
                    print("refused:", exc)
                else:
                    print("accepted")
            """
        )
    )
    proc = run([sys.executable, str(script)], db.env, db.tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    for line in lines:
        assert line == (
            "refused: tasks must be importable module-level functions; job is defined in "
            "__main__, which workers cannot import: move it into a module"
        )
    assert task_count(db) == 0


# -- arguments that pickle but do not unpickle: the worker fails the task, and goes on -------


def test_arguments_that_do_not_unpickle_fail_the_task(db):
    bad = dbqueue.enqueue(jobs.echo, args=(jobs.Unpicklable("odd", "other"),))
    good = dbqueue.enqueue(jobs.add, args=(1, 2))
    summary = work_off(db)
    assert (summary.failed, summary.succeeded, summary.retried) == (1, 1, 0)
    bad.refresh()
    assert bad.status is dbqueue.Status.FAILED and bad.attempts == 1  # not retried
    assert "arguments of tests.jobs:echo could not be unpickled: TypeError: " in bad.error
    assert "missing 1 required positional argument: 'other'" in bad.error
    assert good.refresh().result == 3


def test_argument_class_renamed_after_enqueue_is_retried_then_failed(db):
    """A class missing on the worker may be a rolling deploy: retried, then failed."""
    task = dbqueue.enqueue(jobs.echo, args=(jobs.Greeter("Ann"),), max_attempts=2)
    body = pickle.dumps((("func",), (jobs.Greeter("Ann"),), {}), protocol=5)
    assert body.count(b"Greeter") == 1
    renamed = body.replace(b"Greeter", b"Greetex")  # same length: the pickle stays well formed
    payload = serializer.sign(db.settings.keyring(), "payload", "tests.jobs:echo", renamed)
    with db.engine.begin() as conn:
        conn.execute(sa.update(schema.tasks).values(payload=payload))
    assert work_off(db).retried == 1
    task.refresh()
    assert task.status is dbqueue.Status.QUEUED
    assert "arguments of tests.jobs:echo could not be unpickled: AttributeError:" in task.error
    assert "Greetex" in task.error
    with db.engine.begin() as conn:
        conn.execute(sa.update(schema.tasks).values(run_at=_due_now()))
    assert work_off(db).failed == 1
    assert task.refresh().status is dbqueue.Status.FAILED and task.attempts == 2


# -- sizes -----------------------------------------------------------------------------------


def test_payload_over_the_limit_is_refused(db):
    with pytest.raises(dbqueue.EnqueueError) as info:
        dbqueue.enqueue(jobs.echo, args=(b"x" * (2 * 1024 * 1024),))
    assert str(info.value) == (
        "payload of tests.jobs:echo is 2.0 MiB, limit is 1.0 MiB; store large data elsewhere "
        "and pass a reference"
    )
    db.settings.max_payload_bytes = 10_000
    with pytest.raises(dbqueue.EnqueueError, match=r"is 19\.\d KiB, limit is 9\.8 KiB"):
        dbqueue.enqueue(jobs.echo, args=(b"x" * 20_000,))
    assert task_count(db) == 0
    dbqueue.enqueue(jobs.echo, args=(b"x" * 5_000,))
    assert task_count(db) == 1


def test_payload_limit_from_environment(monkeypatch):
    monkeypatch.setenv("DBQUEUE_MAX_PAYLOAD_BYTES", "4096")
    assert config.Settings(database_url="sqlite://").max_payload_bytes == 4096
    for bad in ("lots", "0", "-5"):
        monkeypatch.setenv("DBQUEUE_MAX_PAYLOAD_BYTES", bad)
        with pytest.raises(errors.ConfigurationError, match="DBQUEUE_MAX_PAYLOAD_BYTES="):
            config.Settings(database_url="sqlite://")


# -- results and exceptions that cannot be stored: the task keeps its true status ------------


def test_result_that_does_not_pickle(db):
    task = dbqueue.enqueue(jobs.return_lock)
    assert work_off(db).succeeded == 1
    task.refresh()
    assert task.status is dbqueue.Status.SUCCEEDED
    with pytest.raises(
        dbqueue.ResultNotStored,
        match=r"result could not be stored: TypeError: cannot pickle '_thread.lock' object",
    ):
        _ = task.result


def test_result_over_the_limit(db):
    db.settings.max_payload_bytes = 2_000
    task = dbqueue.enqueue(jobs.make_bytes, args=(50_000,))
    assert work_off(db).succeeded == 1
    with pytest.raises(dbqueue.ResultNotStored, match=r"bytes is over the limit of 2000"):
        _ = task.refresh().result


def test_result_that_does_not_unpickle_raises_on_read(db):
    task = dbqueue.enqueue(jobs.return_unpicklable)
    assert work_off(db).succeeded == 1
    with pytest.raises(
        dbqueue.ResultNotStored,
        match=rf"task {task.id}: the stored result could not be unpickled: TypeError: ",
    ):
        _ = task.refresh().result


def test_exception_that_does_not_pickle_is_kept_as_text(db):
    task = dbqueue.enqueue(jobs.raise_with_lock, max_attempts=2)
    after = dbqueue.enqueue(jobs.add, args=(2, 2))
    summary = work_off(db)
    assert (summary.retried, summary.succeeded) == (1, 1)
    task.refresh()
    assert task.status is dbqueue.Status.QUEUED  # still retried per its policy
    assert task.exception is None
    assert "ValueError: ('holding a lock'" in task.error
    assert "(the exception could not be stored: TypeError: cannot pickle '_thread.lock'" in (
        task.error
    )
    assert after.refresh().result == 4


# -- enqueue options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"run_at": dt.datetime(2030, 1, 1)}, "run_at=2030-01-01T00:00:00 is a naive datetime"),
        ({"run_at": lambda: dt.datetime(2030, 1, 1)}, "is a naive datetime"),
        (
            {"run_at": dt.datetime(9999, 1, 1, tzinfo=dt.timezone.utc)},
            "run_at=9999-01-01T00:00:00+00:00 is too far in the future",
        ),
        ({"run_at": "tomorrow"}, "run_at must be a datetime, a timedelta or a callable"),
        ({"run_at": 3600}, "run_at must be a datetime, a timedelta or a callable"),
        ({"priority": True}, "priority must be an int, not True"),
        ({"priority": 1.5}, "priority must be an int, not 1.5"),
        ({"priority": 2**31}, "priority 2147483648 is out of range (32-bit integer)"),
        ({"priority": -(2**31) - 1}, "is out of range (32-bit integer)"),
        ({"queue": ""}, "queue must be a non-empty string of at most 100 characters, not ''"),
        ({"queue": "q" * 101}, "queue must be a non-empty string of at most 100 characters"),
        ({"queue": None}, "queue must be a non-empty string"),
        ({"max_attempts": 0}, "max_attempts must be a positive int, not 0"),
        ({"timeout": float("nan")}, "timeout must be a positive number of seconds, not nan"),
        ({"timeout": -1}, "timeout must be a positive number of seconds, not -1"),
        ({"unique_key": 5}, "unique_key must be a string, not 5"),
        ({"on_conflict": "merge"}, "on_conflict must be 'keep' or 'replace', not 'merge'"),
    ],
)
def test_bad_enqueue_options_name_the_parameter(db, options, message):
    with pytest.raises(dbqueue.EnqueueError) as info:
        dbqueue.enqueue(jobs.noop, **options)
    assert message in str(info.value)
    assert task_count(db) == 0


def test_bad_decorator_options_are_refused_at_decoration():
    with pytest.raises(dbqueue.EnqueueError, match="priority must be an int, not 'high'"):
        dbqueue.handle_asynchronously(priority="high")


# -- malformed rows: failed with a clear message, the worker goes on -------------------------


def test_malformed_rows_fail_and_the_worker_goes_on(db):
    cases = {
        b"": "malformed task row: payload is empty",
        b"\x01\x02\x03": "signature did not verify (purpose=payload): truncated",
        "truncated": "signature did not verify (purpose=payload, key id=",
        "version": "signature did not verify (purpose=payload): unknown envelope version",
    }
    rows = []
    for payload, message in cases.items():
        task = dbqueue.enqueue(jobs.add, args=(1, 2))
        real = bytes(db.scalar("SELECT payload FROM tasks WHERE id = :id", id=task.id))
        if payload == "truncated":
            payload = real[: len(real) - 5]
        elif payload == "version":
            payload = b"\x02" + real[1:]
        with db.engine.begin() as conn:
            conn.execute(
                sa.update(schema.tasks).where(schema.tasks.c.id == task.id).values(payload=payload)
            )
        rows.append((task, message, dbqueue.enqueue(jobs.add, args=(len(rows), 10))))
    summary = work_off(db)
    assert (summary.failed, summary.succeeded, summary.retried) == (len(cases), len(cases), 0)
    for task, message, good in rows:
        task.refresh()
        assert task.status is dbqueue.Status.FAILED and task.attempts == 1
        assert message in task.error
        assert good.refresh().success


def test_constraints_refuse_null_payload_and_unknown_status(db):
    task = dbqueue.enqueue(jobs.noop)
    # MySQL's drivers raise a failed CHECK (4025) as OperationalError, which is no outage
    refused = (sa.exc.IntegrityError, sa.exc.OperationalError)
    for values in ({"payload": None}, {"status": "exploded"}, {"run_at": None}, {"queue": ""}):
        with pytest.raises(refused) as raised, db.engine.begin() as conn:
            conn.execute(
                sa.update(schema.tasks).where(schema.tasks.c.id == task.id).values(**values)
            )
        assert not database.is_disconnect(raised.value)
    assert task.refresh().status is dbqueue.Status.QUEUED
    assert work_off(db).succeeded == 1


# -- database URLs at the CLI: one line, password hidden, exit 2 (1 when unreachable) --------


def run(command: list[str], env: dict[str, str], cwd: Path | None = None):
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def run_cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DBQUEUE_DATABASE_URL=url, DBQUEUE_SECRET_KEY=SECRET)
    env["PYTHONPATH"] = str(ROOT)
    return run([sys.executable, "-m", "dbqueue", *args], env)


def assert_one_line(proc: subprocess.CompletedProcess[str], code: int, *parts: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("dbqueue: error: "), line
    for part in parts:
        assert part in line, line
    assert "s3cret" not in proc.stderr + proc.stdout
    return line


PG = sa.make_url(PG_ADMIN_URL)
PG_HOST = f"{PG.host}:{PG.port or 5432}"


@pytest.mark.parametrize(
    ("command", "url", "code", "parts"),
    [
        ("status", "not a url", 2, ["invalid database URL", "Expected e.g. sqlite:///"]),
        ("work", "postgres ql://me:s3cret@host/db", 2, ["invalid database URL", "me:***@host"]),
        ("status", "postgresql+nosuchdriver://me:s3cret@host/db", 2, ["cannot use database URL"]),
        (
            "work",
            "oracle://me:s3cret@host/db",
            2,
            ["works with SQLite, PostgreSQL and MySQL/MariaDB, not oracle"],
        ),
        ("workoff", "mysql://me:s3cret@127.0.0.1:1/db", 1, ["database unavailable at"]),
        (  # the URL as written (no charset added), what to do when the extra is installed
            "status",
            "mysql+mysqlconnector://me:s3cret@127.0.0.1/db",
            2,
            [
                "driver for mysql+mysqlconnector://me:***@127.0.0.1/db is not installed (",
                "install it",
            ],
        ),
        ("work", "mysql://nosuchuser:s3cret@127.0.0.1:3306/db", 2, ["Access denied for user"]),
        ("workoff", "postgresql://me:s3cret@127.0.0.1:1/db", 1, ["database unavailable at"]),
        (
            "work",
            f"postgresql://nosuchrole:s3cret@{PG_HOST}/postgres",
            2,
            ["cannot connect to", 'role "nosuchrole" does not exist'],
        ),
        (
            "status",
            f"postgresql://{PG.username}:s3cret@{PG_HOST}/dbqueue_no_such_db",
            2,
            ["cannot connect to", 'database "dbqueue_no_such_db" does not exist'],
        ),
        (
            "work",
            "sqlite:////nonexistent-dbqueue-dir/sub/q.sqlite3",
            2,
            ["SQLite database directory /nonexistent-dbqueue-dir/sub does not exist"],
        ),
    ],
)
def test_wrong_database_url(command, url, code, parts):
    assert_one_line(run_cli(command, url=url), code, *parts)


def test_sqlite_in_a_read_only_directory(tmp_path):
    """The directory is made read-only for real: chmod, or a read-only bind mount as root."""
    directory = tmp_path / "ro"
    directory.mkdir()
    url = f"sqlite:///{directory / 'q.sqlite3'}"
    command = [sys.executable, "-m", "dbqueue", "migrate"]
    if os.geteuid() == 0:  # root writes through mode bits: mount the directory read-only
        inner = " ".join(f"'{c}'" for c in command)
        command = [
            "unshare",
            "--mount",
            "sh",
            "-c",
            f"mount --bind {directory} {directory} && "
            f"mount -o remount,bind,ro {directory} && exec {inner}",
        ]
    else:
        directory.chmod(0o555)
    env = dict(os.environ, DBQUEUE_DATABASE_URL=url, DBQUEUE_SECRET_KEY=SECRET)
    env["PYTHONPATH"] = str(ROOT)
    try:
        proc = run(command, env)
    finally:
        directory.chmod(0o755)
    assert_one_line(
        proc, 2, f"directory {directory} is not writable (SQLite needs to create q.sqlite3-wal"
    )
    assert not (directory / "q.sqlite3").exists()


# -- schema skew (R26): never migrated, older, newer -----------------------------------------


def unmigrate(db) -> None:
    """Drop every dbqueue table and alembic's version table: a database never migrated."""
    database.downgrade(db.settings, "base")
    with db.engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {database.VERSION_TABLE}"))
    db.engine.dispose()


@pytest.mark.parametrize("command", ["work", "workoff", "status"])
def test_never_migrated_database(db, command):
    unmigrate(db)
    head = database.head_revision()
    line = assert_one_line(
        db.cli(command), 2, f"has no dbqueue tables (expected revision {head})", "dbqueue migrate"
    )
    assert config.redact(db.url) in line


def test_enqueue_into_a_never_migrated_database(db):
    unmigrate(db)
    with pytest.raises(dbqueue.SchemaError, match=r"has no dbqueue tables .*dbqueue migrate"):
        dbqueue.enqueue(jobs.noop)


def test_a_missing_table_of_the_application_is_not_called_dbqueues(db):
    """A missing table that is not dbqueue's (a counter cache's model not created yet) is
    named as the application's: `dbqueue migrate` would not create it."""
    with pytest.raises(sa.exc.DBAPIError) as caught, db.engine.connect() as conn:
        conn.execute(sa.text("SELECT id FROM shop_orders"))
    message = str(database.describe_error(db.settings, caught.value))
    assert "has no table 'shop_orders'" in message, message
    assert "not one of dbqueue's tables" in message and "dbqueue migrate" not in message


NEWER_CODE = """
import shutil, sys
from pathlib import Path
from dbqueue import cli, database

here = Path(sys.argv[1])
if not here.exists():
    shutil.copytree(database.migrations_dir(), here,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (here / "versions" / "9000_newer_code.py").write_text(
        f"revision = '9000'\\ndown_revision = '{database.head_revision()}'\\n"
        "def upgrade():\\n    pass\\n\\ndef downgrade():\\n    pass\\n"
    )
database.migrations_dir = lambda: here
cli.main(sys.argv[2:])
"""


def newer_dbqueue(db, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `dbqueue ARGS` as a release whose code has one more migration (revision 9000)."""
    script = db.tmp_path / "newer_dbqueue.py"
    script.write_text(NEWER_CODE)
    return run(
        [sys.executable, str(script), str(db.tmp_path / "newer_migrations"), *args],
        db.env,
        db.tmp_path,
    )


def test_older_schema_then_migrate_then_newer_schema(db):
    """(b) code newer than the schema: run migrate; after it, (c) the old code must upgrade."""
    head = database.head_revision()
    for command in ("work", "status"):
        assert_one_line(
            newer_dbqueue(db, command),
            2,
            f"database schema is at revision {head}, this dbqueue needs 9000",
            "run `dbqueue migrate`",
        )
    migrated = newer_dbqueue(db, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "is at dbqueue schema revision 9000" in migrated.stdout
    assert newer_dbqueue(db, "status").returncode == 0

    # this (older) dbqueue now meets a schema newer than it knows
    for command in ("workoff", "status"):
        assert_one_line(
            db.cli(command),
            2,
            f"database schema is newer than this dbqueue (revision 9000 is unknown, this "
            f"version knows up to {head}): upgrade dbqueue",
        )


def test_schema_check_happens_before_any_key_is_created(db, monkeypatch, tmp_path):
    """A worker pointed at the wrong database fails on the schema, not on key setup."""
    unmigrate(db)
    monkeypatch.delenv("DBQUEUE_SECRET_KEY")
    env = db.env
    env.pop("DBQUEUE_SECRET_KEY")
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    proc = run([sys.executable, "-m", "dbqueue", "work"], env, db.tmp_path)
    assert_one_line(proc, 2, "dbqueue migrate")
    assert not (tmp_path / "config").exists()


def test_group_readable_key_file_stops_the_worker_at_start(db, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("k" * 48)
    key_file.chmod(0o644)
    env = db.env
    env.pop("DBQUEUE_SECRET_KEY")
    env["DBQUEUE_KEY_FILE"] = str(key_file)
    proc = run([sys.executable, "-m", "dbqueue", "work"], env, db.tmp_path)
    assert_one_line(proc, 2, f"key file {key_file} is readable by group or others", "chmod 600")


def test_short_secret_key_stops_the_worker_at_start(db):
    env = db.env
    env["DBQUEUE_SECRET_KEY"] = "short"
    proc = run([sys.executable, "-m", "dbqueue", "workoff"], env, db.tmp_path)
    assert_one_line(proc, 2, "the secret key from DBQUEUE_SECRET_KEY is 5 bytes; use at least 32")


@pytest.mark.parametrize(
    ("handler", "cause"),
    [
        ("tests.module_removed_after_enqueue:send", "ModuleNotFoundError"),
        ("tests.jobs:renamed_away", "AttributeError"),
    ],
)
def test_callable_that_no_longer_imports_is_retried_then_failed(db, handler, cause):
    """A module removed or a function renamed after enqueue: named in the error, retried (a
    rolling deploy may not have reached this worker yet), then failed; the worker goes on."""
    task = dbqueue.enqueue(jobs.noop, max_attempts=2)
    payload = serializer.dumps(db.settings.keyring(), "payload", handler, (("func",), (), {}))
    with db.engine.begin() as conn:
        conn.execute(sa.update(schema.tasks).values(handler=handler, payload=payload))
    after = dbqueue.enqueue(jobs.add, args=(5, 5))
    summary = work_off(db)
    assert (summary.retried, summary.succeeded) == (1, 1)
    task.refresh()
    assert task.status is dbqueue.Status.QUEUED
    assert f"cannot import handler '{handler}' ({cause}: " in task.error
    # a missing module of the task's own says where the worker looked, and what to do
    assert ("start the worker where the application's code is" in task.error) == (
        cause == "ModuleNotFoundError"
    ), task.error
    assert after.refresh().result == 10
    with db.engine.begin() as conn:
        conn.execute(sa.update(schema.tasks).values(run_at=_due_now()))
    assert work_off(db).failed == 1
    assert task.refresh().status is dbqueue.Status.FAILED and task.attempts == 2


def test_enqueue_into_an_older_table_says_to_migrate(db):
    """A tasks table missing a column the code writes (an older schema): SchemaError."""
    with db.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE tasks DROP COLUMN timeout"))
    db.engine.dispose()
    with pytest.raises(dbqueue.SchemaError, match=r"run `dbqueue migrate`") as info:
        dbqueue.enqueue(jobs.noop)
    assert "timeout" in str(info.value)


def _named(qualname: str) -> Any:
    """jobs.noop under another qualname: its handler is `tests.jobs:<qualname>`."""
    func = types.FunctionType(jobs.noop.__code__, jobs.noop.__globals__, "noop")
    func.__qualname__ = qualname
    return func


def test_bus_text_over_300_characters_is_refused_at_subscribe_and_300_fit(db, monkeypatch):
    """`bus_subscriptions.matcher`/`.handler` are VARCHAR(300) on MySQL/MariaDB (in a unique
    key): a longer event or handler path is refused when subscribing, on every engine, naming
    the limit; 300 characters are stored whole, and a refusal loses nothing stored."""
    monkeypatch.setattr(bus, "_state", bus._State(app_key="app_t"))
    event = "é" * 300  # characters, not bytes: 600 bytes of UTF-8
    handler = _named("q" * (300 - len("tests.jobs:")))
    bus.subscribe(event)(handler)
    bus.subscribe(re.compile("^" + "x" * 299))(handler)
    bus.sync()
    stored = {(r.matcher, r.handler) for r in db.rows("SELECT * FROM bus_subscriptions")}
    assert stored == {
        (event, "tests.jobs:" + "q" * 289),
        ("^" + "x" * 299, "tests.jobs:" + "q" * 289),
    }
    with pytest.raises(errors.ConfigurationError) as refused:
        bus.subscribe("e" * 301)
    assert "event 'eeee" in str(refused.value)
    assert "is 301 characters, limit is 300 (bus_subscriptions.matcher)" in str(refused.value)
    with pytest.raises(errors.ConfigurationError) as refused:
        bus.subscribe(re.compile("x" * 297, re.IGNORECASE))  # stored as (?i)xxx...: 301
    assert "is 301 characters, limit is 300" in str(refused.value)
    with pytest.raises(errors.ConfigurationError) as refused:
        bus.subscribe("ok")(_named("q" * 290))
    assert "handler 'tests.jobs:qqq" in str(refused.value)
    assert "is 301 characters, limit is 300 (bus_subscriptions.handler)" in str(refused.value)
    bus.sync()
    assert {(r.matcher, r.handler) for r in db.rows("SELECT * FROM bus_subscriptions")} == stored


def test_periodic_name_over_300_characters_is_refused_at_decoration_and_300_fit(db):
    """`periodic_slots.name` (the function's handler) is VARCHAR(300) on MySQL/MariaDB and
    PostgreSQL: a longer one is refused at decoration, not by the scheduler at run time."""
    before = dict(registry)
    registry.clear()
    try:
        fits = _named("p" * (300 - len("tests.jobs:")))
        periodic(every=dt.timedelta(hours=1))(fits)
        with db.engine.begin() as conn:
            enqueue_due(conn)
        assert db.scalar("SELECT name FROM periodic_slots") == "tests.jobs:" + "p" * 289
        with pytest.raises(errors.ConfigurationError) as refused:
            periodic(every=dt.timedelta(hours=1))(_named("p" * 290))
        assert "@periodic: the name 'tests.jobs:ppp" in str(refused.value)
        assert "is 301 characters, limit is 300" in str(refused.value)
        assert list(registry) == ["tests.jobs:" + "p" * 289]
    finally:
        registry.clear()
        registry.update(before)


def test_unique_key_over_64_kib_is_refused_before_anything_is_stored(db):
    """`tasks.unique_key` is TEXT on MySQL/MariaDB (64 KiB): a longer key is refused by
    enqueue on every engine, naming the limit (it was the server's 'Data too long' there)."""
    largest = "é" * (65535 // 2) + "k"  # 65,535 bytes of UTF-8
    task = dbqueue.enqueue(jobs.noop, unique_key=largest)
    assert db.scalar("SELECT unique_key FROM tasks WHERE id = :i", i=task.id) == largest
    assert dbqueue.enqueue(jobs.noop, unique_key=largest).id == task.id
    with pytest.raises(errors.EnqueueError) as refused:
        dbqueue.enqueue_many(jobs.noop, [1], unique_key=largest + "k")
    assert "is 65536 bytes, limit is 65535 (UTF-8)" in str(refused.value)
    assert task_count(db) == 1
