"""What reads by queue besides the claim (issue 16, point 4): the idle worker's next run_at,
the queue counts of `dbqueue status`, the dashboard and /metrics.

Behaviour only (speed is scripts/bench's): the next run_at read by skipping from priority to
priority is the true earliest across priorities and queues; finished counts past the exact
limit are estimates, marked as such, close to the truth, while queued and running stay exact;
the dashboard and `dbqueue status` say when they show an estimate; a task list past its
counting limit says "more than"; /metrics' first scrape of a long history starts its totals
at 0 instead of adding the history up. The limits are lowered here so that a few thousand
rows stand for millions.
"""

from __future__ import annotations

import datetime as dt
import os
import re

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

import dbqueue
from dbqueue import stats, store
from dbqueue.web import create_app, metrics, queries
from tests import jobs
from tests.test_web import row_cells, scrape, set_row

FILL_PG = """
INSERT INTO tasks (queue, priority, run_at, status, handler, payload, attempts, max_attempts,
                   created_at, started_at, finished_at)
SELECT CASE WHEN g % 4 = 0 THEN 'mail' ELSE 'default' END, 0, now() - interval '1 hour',
       CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'succeeded' END, 'tests.jobs:noop',
       '\\x00'::bytea, 1, 25, now(), now() - interval '2 hour', now() - interval '1 hour'
FROM generate_series(1, :n) AS g
"""

FILL_SQLITE = """
WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < :n)
INSERT INTO tasks (queue, priority, run_at, status, handler, payload, attempts, max_attempts,
                   created_at, started_at, finished_at)
SELECT CASE WHEN g % 4 = 0 THEN 'mail' ELSE 'default' END, 0,
       strftime('%Y-%m-%d %H:%M:%f', 'now', '-3600 seconds'),
       CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'succeeded' END, 'tests.jobs:noop', x'00', 1,
       25, strftime('%Y-%m-%d %H:%M:%f', 'now'),
       strftime('%Y-%m-%d %H:%M:%f', 'now', '-7200 seconds'),
       strftime('%Y-%m-%d %H:%M:%f', 'now', '-3600 seconds')
FROM s
"""

FILL_MYSQL = """
INSERT INTO tasks (queue, priority, run_at, status, handler, payload, attempts, max_attempts,
                   created_at, started_at, finished_at)
WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < :n)
SELECT CASE WHEN g % 4 = 0 THEN 'mail' ELSE 'default' END, 0,
       UTC_TIMESTAMP(6) - INTERVAL 1 HOUR,
       CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'succeeded' END, 'tests.jobs:noop', x'00', 1,
       25, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6) - INTERVAL 2 HOUR, UTC_TIMESTAMP(6) - INTERVAL 1 HOUR
FROM s
"""
FILL = {"postgresql": FILL_PG, "sqlite": FILL_SQLITE, "mariadb": FILL_MYSQL}

HISTORY = 20_000  # finished rows: mail 5,000 (1,000 failed), default 15,000 (1,000 failed)


def fill_history(db, n: int = HISTORY) -> None:
    with db.engine.begin() as conn:
        if db.kind == "mariadb":  # max_recursive_iterations: 1,000 here
            conn.exec_driver_sql("SET SESSION max_recursive_iterations = 1000000")
        conn.execute(sa.text(FILL[db.kind]), {"n": n})


@pytest.fixture
def small_limits(monkeypatch):
    """A history of 20,000 rows counts as a long one: estimated from 50 windows of 100 ids."""
    monkeypatch.setattr(stats, "EXACT_FINISHED_UP_TO", 1_000)
    monkeypatch.setattr(stats, "SAMPLE_WIDTH", 100)


def next_in(db, queues) -> float | None:
    with db.engine.connect() as conn:
        return store.seconds_until_next(conn, queues)


def test_next_run_at_is_the_earliest_across_priorities_and_queues(db):
    """The claim indexes are ordered by priority first: the earliest run_at may sit at any
    priority, and the skip from one priority to the next must visit them all."""
    assert next_in(db, None) is None and next_in(db, ["mail"]) is None
    for priority, minutes in [(0, 50), (3, 40), (7, 20), (9, 30)]:
        dbqueue.enqueue(
            jobs.noop, queue="mail", priority=priority, run_at=dt.timedelta(minutes=minutes)
        )
    for priority, minutes in [(-5, 45), (2, 10)]:
        dbqueue.enqueue(
            jobs.noop, queue="sms", priority=priority, run_at=dt.timedelta(minutes=minutes)
        )
    dbqueue.enqueue(jobs.noop, queue="bulk", priority=1, run_at=dt.timedelta(minutes=5))
    mail = next_in(db, ["mail"])
    assert mail is not None and 19 * 60 < mail <= 20 * 60
    both = next_in(db, ["mail", "sms", "push"])
    assert both is not None and 9 * 60 < both <= 10 * 60
    every = next_in(db, None)
    assert every is not None and 4 * 60 < every <= 5 * 60
    assert next_in(db, ["push"]) is None
    ready = dbqueue.enqueue(jobs.noop, queue="mail", priority=100)
    assert next_in(db, ["mail"]) == 0.0
    with db.engine.begin() as conn:  # running and finished rows do not count
        store.claim(conn, "w", 1, ["mail"])
    assert Status_of(db, ready.id) == "running"
    assert next_in(db, ["mail"]) == pytest.approx(mail, abs=5)


def Status_of(db, task_id: int) -> str:
    return str(db.scalar("SELECT status FROM tasks WHERE id = :id", id=task_id))


def test_counts_are_exact_below_the_limit(db):
    fill_history(db, 400)
    dbqueue.enqueue_many(jobs.noop, [()] * 3, queue="mail")
    with db.engine.connect() as conn:
        got = {(c.queue, c.status): (c.count, c.estimated) for c in stats.counts(conn)}
    assert got == {
        ("default", "failed"): (20, False),
        ("default", "succeeded"): (280, False),
        ("mail", "failed"): (20, False),
        ("mail", "queued"): (3, False),
        ("mail", "succeeded"): (80, False),
    }


def test_finished_counts_past_the_limit_are_estimates_and_the_rest_stays_exact(db, small_limits):
    fill_history(db)
    dbqueue.enqueue_many(jobs.noop, [()] * 7, queue="mail")
    running = dbqueue.enqueue(jobs.noop, queue="sms")
    set_row(db, running.id, status="running", locked_by="w1")
    with db.engine.connect() as conn:
        got = {(c.queue, c.status): c for c in stats.counts(conn)}
    assert (got["mail", "queued"].count, got["mail", "queued"].estimated) == (7, False)
    assert (got["sms", "running"].count, got["sms", "running"].estimated) == (1, False)
    truth = {
        ("mail", "succeeded"): 4_000,
        ("mail", "failed"): 1_000,
        ("default", "succeeded"): 14_000,
        ("default", "failed"): 1_000,
    }
    for key, exact in truth.items():
        assert got[key].estimated, key
        assert abs(got[key].count - exact) <= 0.15 * exact, (key, got[key].count, exact)


def test_overview_and_status_say_when_they_show_an_estimate(db, small_limits, monkeypatch):
    fill_history(db)
    dbqueue.enqueue(jobs.noop, queue="mail")
    with TestClient(create_app(db.settings)) as client:
        page = client.get("/").text
    cells = row_cells(page, "mail")
    assert cells[1] == "1" and cells[4].startswith("≈") and cells[5].startswith("≈"), cells
    assert "≈ marks an estimate" in page
    with db.engine.connect() as conn:
        (mail,) = [q for q in queries.overview(conn) if q.queue == "mail"]
    assert mail.estimated and mail.ready == 1


def test_status_command_marks_estimates(db):
    """`dbqueue status` in a real process, with its real limit (100,000): exact below it."""
    fill_history(db, 300)
    done = db.cli("status")
    assert done.returncode == 0, done.stderr
    assert "~" not in done.stdout and "estimated" not in done.stdout
    assert row_of(done.stdout, "mail") == ["mail", "0", "0", "60", "15", "0"]


def row_of(output: str, queue: str) -> list[str]:
    for line in output.splitlines():
        if line.split()[:1] == [queue]:
            return line.split()
    raise AssertionError(f"no line for {queue!r} in {output!r}")


def test_task_list_past_its_counting_limit_says_more_than(db, monkeypatch):
    monkeypatch.setattr(queries, "COUNT_UP_TO", 60)
    dbqueue.enqueue_many(jobs.noop, [()] * 130)
    with TestClient(create_app(db.settings)) as client:
        many = client.get("/tasks").text
        few = client.get("/tasks?queue=nowhere").text
    assert "more than 60 tasks (not counted further)" in many
    assert 'rel="next"' in many
    assert "page 1 of 1 · 0 tasks" in few
    with db.engine.connect() as conn:
        rows, total, _ = queries.list_tasks(conn, queries.TaskFilter(), 50, 100)
    assert len(rows) == 30 and total == 130  # a page past the limit counts up to itself


def test_metrics_first_scrape_of_a_long_history_starts_totals_at_zero(db, monkeypatch):
    fill_history(db, 300)
    monkeypatch.setattr(metrics, "HISTORY_UP_TO", 100)
    with TestClient(create_app(db.settings)) as client:
        first = scrape(client)
    mail = (("queue", "mail"),)
    assert first.get(("dbqueue_tasks_processed_total", mail), 0) == 0
    assert first[("dbqueue_tasks", (("queue", "mail"), ("status", "succeeded")))] == 60
    monkeypatch.setattr(metrics, "HISTORY_UP_TO", 1_000)
    with TestClient(create_app(db.settings)) as client:
        again = scrape(client)
    assert again[("dbqueue_tasks_processed_total", mail)] == 75  # a short history is added up


def test_task_lists_follow_their_index_order_and_name_every_queue(db):
    """Queued tasks are listed in the order they will run, finished ones latest finished
    first; the filter form names queues with queued, running and only finished tasks."""
    later = dbqueue.enqueue(jobs.noop, queue="mail", priority=5)
    first = dbqueue.enqueue(jobs.noop, queue="sms", priority=-1)
    second = dbqueue.enqueue(jobs.noop, queue="mail", priority=0)
    running = dbqueue.enqueue(jobs.noop, queue="push")
    set_row(db, running.id, status="running", locked_by="w1")
    old = dbqueue.enqueue(jobs.noop, queue="archive")
    new = dbqueue.enqueue(jobs.noop, queue="archive")
    set_row(db, old.id, status="succeeded", finished_at_ago=10)
    set_row(db, new.id, status="succeeded", finished_at_ago=20)
    with db.engine.connect() as conn:
        queued, total, _ = queries.list_tasks(conn, queries.TaskFilter("queued"), 50, 0)
        done, _, _ = queries.list_tasks(conn, queries.TaskFilter("succeeded"), 50, 0)
        names = queries.queue_names(conn)
        waiting = stats.waiting_queues(conn)
    assert [r.id for r in queued] == [first.id, second.id, later.id] and total == 3
    assert [r.id for r in done] == [old.id, new.id]  # old finished later
    assert names == ["archive", "mail", "push", "sms"]
    assert waiting == ["mail", "sms"]


def test_a_large_backlog_is_estimated_and_a_small_queue_beside_it_stays_exact(
    db, small_limits, monkeypatch
):
    from tests.test_queue_isolation import fill

    monkeypatch.setattr(stats, "EXACT_QUEUED_UP_TO", 1_000)
    fill(db, "bulk", 20_000)
    fill(db, "mail", 30)
    dbqueue.enqueue(jobs.noop, queue="mail", run_at=dt.timedelta(hours=1))
    oldest = db.scalar("SELECT min(run_at) FROM tasks WHERE queue = 'bulk'")
    with db.engine.connect() as conn:
        waiting = {q.queue: q for q in stats.queued(conn)}
        (bulk,) = [q for q in queries.overview(conn) if q.queue == "bulk"]
    assert (waiting["mail"].ready, waiting["mail"].scheduled) == (30, 1)
    assert not waiting["mail"].estimated
    assert waiting["bulk"].estimated and abs(waiting["bulk"].ready - 20_000) <= 3_000
    assert waiting["bulk"].scheduled == 0
    assert waiting["bulk"].oldest_ready is not None
    if isinstance(oldest, str):  # SQLite's text
        oldest = dt.datetime.fromisoformat(oldest)
    if oldest.tzinfo is None:  # SQLite's text, MySQL's DATETIME: UTC
        oldest = oldest.replace(tzinfo=dt.timezone.utc)
    assert abs((waiting["bulk"].oldest_ready - oldest).total_seconds()) < 0.01  # exact
    assert bulk.queued_estimated and not bulk.estimated
    with TestClient(create_app(db.settings)) as client:
        page = client.get("/").text
    assert row_cells(page, "bulk")[1].startswith("≈") and row_cells(page, "mail")[1] == "30"


@pytest.mark.postgresql_only
def test_dashboard_and_metrics_reads_run_without_jit(db):
    """PostgreSQL JIT-compiles a statement whose estimated cost passes jit_above_cost; the
    capped counts are estimated in the millions on a large table, so /metrics' first scrape
    beside a 1,000,000-task backlog spent 2 s compiling (0.06 s reading). Every statement the
    dashboard and /metrics send about `tasks` runs with jit off (`dbqueue status` reads
    through the same stats.without_jit). Checked on
    the connection itself, after each statement, with JIT made eager (jit_above_cost 0)."""
    with db.engine.connect() as conn:
        if not conn.exec_driver_sql("SELECT pg_jit_available()").scalar():
            reason = "this PostgreSQL has no JIT provider (llvmjit): nothing to turn off"
            if os.environ.get("CI"):  # CI's PostgreSQL 15 has llvmjit: this test must run there
                pytest.fail(f"{reason} (CI is set: this test must run)")
            pytest.skip(reason)
        name = conn.exec_driver_sql("SELECT current_database()").scalar()
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f'ALTER DATABASE "{name}" SET jit_above_cost = 0')
        conn.exec_driver_sql(f'ALTER DATABASE "{name}" SET jit = on')
    db.engine.dispose()
    dbqueue.configure_queue("capped", max_concurrency=1)
    dbqueue.enqueue(jobs.noop)
    dbqueue.enqueue(jobs.noop, queue="capped")
    seen: list[tuple[str, str]] = []

    def check(conn, cursor, statement, parameters, context, executemany):
        if " tasks" in statement and statement.lstrip().upper().startswith("SELECT"):
            jit = conn.connection.dbapi_connection.execute("SHOW jit").fetchone()[0]
            seen.append((jit, statement.split("\n")[0][:80]))

    sa.event.listen(db.engine, "after_cursor_execute", check)
    try:
        with TestClient(create_app(db.settings)) as client:
            for path in ("/metrics", "/metrics", "/", "/tasks"):
                assert client.get(path).status_code == 200
    finally:
        sa.event.remove(db.engine, "after_cursor_execute", check)
    assert seen, "no statement about tasks was seen"
    assert [s for s in seen if s[0] != "off"] == []


def test_the_next_run_at_is_found_past_a_thousand_distinct_priorities(db):
    """The walk over priorities is a recursive query, which MariaDB stops silently after
    max_recursive_iterations (1000) and MySQL fails after cte_max_recursion_depth (1000): with
    1,200 distinct priorities, the earliest run_at sits behind the 1,000th."""
    with db.engine.begin() as conn:
        for priority in range(1199):
            dbqueue.enqueue(
                jobs.noop,
                priority=priority,
                queue="q",
                run_at=dt.timedelta(hours=1),
                connection=conn,
            )
        dbqueue.enqueue(
            jobs.noop, priority=5000, queue="q", run_at=dt.timedelta(minutes=1), connection=conn
        )
    assert db.scalar("SELECT count(DISTINCT priority) FROM tasks") == 1200
    with db.engine.connect() as conn:
        for queues in (None, ["q"], ["other", "q"]):
            wait = store.seconds_until_next(conn, queues)
            assert wait is not None and 0 < wait <= 60, (queues, wait)
        assert store.seconds_until_next(conn, ["other"]) is None
    dbqueue.enqueue(jobs.noop, priority=6000, queue="q", run_at=dt.timedelta(seconds=-5))
    with db.engine.connect() as conn:
        assert store.seconds_until_next(conn, ["q"]) == 0
        (counted,) = stats.queued(conn)
    assert (counted.queue, counted.ready, counted.scheduled) == ("q", 1, 1200)
    assert counted.oldest_ready is not None


def test_every_waiting_queue_is_listed_past_a_thousand_queues(db):
    """The walk over queue names (status, dashboard, /metrics) is bounded the same way, and
    the queue counts walk each queue's priorities, 50 queues a statement (MariaDB refuses a
    WITH clause of more than 64 CTEs, error 4003)."""
    names = [f"q{i:04d}" for i in range(1100)]
    with db.engine.begin() as conn:
        for name in names:
            dbqueue.enqueue(jobs.noop, queue=name, connection=conn)
    with db.engine.connect() as conn:
        assert stats.waiting_queues(conn) == names
        counted = stats.queued(conn)  # a walk per queue: at most 64 CTEs a statement on MariaDB
    assert [(q.queue, q.ready, q.scheduled) for q in counted] == [(n, 1, 0) for n in names]
    assert all(q.oldest_ready is not None for q in counted)


@pytest.mark.mysql_only
def test_on_mariadb_a_statement_walks_one_queue_at_most(db):
    """MariaDB's memory for a statement grows exponentially with its recursive CTEs (10.11:
    8 walks took 1.9 GB, 10 had the server killed by the OOM killer): `dbqueue status`, the
    dashboard and an idle worker with several queues send one walk a statement. Checked
    before the statement reaches the server, which a statement of the old code would kill."""
    names = [f"q{i}" for i in range(12)]
    for name in names:
        dbqueue.enqueue(jobs.noop, queue=name, run_at=dt.timedelta(minutes=1))
    walks_seen: list[int] = []

    def one_walk_at_most(conn, cursor, statement, parameters, context, executemany):
        walks = len(re.findall(r"tasks\.priority > \w+\.(?:priority|value)", statement))
        walks_seen.append(walks)
        if walks > 1:
            raise AssertionError(f"{walks} recursive walks in one statement")

    sa.event.listen(db.engine, "before_cursor_execute", one_walk_at_most)
    try:
        with db.engine.connect() as conn:
            assert len(stats.queued(conn)) == 12
            for queues in (names, None):
                wait = store.seconds_until_next(conn, queues)
                assert wait is not None and 0 < wait <= 60
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", one_walk_at_most)
    assert walks_seen.count(1) == 12 + 12 + 1
