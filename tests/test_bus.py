"""The event bus: applications in separate processes and modules, sharing only the database.

tests/bus_app_a.py publishes, tests/bus_app_b.py and tests/bus_app_c.py subscribe; each runs
in its own process with its own DBQUEUE_APP_KEY, as separate deployments would. The in-process
tests register handlers defined here into a fresh registry (the `app` fixture).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event, orm

import dbqueue
from dbqueue import bus, store

RECEIVED: list[dict[str, Any]] = []


def got_user(attributes: dict[str, Any]) -> str:
    RECEIVED.append({"handler": "got_user", **attributes})
    return f"hello {attributes.get('first_name')}"


def got_any(attributes: dict[str, Any]) -> None:
    RECEIVED.append({"handler": "got_any", **attributes})


def broken(attributes: dict[str, Any]) -> None:
    raise RuntimeError("subscriber bug")


async def got_async(attributes: dict[str, Any]) -> list[str]:
    return sorted(attributes)


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> bus._State:
    """A fresh in-process registry for the application `app_t`."""
    monkeypatch.delenv("DBQUEUE_APP_KEY", raising=False)
    monkeypatch.delenv("DBQUEUE_BUS_INLINE", raising=False)
    state = bus._State(app_key="app_t")
    monkeypatch.setattr(bus, "_state", state)
    RECEIVED.clear()
    return state


def run(db, *args: str, app_key: str | None = None, effects: Path | None = None, **env: str):
    """`python ARGS` as a separate application process against the test database."""
    full_env = db.env
    full_env.pop("DBQUEUE_APP_KEY", None)
    full_env.pop("BUS_APP_C_LEGACY", None)
    if app_key:
        full_env["DBQUEUE_APP_KEY"] = app_key
    if effects:
        full_env["BUS_EFFECTS_FILE"] = str(effects)
    full_env.update(env)
    return subprocess.run(
        [sys.executable, *args],
        env=full_env,
        cwd=db.tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )


def subscription_rows(db) -> list[tuple[str, str, str, bool, str]]:
    return [
        (r.app_key, r.queue, r.matcher, bool(r.is_regex), r.handler)
        for r in db.rows("SELECT * FROM bus_subscriptions ORDER BY app_key, matcher, handler")
    ]


@pytest.mark.slow
def test_applications_in_separate_processes(db):
    effects = db.tmp_path / "effects.jsonl"
    dq = ("-m", "dbqueue")
    # B stores its subscriptions with `bus sync`; C (before a deploy) too.
    out = run(db, *dq, "bus", "sync", "--import", "tests.bus_app_b", app_key="app_b")
    assert out.returncode == 0, out.stderr
    assert "app_b: 3 subscription(s)" in out.stdout
    out = run(
        db, *dq, "bus", "sync", "-i", "tests.bus_app_c", app_key="app_c", BUS_APP_C_LEGACY="1"
    )
    assert out.returncode == 0, out.stderr
    assert [r[2] for r in subscription_rows(db) if r[0] == "app_c"] == [
        "user_archived",
        "user_created",
    ]
    # C's new version drops on_user_archived; its worker syncs at start (nothing to run yet).
    out = run(db, *dq, "workoff", "-i", "tests.bus_app_c", "-q", "app_c_default", app_key="app_c")
    assert out.returncode == 0, out.stderr
    assert subscription_rows(db) == [
        ("app_b", "app_b_default", "^user_", True, "tests.bus_app_b:on_any_user_event"),
        ("app_b", "app_b_default", "user_created", False, "tests.bus_app_b:on_user_created"),
        ("app_b", "app_b_critical", "user_paid", False, "tests.bus_app_b:on_user_paid"),
        ("app_c", "app_c_default", "user_created", False, "tests.bus_app_c:on_user_created"),
    ]

    # A publishes; it never imports B's or C's code.
    out = run(db, "-m", "tests.bus_app_a", app_key="app_a")
    assert out.returncode == 0, out.stderr
    ids = json.loads(out.stdout)
    assert len(ids["user_created"]) == 3  # B by name, B by regex, C
    assert len(ids["user_paid"]) == 2  # B on its critical queue, B by regex
    assert len(ids["user_deleted"]) == 1  # B by regex, but in a transaction that rolled back
    assert len(ids["user_archived"]) == 1  # C's removed handler gets nothing
    assert ids["nobody_cares"] == []
    assert ids["_tasks_after"] == [6]
    assert db.scalar("SELECT count(*) FROM tasks") == 6
    assert db.scalar("SELECT count(DISTINCT handler) FROM tasks") == 1
    queues = {
        r.queue: r.n for r in db.rows("SELECT queue, count(*) AS n FROM tasks GROUP BY queue")
    }
    assert queues == {"app_b_default": 4, "app_b_critical": 1, "app_c_default": 1}

    # Each application's worker runs its own queues; C's failing handler does not touch B.
    out_c = run(
        db,
        *dq,
        "workoff",
        "-i",
        "tests.bus_app_c",
        "-q",
        "app_c_default",
        app_key="app_c",
        effects=effects,
    )
    out_b = run(
        db,
        *dq,
        "workoff",
        "-i",
        "tests.bus_app_b",
        "-q",
        "app_b_default",
        "-q",
        "app_b_critical",
        app_key="app_b",
        effects=effects,
    )
    assert out_c.returncode == 1, out_c.stdout + out_c.stderr  # a task raised and will retry
    assert out_b.returncode == 0, out_b.stdout + out_b.stderr
    assert "5 succeeded, 0 retried, 0 failed" in out_b.stdout

    c_task = db.rows("SELECT status, attempts, error FROM tasks WHERE queue = 'app_c_default'")[0]
    assert (c_task.status, c_task.attempts) == ("queued", 1)
    assert "RuntimeError: app c is broken" in c_task.error
    assert (
        db.scalar("SELECT count(*) FROM tasks WHERE queue LIKE 'app_b%' AND status = 'succeeded'")
        == 5
    )
    task = dbqueue.Task.get(ids["user_created"][0])
    assert task.result == "welcomed John"

    deliveries = [json.loads(line) for line in effects.read_text().splitlines()]
    got = sorted((d["app"], d["handler"], d["bus_event_type"]) for d in deliveries)
    assert got == [
        ("app_b", "on_any_user_event", "user_archived"),
        ("app_b", "on_any_user_event", "user_created"),
        ("app_b", "on_any_user_event", "user_paid"),
        ("app_b", "on_user_created", "user_created"),
        ("app_b", "on_user_paid", "user_paid"),
        ("app_c", "on_user_created", "user_created"),
    ]
    created = next(
        d for d in deliveries if d["handler"] == "on_user_created" and d["app"] == "app_b"
    )
    assert {k: created[k] for k in ("id", "first_name", "bus_event_type", "bus_app_key")} == {
        "id": 42,
        "first_name": "John",
        "bus_event_type": "user_created",
        "bus_app_key": "app_a",
    }
    published = dt.datetime.fromisoformat(created["bus_published_at"])
    assert published.tzinfo is not None
    assert published <= task.created_at  # the database clock, read before the insert
    archived = next(d for d in deliveries if d["bus_event_type"] == "user_archived")
    assert archived["tags"] == ["a", "b"]  # JSON-decoded: the tuple arrives as a list

    out = run(db, *dq, "bus", "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("app_b: 3 subscription(s), synced ")
    pattern = r"\s+/\^user_/\s+app_b_default\s+tests\.bus_app_b:on_any_user_event$"
    assert any(re.match(pattern, line) for line in lines[1:4]), lines
    assert any(line.startswith("app_c: 1 subscription(s)") for line in lines)


def test_sync_replaces_the_apps_rows_only(db, app):
    bus.subscribe("user_created")(got_user)
    bus.subscribe(re.compile(r"^user_", re.IGNORECASE))(got_any)
    first = bus.sync()
    assert (first.added, first.removed, first.total) == (2, 0, 2)
    app.app_key = "other_app"
    bus.sync()
    app.app_key = "app_t"
    app.registry[:] = [
        bus.Subscription("user_created", False, "mail", got_user.__module__ + ":got_user")
    ]
    second = bus.sync()
    assert (second.added, second.removed, second.total) == (0, 1, 1)
    assert subscription_rows(db) == [
        ("app_t", "app_t_mail", "user_created", False, "tests.test_bus:got_user"),
        ("other_app", "other_app_default", "(?i)^user_", True, "tests.test_bus:got_any"),
        ("other_app", "other_app_default", "user_created", False, "tests.test_bus:got_user"),
    ]
    app.registry.clear()
    assert bus.sync().removed == 1
    assert [r[0] for r in subscription_rows(db)] == ["other_app", "other_app"]


def test_concurrent_syncs_of_one_app_converge(db, app):
    bus.subscribe("user_created")(got_user)
    bus.subscribe("user_paid", queue="critical")(got_any)
    errors: list[BaseException] = []

    def sync() -> None:
        try:
            bus.sync()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sync) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(subscription_rows(db)) == 2


@pytest.mark.skip_locked  # SQLite serialises every writer anyway
def test_a_sync_waits_while_another_sync_of_the_same_app_holds_its_lock(db, app):
    """Syncs of one application run one after the other (the last one's subscriptions win, and
    two stale-row deletes never deadlock): PostgreSQL's advisory lock, MySQL's GET_LOCK."""
    bus.subscribe("user_created")(got_user)
    name = "dbqueue.bus:app_t"
    with db.engine.connect() as holder:
        if db.kind == "postgresql":
            holder.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(name))))
        else:
            assert holder.execute(sa.select(sa.func.get_lock(name, 5))).scalar() == 1
        syncing = threading.Thread(target=bus.sync)
        syncing.start()
        syncing.join(1.5)
        waited = syncing.is_alive()
        rows_meanwhile = subscription_rows(db)
        if db.kind == "postgresql":
            holder.rollback()
        else:
            holder.execute(sa.select(sa.func.release_lock(name)))
    syncing.join(30)
    assert waited and rows_meanwhile == []
    assert [r[2] for r in subscription_rows(db)] == ["user_created"]


def test_regex_flags_are_stored_and_matched(db, app):
    bus.subscribe(re.compile(r"^user_", re.IGNORECASE))(got_any)
    bus.sync()
    assert subscription_rows(db)[0][2] == "(?i)^user_"
    assert len(bus.publish("USER_created", {})) == 1
    assert bus.publish("admin_user_created", {}) == []  # re.search, but anchored by ^


def test_name_and_regex_both_run_and_one_handler_gets_an_event_once(db, app):
    bus.subscribe("user_created")(got_user)
    bus.subscribe(re.compile("created$"))(got_any)
    bus.subscribe(re.compile("^user"))(got_any)
    bus.sync()
    ids = bus.publish("user_created", {"id": 1})
    assert len(ids) == 2
    assert {dbqueue.Task.get(i).queue for i in ids} == {"app_t_default"}


def test_rollback_delivers_nothing_commit_delivers(db, app):
    bus.subscribe("user_created")(got_user)
    bus.sync()
    with db.engine.connect() as conn:
        tx = conn.begin()
        assert len(bus.publish("user_created", {"id": 1}, connection=conn)) == 1
        tx.rollback()
    assert db.scalar("SELECT count(*) FROM tasks") == 0
    with orm.Session(db.engine) as session:
        bus.publish("user_created", {"id": 2}, session=session)
        session.rollback()
        assert db.scalar("SELECT count(*) FROM tasks") == 0
        bus.publish("user_created", {"id": 3}, session=session)
        session.commit()
    assert db.scalar("SELECT count(*) FROM tasks") == 1


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"id": 1, "created_at": dt.datetime(2026, 1, 1)}, "attribute 'created_at' is a datetime"),
        ({"user": {"tags": ["a", {1, 2}]}}, "attribute 'user'['tags'][1] is a set"),
        ({"score": float("nan")}, "attribute 'score' is nan"),
        ({"raw": b"\x00"}, "attribute 'raw' is a bytes"),
        ({1: "one"}, "attribute key 1 is not a string"),
        ({"user": {2: "x"}}, "attribute 'user' has a key 2 that is not a string"),
        ({"bus_app_key": "forged"}, "attribute 'bus_app_key' is reserved"),
        (["not", "a", "dict"], "attributes must be a dict, not list"),
    ],
)
def test_non_json_attributes_are_refused_naming_the_key(db, app, attributes, message):
    bus.subscribe("user_created")(got_user)
    bus.sync()
    with db.engine.connect() as conn:
        with conn.begin():
            with pytest.raises(bus.PublishError, match=re.escape(message)) as info:
                bus.publish("user_created", attributes, connection=conn)
            assert "bus.publish('user_created')" in str(info.value)
            # the caller's transaction is still usable
            dbqueue.enqueue(got_user, ({},), connection=conn)
    assert db.scalar("SELECT count(*) FROM tasks") == 1
    assert isinstance(info.value, dbqueue.EnqueueError)


@pytest.mark.parametrize("event_type", ["", None, 42])
def test_bad_event_type_is_refused(db, app, event_type):
    with pytest.raises(bus.PublishError, match="event type must be a non-empty string"):
        bus.publish(event_type, {})


def test_event_nobody_subscribes_to_is_one_read_and_no_insert(db, app):
    bus.subscribe("user_created")(got_user)
    bus.sync()
    statements: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement.strip().split()[0].upper())

    event.listen(db.engine, "before_cursor_execute", seen)
    try:
        assert bus.publish("nobody_cares", {"id": 1}) == []
    finally:
        event.remove(db.engine, "before_cursor_execute", seen)
    assert [s for s in statements if s != "BEGIN"] == ["SELECT"]
    assert db.scalar("SELECT count(*) FROM tasks") == 0


def test_publish_at_delays_delivery(db, app):
    bus.subscribe("report_due")(got_any)
    bus.sync()
    (later,) = bus.publish_at(dt.timedelta(hours=1), "report_due", {"n": 1})
    when = dt.datetime(2030, 5, 1, 12, tzinfo=dt.timezone.utc)
    (fixed,) = bus.publish_at(when, "report_due", {"n": 2})
    task = dbqueue.Task.get(later)
    assert 3590 <= (task.run_at - task.created_at).total_seconds() <= 3610
    assert dbqueue.Task.get(fixed).run_at == when
    with db.engine.begin() as conn:
        assert store.ready_count(conn, ["app_t_default"]) == 0


def test_inline_runs_in_process_subscribers_at_once(db, app):
    bus.subscribe("user_created")(got_user)
    bus.subscribe(re.compile("^user_"))(broken)
    bus.subscribe("other")(got_any)
    # nothing synced: inline mode reads the code's subscriptions, not the table
    with bus.inline():
        ids = bus.publish("user_created", {"first_name": "John"})
    assert [(r["handler"], r["first_name"], r["bus_app_key"]) for r in RECEIVED] == [
        ("got_user", "John", "app_t")
    ]
    ok, failing = (dbqueue.Task.get(i) for i in ids)
    assert (ok.status, ok.result, ok.queue) == (
        dbqueue.Status.SUCCEEDED,
        "hello John",
        "app_t_default",
    )
    assert failing.status is dbqueue.Status.QUEUED and "subscriber bug" in failing.error
    assert bus.publish("user_created", {"first_name": "Jane"}) == []  # inline ended; none synced
    assert len(RECEIVED) == 1


def test_async_handler_is_awaited_and_its_result_stored(db, app):
    bus.subscribe("user_created")(got_async)
    with bus.inline():
        (task_id,) = bus.publish("user_created", {"id": 1})
    task = dbqueue.Task.get(task_id)
    assert task.status is dbqueue.Status.SUCCEEDED
    assert task.result == ["bus_app_key", "bus_event_type", "bus_published_at", "id"]


def test_inline_publisher_without_subscribers_needs_no_app_key(db, app):
    app.app_key = None
    with bus.inline():
        assert bus.publish("user_created", {"id": 1}) == []
        bus.subscribe("user_created")(got_user)
        with pytest.raises(dbqueue.ConfigurationError, match="bus inline mode needs an app"):
            bus.publish("user_created", {"id": 1})


def test_inline_from_environment(db, app, monkeypatch):
    bus.subscribe("user_created")(got_user)
    monkeypatch.setenv("DBQUEUE_BUS_INLINE", "1")
    bus.publish("user_created", {"first_name": "Env"})
    assert [r["first_name"] for r in RECEIVED] == ["Env"]


def test_handler_outside_allow_list_fails_without_retry(db, app):
    bus.subscribe("user_created")(got_user)
    db.settings.allowed_modules = ("dbqueue",)
    with bus.inline():
        (task_id,) = bus.publish("user_created", {})
    task = dbqueue.Task.get(task_id)
    assert task.status is dbqueue.Status.FAILED
    assert "bus handler tests.test_bus:got_user is not allowed" in task.error
    assert RECEIVED == []


def test_subscribe_refuses_bad_input(app):
    with pytest.raises(dbqueue.ConfigurationError, match="event name or a compiled regex"):
        bus.subscribe("")
    with pytest.raises(dbqueue.ConfigurationError, match="queue"):
        bus.subscribe("x", queue="no spaces")
    with pytest.raises(dbqueue.EnqueueError, match="lambda"):
        bus.subscribe("x")(lambda attributes: None)
    bus.subscribe("x", queue="a")(got_user)
    with pytest.raises(dbqueue.ConfigurationError, match="twice"):
        bus.subscribe("x", queue="b")(got_user)


def test_sync_without_app_key_is_one_clear_line(db):
    out = run(db, "-m", "dbqueue", "bus", "sync", "--import", "tests.bus_app_b")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "dbqueue: error: bus.sync() needs an application key: set DBQUEUE_APP_KEY or call "
        "dbqueue.bus.configure(app_key='my_app')"
    ]
    assert db.scalar("SELECT count(*) FROM bus_subscriptions") == 0
    out = run(db, "-m", "dbqueue", "bus", "list")
    assert (out.returncode, out.stdout.strip()) == (
        0,
        "(no subscriptions: run `dbqueue bus sync --import APP_MODULE`)",
    )
