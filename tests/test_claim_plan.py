"""The claim on PostgreSQL: its plan and its limit (R14, R17).

The plan is read from EXPLAIN (FORMAT JSON) of the very statement store.claim sends (captured
from psycopg's cursor), with many finished rows present: it must walk a partial index
(ix_tasks_claimable, or ix_tasks_queue_claimable for a worker given queues) and never scan
the table; tests/test_queue_isolation.py checks what a claim for some queues reads beside
another queue's backlog. R14: many concurrent claims over 10,000 queued
rows never return more rows than their limit, and never claim a row twice. The batch
completion's generic plan finds its rows through an index and never unnests its arrays.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg.sql
import pytest
import sqlalchemy as sa

from dbqueue import store
from dbqueue.engines import postgresql as pg_engine
from dbqueue.schema import Status

pytestmark = pytest.mark.postgresql_only

FILL = """
INSERT INTO tasks (queue, priority, run_at, status, handler, payload, attempts, max_attempts,
                   created_at, started_at, finished_at)
SELECT CASE WHEN g % 3 = 0 THEN 'mail' ELSE 'default' END, g % 5, now() - interval '1 hour',
       :status, 'tests.jobs:noop', '\\x00'::bytea, :attempts, 25, now(), now(), :finished
FROM generate_series(1, :n) AS g
"""


def _fill(db, n: int, status: str) -> None:
    finished = status in ("succeeded", "failed", "cancelled")
    with db.engine.begin() as conn:
        conn.execute(
            sa.text(FILL.replace(":finished", "now()" if finished else "NULL")),
            {"status": status, "attempts": 1 if finished else 0, "n": n},
        )


def _claim_sql(db, queues: list[str] | None) -> tuple[str, Any]:
    """The SQL and parameters store.claim sends, captured from psycopg's cursor (the claim
    goes to the driver directly, so SQLAlchemy's cursor events would not see it; rolled
    back)."""
    sent: list[tuple[str, Any]] = []
    execute = psycopg.Cursor.execute

    def capture(cursor, query, params=None, **kwargs):
        if str(query).lstrip().upper().startswith(("WITH", "UPDATE")):
            sent.append((str(query), params))
        return execute(cursor, query, params, **kwargs)

    with db.engine.connect() as conn, pytest.MonkeyPatch.context() as patch:
        patch.setattr(psycopg.Cursor, "execute", capture)
        with conn.begin() as tx:
            store.claim(conn, "plan-check", 100, queues)
            tx.rollback()
    (found,) = sent
    return found


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out.extend(_nodes(child))
    return out


def _plan(db, queues: list[str] | None, generic: bool = False) -> list[dict[str, Any]]:
    """The claim's plan; `generic`: the plan of the prepared statement with its parameters
    unknown, which PostgreSQL may switch to once psycopg prepares it (its 6th run)."""
    statement, parameters = _claim_sql(db, queues)
    if generic:
        types = {n: "bigint" if isinstance(v, int) else "text" for n, v in parameters.items()}
        literals = {n: psycopg.sql.Literal(v).as_string(None) for n, v in parameters.items()}
        return _generic_plan(db, statement, types, literals)
    with db.engine.connect() as conn:
        raw = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", parameters).scalar()
    return _nodes(raw[0]["Plan"])


def _generic_plan(
    db, statement: str, types: dict[str, str], literals: dict[str, str], analyze: bool = False
) -> list[dict[str, Any]]:
    """The plan nodes of `statement` (psycopg's %(name)s placeholders) as a prepared
    statement's generic plan: parameters typed by `types`, run with the SQL `literals`;
    `analyze`: run too (rolled back), with actual row counts."""
    for number, name in enumerate(types, 1):
        statement = statement.replace(f"%({name})s", f"${number}")
    prepare = f"PREPARE generic_plan ({', '.join(types.values())}) AS {statement}"
    arguments = ", ".join(literals[name] for name in types)
    options = "ANALYZE, FORMAT JSON" if analyze else "FORMAT JSON"
    with db.engine.connect() as conn:
        conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        conn.exec_driver_sql(prepare.replace("%%", "%"))
        raw = conn.exec_driver_sql(f"EXPLAIN ({options}) EXECUTE generic_plan({arguments})")
        plan = raw.scalar()
        conn.rollback()
    return _nodes(plan[0]["Plan"])


@pytest.mark.parametrize("generic", [False, True], ids=["custom-plan", "generic-plan"])
@pytest.mark.parametrize("queues", [None, ["mail"]], ids=["all-queues", "one-queue"])
def test_claim_uses_the_partial_index_with_many_finished_rows(db, queues, generic):
    _fill(db, 200_000, "succeeded")
    _fill(db, 20_000, "failed")
    _fill(db, 5_000, "queued")
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE tasks")
    nodes = _plan(db, queues, generic)
    summary = [(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in nodes]
    print("CLAIMPLAN", queues, summary)
    index = "ix_tasks_claimable" if queues is None else "ix_tasks_queue_claimable"
    assert any(n.get("Index Name") == index for n in nodes), summary
    seq_scans = [n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name")]
    assert not seq_scans, summary
    # the LIMITed, locked subquery sits behind the materialised CTE fence
    assert any(n["Node Type"] == "CTE Scan" for n in nodes), summary
    assert any(n["Node Type"] == "LockRows" for n in nodes), summary


@pytest.mark.parametrize("queues", [None, ["mail"]], ids=["all-queues", "one-queue"])
def test_claim_on_a_small_table_looks_its_rows_up_by_key(db, queues):
    """A small table (a queue kept pruned), as a running worker claims from it: through the
    prepared statement's generic plan, which does not know the LIMIT. With `id IN (SELECT
    ...)` that plan hash-joined the claimed ids to a sequential scan of the whole table."""
    _fill(db, 10_000, "queued")
    _fill(db, 1_000, "succeeded")
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE tasks")
    nodes = _plan(db, queues, generic=True)
    summary = [(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in nodes]
    print("SMALLPLAN", queues, summary)
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], summary
    assert any(n.get("Index Name") == "pk_tasks" for n in nodes), summary


def test_concurrent_claims_never_exceed_their_limit(db):
    """R14: 10,000 queued rows, claim(limit=10) from 8 threads until none is left."""
    _fill(db, 10_000, "queued")
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE tasks")
    sizes: list[int] = []
    claimed: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def claimer(index: int) -> None:
        try:
            while True:
                with db.engine.begin() as conn:
                    rows = store.claim(conn, f"claimer-{index}", 10)
                with lock:
                    sizes.append(len(rows))
                    claimed.extend(r.id for r in rows)
                if not rows:
                    return
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    print(f"CLAIMLIMIT claims={len(sizes)} max={max(sizes)} rows={len(claimed)}")
    assert max(sizes) <= 10
    assert len(sizes) >= 1_000
    assert len(claimed) == len(set(claimed)) == 10_000
    assert db.scalar("SELECT max(attempts) FROM tasks") == 1
    assert db.scalar("SELECT count(*) FROM tasks WHERE status <> 'running'") == 0


def test_only_the_claim_transaction_skips_the_flush_wait(db):
    """synchronous_commit is off for the claim's own transaction and nothing else: the next
    transaction on the same connection (an outcome, an enqueue) waits for its flush again."""
    _fill(db, 10, "queued")
    with db.engine.connect() as conn:
        with conn.begin():
            claimed = store.claim(conn, "flush-check", 5)
            during = conn.exec_driver_sql("SHOW synchronous_commit").scalar()
        with conn.begin():
            after = conn.exec_driver_sql("SHOW synchronous_commit").scalar()
    auto = db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    with auto:
        store.claim(auto, "flush-check", 5)  # its own implicit transaction, ended at once
        outcomes = [
            store.Outcome(id=r.id, attempts=r.attempts, status=Status.SUCCEEDED) for r in claimed
        ]
        store.record(auto, "flush-check", outcomes)
        later = auto.exec_driver_sql("SHOW synchronous_commit").scalar()
    assert (len(claimed), during, after, later) == (5, "off", "on", "on")
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'succeeded'") == 5


@pytest.mark.parametrize("statement", ["bare", "with-results"])
def test_batch_completion_generic_plan_walks_an_index_once(db, statement):
    """The batch completion, as psycopg prepares it (generic plan): its rows are found through
    an index, and the arrays are read by position, never unnested into a join: joined to
    unnest(ids, attempts), the generic plan re-ran the unnest for every row of a nested loop."""
    _fill(db, 100_000, "succeeded")
    _fill(db, 1_000, "running")
    with db.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE tasks SET locked_by = 'w' WHERE status = 'running'")
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE tasks")
    text = pg_engine.COMPLETE_MANY_BARE if statement == "bare" else pg_engine.COMPLETE_MANY
    types = {"ids": "bigint[]", "attempts": "int[]", "worker": "text"}
    if statement != "bare":
        types.update(results="bytea[]", errors="text[]")
    literals = {
        "ids": "'{1,2,3}'",
        "attempts": "'{1,1,1}'",
        "worker": "'w'",
        "results": "'{NULL,NULL,NULL}'",
        "errors": "'{NULL,NULL,NULL}'",
    }
    nodes = _generic_plan(db, str(text.compile(dialect=db.engine.dialect)), types, literals)
    summary = [(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in nodes]
    print("DONEPLAN", statement, summary)
    assert not [n for n in nodes if n["Node Type"] in ("Function Scan", "Seq Scan")], summary
    assert any("Index" in n["Node Type"] for n in nodes), summary


def _rows_fetched(db) -> int:
    """Rows of `tasks` fetched through any index so far (flushed statistics)."""
    return int(
        db.scalar("SELECT idx_tup_fetch FROM pg_stat_user_tables WHERE relname = 'tasks'") or 0
    )


@pytest.mark.parametrize("idle_first", [False, True], ids=["new-worker", "idle-worker"])
@pytest.mark.parametrize("history", [0, 100_000], ids=["analyzed-empty", "analyzed-history"])
def test_all_queues_claim_reads_only_its_batch_after_a_burst(db, history, idle_first):
    """A burst of 20,000 tasks into a table PostgreSQL analyzed while it was empty (a new
    install; the VACUUM ANALYZE before a burst) or while all its rows were finished (a long
    history: `queued` is then not among the status column's common values, and autovacuum
    waits for a tenth of the table to change). With those statistics the planner took the
    all-queues claim as a bitmap scan of every queued row plus a sort, reading 20,000 rows
    for each claim of 100. The claims, sent as the worker sends them (autocommit), must
    read about their batch, whatever the statistics say; also on the connection of a worker
    that was claiming from the empty backlog just before (it had looked at the plan then)."""
    if history:
        _fill(db, history, "succeeded")
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE tasks")
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if idle_first:
            assert store.claim(conn, "burst", 100) == []
        _fill(db, 20_000, "queued")
        # the first claim of a burst fills its batch: the plan is looked at before the next
        for _ in range(2):
            store.claim(conn, "burst", 100)
        conn.exec_driver_sql("SELECT pg_stat_force_next_flush()")
        conn.exec_driver_sql("SELECT 1")
        before = _rows_fetched(db)
        claimed = store.claim(conn, "burst", 100)
        conn.exec_driver_sql("SELECT pg_stat_force_next_flush()")
        conn.exec_driver_sql("SELECT 1")  # idle again: the forced flush happens
        sort = conn.exec_driver_sql("SHOW enable_sort").scalar()
    after = _rows_fetched(db)
    print(f"BURSTCLAIM history={history} fetched={after - before}")
    assert len(claimed) == 100
    assert [r.priority for r in claimed] == sorted(r.priority for r in claimed)
    assert after - before < 1_000  # the batch and the rows it updated, not the 20,000
    assert sort == "on"  # the setting ended with the claim's own transaction
