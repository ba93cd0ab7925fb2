"""MySQL/MariaDB details that are checked, not assumed (issue 19, point 4): READ COMMITTED for
dbqueue's own transactions, DATETIME(6) in UTC with microseconds, LONGBLOB payloads, utf8mb4
(4-byte characters) in arguments and queue names with binary comparison, the refusal of a
server too old for SKIP LOCKED, deadlocks retried, and claims read through the claim indexes
(EXPLAIN). Real MariaDB: the `db` fixture's `mariadb` value."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import signal
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa

import dbqueue
from dbqueue import config, database, engines, errors, limits, store
from dbqueue.schema import Status, status_is, tasks
from dbqueue.worker import Worker
from tests import jobs

pytestmark = pytest.mark.mysql_only


def test_dbqueue_transactions_are_read_committed(db):
    """InnoDB's default REPEATABLE READ takes gap locks that deadlock concurrent claimers."""
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT @@global.tx_isolation").scalar() == "REPEATABLE-READ"
        assert conn.exec_driver_sql("SELECT @@tx_isolation").scalar() == "READ-COMMITTED"
        assert conn.exec_driver_sql("SELECT @@time_zone").scalar() == "+00:00"
        charset = conn.exec_driver_sql("SELECT @@character_set_connection").scalar()
    assert charset == "utf8mb4"


def test_timestamps_are_datetime6_utc_with_microseconds(db):
    columns = db.rows(
        "SELECT table_name, column_name, column_type FROM information_schema.columns "
        "WHERE table_schema = DATABASE() AND data_type IN ('datetime', 'timestamp')"
    )
    assert columns and {r.column_type for r in columns} == {"datetime(6)"}, columns
    when = dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    task = dbqueue.enqueue(jobs.noop, run_at=when)
    stored = db.scalar("SELECT run_at FROM tasks WHERE id = :id", id=task.id)
    assert stored == dt.datetime(2031, 5, 6, 5, 8, 9, 123456)  # naive UTC in the column
    assert task.refresh().run_at == when  # the same instant, aware, microseconds kept
    # the database clock is UTC with microseconds too
    now = db.scalar("SELECT created_at FROM tasks WHERE id = :id", id=task.id)
    assert abs(now - dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)) < dt.timedelta(
        minutes=1
    )


def test_large_payload_and_result_round_trip_as_longblob(db):
    """BLOB stops at 64 KiB on MySQL: payloads and results are LONGBLOB."""
    types = {
        r.column_name: r.column_type
        for r in db.rows(
            "SELECT column_name, column_type FROM information_schema.columns "
            "WHERE table_schema = DATABASE() AND table_name = 'tasks'"
        )
    }
    assert types["payload"] == types["result"] == types["exception"] == "longblob"
    assert types["error"] == "longtext"
    big = "x" * 900_000  # under the 1 MiB payload limit, 14 times BLOB's 64 KiB
    task = dbqueue.enqueue(jobs.echo, args=(big,))
    made = dbqueue.enqueue(jobs.make_bytes, args=(1_000_000,))
    result = db.cli("workoff", "--import", "tests.jobs")
    assert result.returncode == 0, result.stderr
    assert big in repr(task.refresh().result)
    assert db.scalar("SELECT LENGTH(payload) FROM tasks WHERE id = :id", id=task.id) > 900_000
    assert len(made.refresh().result) == 1_000_000


def test_four_byte_characters_in_arguments_and_queue_names(db):
    queue = "📬 mail"
    word = "𝄞 clef, 😀 face, 🀄 tile"
    task = dbqueue.enqueue(jobs.echo, args=(word,), queue=queue, meta={"tenant": "🏢"})
    other = dbqueue.enqueue(jobs.echo, args=("case",), queue="📬 MAIL")
    assert db.scalar("SELECT queue FROM tasks WHERE id = :id", id=task.id) == queue
    meta = db.scalar("SELECT meta FROM tasks WHERE id = :id", id=task.id)
    assert json.loads(meta) == {"tenant": "🏢"}
    with db.engine.begin() as conn:  # binary comparison: the other queue's row is not taken
        rows = store.claim(conn, "utf8-check", 10, [queue])
    assert [r.id for r in rows] == [task.id] and rows[0].queue == queue
    assert store.get(db.engine.connect(), other.id).status == "queued"
    tables = db.rows(
        "SELECT table_name, table_collation FROM information_schema.tables "
        "WHERE table_schema = DATABASE() AND table_name <> 'dbqueue_alembic_version'"
    )
    assert {r.table_collation for r in tables} == {"utf8mb4_bin"}, tables


def test_server_version_check_names_what_is_needed():
    for version in ("10.6.16-MariaDB", "10.11.6-MariaDB-0+deb12u1", "11.4.2-MariaDB", "8.0.36"):
        database.check_mysql_version(version, "db")
    with pytest.raises(errors.ConfigurationError, match=r"MariaDB 10\.6 or later"):
        database.check_mysql_version("10.5.23-MariaDB-1:10.5.23", "db")
    with pytest.raises(errors.ConfigurationError, match=r"MySQL 8\.0 or later"):
        database.check_mysql_version("5.7.44-log", "db")


def test_an_older_server_is_refused_at_connect(db, monkeypatch):
    """The check runs on every new connection of an Engine dbqueue makes: with the minimum
    raised above this server's version, connecting fails with the version named."""
    version = db.scalar("SELECT VERSION()")
    monkeypatch.setattr(database, "MARIADB_MINIMUM", (99, 0))
    engine = config.create_engine(db.url)
    try:
        with pytest.raises(errors.ConfigurationError) as refused:
            engine.connect()
    finally:
        engine.dispose()
    assert f"runs MariaDB {version}" in str(refused.value)
    assert "needs MariaDB 99.0 or later" in str(refused.value)
    assert f"{db.url} runs" in str(refused.value)  # the URL as given: no charset added


def _explain(db, statement: Any) -> dict[str, Any]:
    compiled = statement.compile(dialect=db.engine.dialect, compile_kwargs={"literal_binds": True})
    with db.engine.connect() as conn:
        plan = conn.exec_driver_sql(f"EXPLAIN FORMAT=JSON {compiled}".replace("%%", "%")).scalar()
    return json.loads(plan)  # type: ignore[no-any-return]


def _tables(plan: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(plan, dict):
        if "table_name" in plan:
            found.append(plan)
        for value in plan.values():
            found.extend(_tables(value))
    elif isinstance(plan, list):
        for value in plan:
            found.extend(_tables(value))
    return found


@pytest.mark.parametrize("queues", [None, ("mail",)], ids=["every-queue", "one-queue"])
def test_claim_plan_reads_the_claim_index_in_order(db, queues):
    """No partial indexes here: the claim's locking read goes down (status, [queue,]
    priority, run_at, id) in order, without a sort, beside finished history and another
    queue's backlog."""
    with db.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO tasks (queue, priority, run_at, status, handler, payload, attempts, "
            "max_attempts, created_at, finished_at) "
            "WITH RECURSIVE d(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM d WHERE i < 99) "
            "SELECT IF(MOD(a.i, 2), 'bulk', 'mail'), MOD(a.i, 5), UTC_TIMESTAMP(6), "
            "IF(b.i < 90, 'succeeded', 'queued'), 'tests.jobs:noop', x'00', 1, 25, "
            "UTC_TIMESTAMP(6), IF(b.i < 90, UTC_TIMESTAMP(6), NULL) FROM d a, d b"
        )
        conn.exec_driver_sql("ANALYZE TABLE tasks")
    engine = engines.of(db.engine)
    statement = engine.claim_statement(queues).params(claim_limit=100)
    tables = _tables(_explain(db, statement))
    (read,) = [t for t in tables if t["table_name"] == "tasks"]
    index = "ix_tasks_claimable" if queues is None else "ix_tasks_queue_claimable"
    print("MYSQLPLAN", queues, json.dumps(read))
    assert read["key"] == index, read
    assert read["access_type"] in ("ref", "range"), read  # an index lookup, no scan
    assert read["used_key_parts"][0] == "status", read
    assert "filesort" not in json.dumps(_explain(db, statement)), read  # in index order
    with db.engine.begin() as conn:
        claimed = store.claim(conn, "plan-check", 100, queues)
    assert len(claimed) == 100 and {r.queue for r in claimed} <= {"mail", "bulk"}


def test_concurrency_limits_read_the_one_concurrency_index(db):
    """Migration 0009 leaves one concurrency index here, (status, concurrency_key, queue): a
    key's running rows (the limited claim's count per candidate), the saturated keys and the
    heart's probe for queued rows with a key are all read through it, never a scan."""
    with db.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO tasks (queue, priority, run_at, status, handler, payload, attempts, "
            "max_attempts, created_at, concurrency_key, max_concurrency, locked_by) "
            "WITH RECURSIVE d(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM d WHERE i < 99) "
            "SELECT IF(MOD(a.i, 2), 'bulk', 'mail'), 0, UTC_TIMESTAMP(6), "
            "ELT(1 + MOD(b.i, 10), 'succeeded', 'succeeded', 'succeeded', 'succeeded', "
            "'succeeded', 'succeeded', 'succeeded', 'queued', 'queued', 'running'), "
            "'tests.jobs:noop', x'00', 1, 25, UTC_TIMESTAMP(6), "
            "IF(MOD(a.i, 3) = 0, CONCAT('key-', MOD(a.i, 20)), NULL), 2, 'w' FROM d a, d b"
        )
        conn.exec_driver_sql("ANALYZE TABLE tasks")
    indexes = {i["name"] for i in sa.inspect(db.engine).get_indexes("tasks")}
    assert "ix_tasks_concurrency_queued" in indexes
    assert "ix_tasks_concurrency_running" not in indexes
    probe = (
        sa.select(tasks.c.id)
        .where(status_is(Status.QUEUED), tasks.c.concurrency_key.is_not(None))
        .limit(1)
    )
    limited_claim = engines.of(db.engine).claim_statement(None, limited=True)
    for statement, alias in [
        (limits.saturated_keys(), "running_keys"),
        (probe, "tasks"),
        (limited_claim.params(claim_limit=100), "running_of_key"),
        (limited_claim.params(claim_limit=100), "running_keys"),
    ]:
        (read,) = [t for t in _tables(_explain(db, statement)) if t["table_name"] == alias]
        assert read["key"] == "ix_tasks_concurrency_queued", read
        assert read["access_type"] in ("ref", "range"), read
        assert read["used_key_parts"][:2] == ["status", "concurrency_key"], read
    with db.engine.begin() as conn:  # every key is at its limit: the rows without one
        assert len(store.claim(conn, "plan-check", 100, None, limited=True)) == 100


def test_a_worker_transaction_left_idle_is_ended_by_the_server_and_the_limit_does_not_stay(db):
    """MariaDB's idle_transaction_timeout stands in for PostgreSQL's SET LOCAL
    idle_in_transaction_session_timeout (store.limit_idle): a worker cut off mid-transaction
    must not hold its row locks until TCP gives up. The setting is the session's, so the pool
    takes it off when the connection comes back."""
    engine = config.create_engine(db.url, pool_size=1, max_overflow=0)  # one pooled session
    settings = dataclasses.replace(db.settings, engine=engine)
    worker = Worker(settings, ["none"], rescue_after=3)  # a third: 1 s
    with pytest.raises(sa.exc.DBAPIError) as ended:
        with worker.begin() as conn:
            assert conn.exec_driver_sql("SELECT @@idle_transaction_timeout").scalar() == 1
            conn.exec_driver_sql("SELECT id FROM tasks FOR UPDATE").all()
            time.sleep(3)  # silent inside the transaction: the server ends the session
            conn.exec_driver_sql("SELECT 1").scalar()
    assert database.is_disconnect(ended.value), ended.value
    with worker.begin() as conn:  # a new session; the limit is set for each transaction
        session = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar()
    with engine.connect() as conn:  # the same session, returned to the pool: no limit left
        assert conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar() == session
        assert conn.exec_driver_sql("SELECT @@idle_transaction_timeout").scalar() == 0
    engine.dispose()


def test_workers_poll_and_say_so(db):
    """No LISTEN/NOTIFY here: `dbqueue work` says it polls, starts no listener, and an idle
    worker still finds a task enqueued after it went idle (at its next poll)."""
    proc = db.popen("work", "--import", "tests.jobs", "--sleep-delay", "0.3")
    try:
        time.sleep(2)  # idle: nothing queued yet
        task = dbqueue.enqueue(jobs.add, args=(2, 3))
        task.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert task.result == 5
    assert "MySQL/MariaDB has no LISTEN/NOTIFY" in err, err
    assert "LISTEN connection" not in err, err


def test_concurrent_enqueues_of_one_unique_key_make_one_task(db):
    """Duplicate-key checks take locks on InnoDB: enqueuers racing on one key wait for each
    other and meet error 1062 on `unique_live`'s index, and every one of them gets the single
    task's id."""
    ids: list[int] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def enqueuer() -> None:
        try:
            start.wait(10)
            for _ in range(10):
                task = dbqueue.enqueue(jobs.noop, unique_key="race")
                with lock:
                    ids.append(task.id)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=enqueuer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert len(ids) == 80 and len(set(ids)) == 1
    assert db.scalar("SELECT count(*) FROM tasks") == 1


def test_a_batch_of_outcomes_with_different_attempts_and_errors_is_written_at_once(db):
    """MySQL's batch completion (one UPDATE, CASE id): rows on different attempts, results and
    notes per row, and a row another worker holds now, left as it is."""
    ids = dbqueue.enqueue_many(jobs.noop, [()] * 4)
    with db.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE tasks SET attempts = 2 WHERE id = {ids[1]}")
        rows = store.claim(conn, "w1", 4)
    assert sorted(r.attempts for r in rows) == [1, 1, 1, 3]
    with db.engine.begin() as conn:  # rescued and claimed again elsewhere meanwhile
        conn.exec_driver_sql(f"UPDATE tasks SET locked_by = 'w2' WHERE id = {ids[3]}")
    outcomes = [
        store.Outcome(
            id=r.id,
            attempts=r.attempts,
            status=store.Status.SUCCEEDED,
            result=None if r.id == ids[0] else bytes([r.id]) * 3,
            error=f"note {r.id} 😀",
        )
        for r in rows
    ]
    with db.engine.begin() as conn:
        assert engines.of(conn).complete_many(conn, "w1", outcomes) == set(ids[:3])
    stored = {r.id: r for r in db.rows("SELECT id, status, result, error, locked_by FROM tasks")}
    assert stored[ids[0]].result is None and stored[ids[0]].error == f"note {ids[0]} 😀"
    for task_id in ids[1:3]:
        assert stored[task_id].status == "succeeded" and stored[task_id].locked_by is None
        assert stored[task_id].result == bytes([task_id]) * 3
    assert stored[ids[3]].status == "running" and stored[ids[3]].locked_by == "w2"


def _short_lock_waits(engine: sa.Engine) -> None:
    """Every new connection of `engine` gives up a row or table lock wait after 1 s (1205)."""
    engine.dispose()

    @sa.event.listens_for(engine, "connect")
    def _short(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SET SESSION innodb_lock_wait_timeout = 1, lock_wait_timeout = 1")
        cursor.close()


@contextlib.contextmanager
def _retry_seen() -> Any:
    """An Event set when dbqueue logs that it runs a transaction of its own again."""
    retried = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", None) == "lock_conflict_retried":
                retried.set()

    seen = Seen()
    logging.getLogger("dbqueue.database").addHandler(seen)
    try:
        yield retried
    finally:
        logging.getLogger("dbqueue.database").removeHandler(seen)


def _enqueue_while_held(enqueue: Any, release: Any) -> Any:
    """`enqueue()` on a thread; once it was retried (or failed), `release()`; its outcome."""
    got: list[Any] = []
    with _retry_seen() as retried:
        thread = threading.Thread(target=lambda: got.append(_outcome(enqueue)))
        thread.start()
        while thread.is_alive() and not retried.wait(0.05):
            pass
        release()
        thread.join(60)
    assert len(got) == 1 and not isinstance(got[0], BaseException), got
    return got[0]


def test_an_enqueue_in_its_own_transaction_that_meets_a_lock_conflict_runs_again(db):
    """A unique key held by another uncommitted transaction: the enqueue's duplicate check
    waits on its lock and the server gives up (1205). dbqueue owns that transaction, so it
    runs it again; once the holder commits, the enqueue returns the holder's task."""
    _short_lock_waits(db.engine)
    with db.engine.connect() as holder:
        transaction = holder.begin()
        held = dbqueue.enqueue(jobs.noop, unique_key="k", connection=holder)
        task = _enqueue_while_held(
            lambda: dbqueue.enqueue(jobs.noop, unique_key="k"), transaction.commit
        )
    assert task.id == held.id
    assert db.scalar("SELECT count(*) FROM tasks") == 1


def test_a_lone_enqueue_in_autocommit_that_meets_a_lock_wait_timeout_runs_again(db):
    """The lone enqueue's single autocommit INSERT (insert_alone) waits on a table locked by
    another session and the server gives up (1205): dbqueue sends it again."""
    _short_lock_waits(db.engine)
    with db.engine.connect() as holder:
        holder.exec_driver_sql("LOCK TABLES tasks WRITE")
        task = _enqueue_while_held(
            lambda: dbqueue.enqueue(jobs.noop), lambda: holder.exec_driver_sql("UNLOCK TABLES")
        )
    assert db.scalar("SELECT id FROM tasks") == task.id


def _outcome(call: Any) -> Any:
    try:
        return call()
    except BaseException as exc:
        return exc


def test_a_lone_enqueue_is_one_self_committing_insert_and_the_next_transaction_is_one(db):
    """enqueue() outside the caller's transaction sends one INSERT in autocommit (no COMMIT
    round trip, as a hand-written single-row INSERT); the pooled session it leaves in
    autocommit is a transaction again for whatever uses it next."""
    engine = config.create_engine(db.url, pool_size=1, max_overflow=0)  # one pooled session
    settings = dataclasses.replace(db.settings, engine=engine)

    def counts() -> dict[str, int]:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SHOW SESSION STATUS WHERE Variable_name IN ('Com_insert', 'Com_commit')"
            ).all()
        return {name: int(value) for name, value in rows}

    before = counts()
    first = dbqueue.enqueue(jobs.add, (1, 2), settings=settings)
    second = dbqueue.enqueue(jobs.add, (3, 4), settings=settings)
    after = counts()
    assert after["Com_insert"] - before["Com_insert"] == 2
    assert after["Com_commit"] == before["Com_commit"]  # each INSERT committed itself
    assert db.scalar("SELECT count(*) FROM tasks") == 2  # seen by another session at once
    with engine.connect() as conn:  # the same session: a transaction again
        assert conn.exec_driver_sql("SELECT @@autocommit").scalar() == 0
        conn.exec_driver_sql(f"DELETE FROM tasks WHERE id = {first.id}")
        conn.rollback()
    third = dbqueue.enqueue(jobs.add, (5, 6), settings=settings)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        assert conn.exec_driver_sql("SELECT @@autocommit").scalar() == 1  # as it asked
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT @@autocommit").scalar() == 0
    ids = sorted(r[0] for r in db.rows("SELECT id FROM tasks"))
    assert ids == [first.id, second.id, third.id]
    engine.dispose()


def test_lone_enqueues_store_what_was_given_now_later_and_at_a_time(db):
    """The lone enqueue's two statements (engines/mysql.py: run_at the server's clock for a
    task to run now, else COALESCE of a time and a delay), each quoted by the driver: the
    values stored are those given, whatever bytes and characters the arguments hold."""
    awkward = ("it's", "back\\slash", "%s %(x)s", "\x00nul", "😀", b"\x00\xff'\\")
    when = dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc)
    now = dbqueue.enqueue(jobs.echo, args=awkward, queue="q'uote", priority=-3, timeout=2.5)
    later = dbqueue.enqueue(jobs.echo, args=awkward, run_at=dt.timedelta(hours=1))
    at = dbqueue.enqueue(jobs.echo, args=awkward, run_at=when, max_attempts=2)
    stored = {
        r.id: r
        for r in db.rows(
            "SELECT id, queue, priority, timeout, max_attempts, status, attempts, "
            "TIMESTAMPDIFF(MICROSECOND, created_at, run_at) AS ahead FROM tasks"
        )
    }
    assert stored[now.id].ahead == 0  # the server's clock, once for both columns
    assert 3599 * 10**6 < stored[later.id].ahead <= 3600 * 10**6
    assert at.refresh().run_at == when
    first = stored[now.id]
    assert (first.queue, first.priority, first.timeout) == ("q'uote", -3, 2.5)
    assert (first.status, first.attempts, first.max_attempts) == ("queued", 0, 25)
    assert stored[at.id].max_attempts == 2
    assert Worker(db.settings).work_off().succeeded == 1  # the others are not due
    assert now.refresh().result == {"args": awkward, "kwargs": {}}


@pytest.mark.parametrize("charset", ["utf8", "latin1"])
def test_a_url_asking_for_a_narrower_charset_than_utf8mb4_is_refused(db, charset):
    """On a utf8 (3-byte) connection a 4-byte character is an error (strict mode) or a '?'
    (not strict): a traceback with an emoji could not be stored. Refused, saying what to do."""
    url = f"{db.url}?charset={charset}"
    with pytest.raises(errors.ConfigurationError) as refused:
        config.Settings(database_url=url).get_engine()
    assert f"charset={charset} cannot carry every character" in str(refused.value)
    assert "remove charset= from the URL" in str(refused.value)
    engine = config.Settings(database_url=f"{db.url}?charset=UTF8MB4").get_engine()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT @@character_set_client").scalar() == "utf8mb4"
    engine.dispose()


def test_an_enqueue_in_its_own_transaction_chosen_as_a_deadlock_victim_runs_again(db):
    """A real deadlock (1213): the enqueue replacing a queued task's arguments holds the
    duplicate check's lock on the key and waits for the task's row, which the application's
    transaction has updated (with 50 other rows) and now finishes (its key leaves the unique
    index). InnoDB rolls back the enqueue, the lighter transaction; dbqueue runs it again
    and, the key free by then, stores a new task."""
    held = dbqueue.enqueue(jobs.noop, unique_key="k")
    dbqueue.enqueue_many(jobs.noop, range(50))  # the application's transaction updates these
    got: list[Any] = []
    with db.engine.connect() as app, _retry_seen() as retried:
        transaction = app.begin()
        app.execute(sa.text("UPDATE tasks SET max_attempts = 3"))  # the heavier transaction
        thread = threading.Thread(
            target=lambda: got.append(
                _outcome(lambda: dbqueue.enqueue(jobs.noop, unique_key="k", on_conflict="replace"))
            )
        )
        thread.start()
        db.wait_for(  # the enqueue's UPDATE of the held task, waiting for its row
            "SELECT count(*) FROM information_schema.processlist "
            "WHERE db = DATABASE() AND info LIKE 'UPDATE tasks SET queue=%%'",
            1,
        )
        app.execute(sa.text("UPDATE tasks SET status = 'succeeded' WHERE id = :i"), {"i": held.id})
        transaction.commit()
        thread.join(60)
        assert retried.is_set()
    assert len(got) == 1 and not isinstance(got[0], BaseException), got
    assert db.rows("SELECT id, status FROM tasks WHERE unique_key = 'k' ORDER BY id") == [
        (held.id, "succeeded"),
        (got[0].id, "queued"),
    ]
