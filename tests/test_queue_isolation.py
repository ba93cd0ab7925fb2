"""Queues isolated at scale (issue 16): what a worker given queues reads is those queues' rows.

A claim for `mail`, or for `mail`, `sms` and `push`, beside 100,000 queued rows of another
queue with a higher priority: it returns the listed queues' rows in claim order (priority,
run_at, id across them), and it reads none of the other queue's rows. On PostgreSQL that is
read from EXPLAIN ANALYZE of the very statement store.claim sends, custom and generic plan
(no row removed by a filter, rows read at most those returned plus one per queue); on SQLite
from EXPLAIN QUERY PLAN (the queue's index, searched by queue) and from the number of
virtual-machine steps the claim takes, which must not grow with the other queue's rows.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from dbqueue import engines, store
from tests.test_claim_plan import _claim_sql, _generic_plan, _nodes

BACKLOG = 100_000
LISTED = {"mail": 20, "sms": 15, "push": 10}

FILL_PG = """
INSERT INTO tasks (queue, priority, run_at, status, handler, payload, attempts, max_attempts,
                   created_at)
SELECT :queue, :priority + g % 3, now() - interval '1 hour' + g * interval '1 ms', 'queued',
       'tests.jobs:noop', '\\x00'::bytea, 0, 25, now()
FROM generate_series(1, :n) AS g
"""

FILL_SQLITE = """
WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :n)
INSERT INTO tasks (queue, priority, run_at, status, handler, payload, attempts, max_attempts,
                   created_at)
SELECT :queue, :priority + n % 3,
       strftime('%Y-%m-%d %H:%M:%f', 'now', '-3600 seconds', (n / 1000.0) || ' seconds'),
       'queued', 'tests.jobs:noop', x'00', 0, 25, strftime('%Y-%m-%d %H:%M:%f', 'now')
FROM g
"""


FILL_MYSQL = """
INSERT INTO tasks (queue, priority, run_at, status, handler, payload, attempts, max_attempts,
                   created_at)
WITH RECURSIVE d(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM d WHERE i < 99),
     g(n) AS (SELECT a.i * 10000 + b.i * 100 + c.i + 1 FROM d a, d b, d c
              WHERE a.i * 10000 < :n)
SELECT :queue, :priority + n % 3,
       UTC_TIMESTAMP(6) - INTERVAL 1 HOUR + INTERVAL n * 1000 MICROSECOND,
       'queued', 'tests.jobs:noop', x'00', 0, 25, UTC_TIMESTAMP(6)
FROM g WHERE n <= :n
"""  # MariaDB's max_recursive_iterations may be 1000: three digits of 0-99 instead

FILLS = {"postgresql": FILL_PG, "sqlite": FILL_SQLITE, "mariadb": FILL_MYSQL}


def fill(db, queue: str, n: int, priority: int = 0) -> None:
    """`n` ready tasks in `queue`, priorities `priority` to `priority + 2`, distinct run_ats."""
    sql = FILLS[db.kind]
    with db.engine.begin() as conn:
        conn.execute(sa.text(sql), {"queue": queue, "n": n, "priority": priority})


def analyze(db) -> None:
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        analyze = {"postgresql": "VACUUM ANALYZE tasks", "mariadb": "ANALYZE TABLE tasks"}
        conn.exec_driver_sql(analyze.get(db.kind, "ANALYZE"))


def claim(db, queues: list[str], limit: int = 100) -> list[Any]:
    with db.engine.begin() as conn:
        return store.claim(conn, "isolation", limit, queues)


def expected_order(db, queues: list[str], limit: int) -> list[int]:
    """The ids a claim must return: ready rows of `queues` by (priority, run_at, id)."""
    marks = ", ".join(f":q{i}" for i in range(len(queues)))
    rows = db.rows(
        f"SELECT id FROM tasks WHERE status = 'queued' AND queue IN ({marks}) "
        "ORDER BY priority, run_at, id LIMIT :limit",
        limit=limit,
        **{f"q{i}": q for i, q in enumerate(queues)},
    )
    return [r.id for r in rows]


def test_claim_for_one_queue_takes_its_rows_before_another_queues_higher_priority(db):
    fill(db, "bulk", 2_000, priority=-10)
    fill(db, "mail", 30)
    want = expected_order(db, ["mail"], 25)
    rows = claim(db, ["mail"], 25)
    assert [r.id for r in rows] == want
    assert {r.queue for r in rows} == {"mail"}
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'running'") == 25


@pytest.mark.parametrize("limit", [10, 100])
def test_claim_for_several_queues_keeps_the_order_across_them(db, limit):
    """Priority, then run_at, then id across the listed queues, as for one queue: a queue's
    rows are not taken before another's of a lower priority value."""
    fill(db, "bulk", 2_000, priority=-10)
    fill(db, "mail", 20, priority=1)
    fill(db, "sms", 20, priority=0)
    fill(db, "push", 20, priority=2)
    queues = ["mail", "sms", "push"]
    want = expected_order(db, queues, limit)
    rows = claim(db, queues, limit)
    assert [r.id for r in rows] == want and len(rows) == min(limit, 60)
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'running'") == len(want)
    # the rows read but not taken are still queued and claimable at once
    rest = claim(db, queues, 100)
    assert len(rows) + len(rest) == 60
    assert db.scalar("SELECT count(*) FROM tasks WHERE queue = 'bulk' AND status = 'queued'") == (
        2_000
    )


@pytest.mark.parametrize("queues", [["mail"], list(LISTED)], ids=["one-queue", "three-queues"])
def test_claim_reads_none_of_another_queues_backlog(db, queues):
    fill(db, "bulk", BACKLOG, priority=-10)
    for queue, n in LISTED.items():
        fill(db, queue, n)
    analyze(db)
    returned = sum(LISTED[q] for q in queues)
    if db.kind == "postgresql":
        for generic in (False, True):
            read, removed, indexes = _pg_rows_read(db, queues, generic)
            print("ISOLATION", queues, "generic" if generic else "custom", read, removed, indexes)
            assert removed == 0, (generic, indexes)
            assert read <= returned + len(queues), (generic, read, indexes)
            assert indexes == {"ix_tasks_queue_claimable"}, generic
    elif db.kind == "mariadb":
        with_backlog = _mysql_rows_read(db, queues)
        with db.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM tasks WHERE queue = 'bulk'")
        without = _mysql_rows_read(db, queues)
        print("ISOLATION rows read", queues, with_backlog, without)
        # every index entry InnoDB handed over (Handler_read_*): the listed queues' rows and
        # their updates, the same with or without the 100,000 rows beside them
        assert with_backlog <= 4 * returned + 20 * len(queues), (with_backlog, returned)
        assert with_backlog <= without + 2 * len(queues), (with_backlog, without)
    else:
        plan = _sqlite_plan(db, queues)
        print("ISOLATION", queues, plan)
        searches = [d for d in plan if "ix_tasks_queue_claimable" in d]
        assert len(searches) == len(queues), plan
        assert all("(queue=?" in d for d in searches), plan
        assert not [d for d in plan if d.startswith("SCAN tasks")], plan
        with_backlog = _sqlite_steps(db, queues)
        with db.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM tasks WHERE queue = 'bulk'")
        without = _sqlite_steps(db, queues)
        print("ISOLATION steps", with_backlog, without)
        # a walk over the backlog would take millions of steps; the claim takes the same
        # few thousand either way (the b-tree one level deeper costs a few more)
        assert with_backlog <= without * 1.2 + 200, (with_backlog, without)
    want = expected_order(db, queues, 100)
    assert [r.id for r in claim(db, queues)] == want and len(want) == returned


def _pg_rows_read(db, queues: list[str], generic: bool) -> tuple[int, int, set[str]]:
    """(rows the claim's scans of the claim indexes returned, rows any node removed by a
    filter or recheck, the claim indexes used), from EXPLAIN ANALYZE of the claim (rolled
    back)."""
    statement, parameters = _claim_sql(db, queues)
    if generic:
        types = {n: "bigint" if isinstance(v, int) else "text" for n, v in parameters.items()}
        literals = {
            n: str(v) if isinstance(v, int) else "'" + v.replace("'", "''") + "'"
            for n, v in parameters.items()
        }
        nodes = _generic_plan(db, statement, types, literals, analyze=True)
    else:
        with db.engine.connect() as conn:
            raw = conn.exec_driver_sql(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters
            ).scalar()
            conn.rollback()
        nodes = _nodes(raw[0]["Plan"])
    removed = sum(
        (n.get("Rows Removed by Filter", 0) + n.get("Rows Removed by Index Recheck", 0))
        * n.get("Actual Loops", 1)
        for n in nodes
    )
    claim_scans = [n for n in nodes if n.get("Index Name", "").endswith("claimable")]
    read = sum(n["Actual Rows"] * n.get("Actual Loops", 1) for n in claim_scans)
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], nodes
    return read, removed, {n["Index Name"] for n in claim_scans}


def _sqlite_statement(db, queues: list[str]) -> tuple[str, tuple[Any, ...]]:
    statement = engines.of(db.engine).claim_statement(tuple(queues))
    compiled = statement.compile(dialect=db.engine.dialect)
    values = {**compiled.params, "claim_limit": 100, "claim_worker": "isolation"}
    params = tuple(values[name] for name in compiled.positiontup)
    return str(compiled), params


def _mysql_rows_read(db, queues: list[str]) -> int:
    """Rows and index entries InnoDB returned to the server during one claim, rolled back:
    the session's Handler_read_* counters before and after it (less what reading the counters
    costs, measured the same way without a claim)."""

    def handler_reads(conn: sa.Connection) -> int:
        rows = conn.exec_driver_sql("SHOW SESSION STATUS LIKE 'Handler_read%%'").all()
        return sum(int(value) for _name, value in rows)

    with db.engine.connect() as conn:
        first = handler_reads(conn)
        idle = handler_reads(conn) - first
        before = handler_reads(conn)
        store.claim(conn, "isolation", 100, queues)
        after = handler_reads(conn)
        conn.rollback()
    return after - before - idle


def _sqlite_plan(db, queues: list[str]) -> list[str]:
    sql, params = _sqlite_statement(db, queues)
    with db.engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params).all()
    return [r[3] for r in rows]


def _sqlite_steps(db, queues: list[str]) -> int:
    """Virtual-machine steps (in units of 10) of one claim, rolled back."""
    sql, params = _sqlite_statement(db, queues)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    with db.engine.connect() as conn:
        driver: Any = conn.connection.driver_connection
        driver.set_progress_handler(count, 10)
        try:
            conn.exec_driver_sql(sql, params).all()
        finally:
            driver.set_progress_handler(None, 0)
            conn.rollback()
    return steps


def test_concurrent_claims_over_several_queues_never_exceed_the_limit_nor_share_a_row(db):
    """A claim over several queues reads (and on PostgreSQL locks) up to its limit per queue
    and keeps its limit: claimers in threads never get more than the limit, never the same
    row twice, and together take every row."""
    import threading

    for queue in ("mail", "sms", "push"):
        fill(db, queue, 400)
    fill(db, "bulk", 2_000, priority=-10)
    analyze(db)
    sizes: list[int] = []
    claimed: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def claimer() -> None:
        try:
            while True:
                rows = claim(db, ["mail", "sms", "push"], 10)
                with lock:
                    sizes.append(len(rows))
                    claimed.extend(r.id for r in rows)
                if not rows:
                    return
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert max(sizes) <= 10
    assert len(claimed) == len(set(claimed)) == 1_200
    assert db.scalar("SELECT count(*) FROM tasks WHERE queue = 'bulk' AND status = 'queued'") == (
        2_000
    )
