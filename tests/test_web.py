"""The dashboard: pages, CSRF-checked actions, access token, /metrics, `dbqueue web`, a browser.

Pages and actions are driven through Starlette's TestClient against the real app on the real
database; `dbqueue web` runs as a real process for the access and browser tests.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client import parser
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

import dbqueue
from dbqueue import database, serializer, store
from dbqueue.schema import counter_deltas, db_now, tasks
from dbqueue.web import create_app, history, queries
from tests import jobs
from tests.conftest import ROOT

CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')
CHROMIUM = os.environ.get("DBQUEUE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# -- helpers ---------------------------------------------------------------------------------


def failed_task(message: str = "boom", queue: str = "default") -> dbqueue.Task:
    """A task that really ran and failed for good (inline: a worker's code path, in process)."""
    with dbqueue.inline():
        task = dbqueue.enqueue(jobs.raise_value_error, (message,), queue=queue, max_attempts=1)
    assert task.refresh().status is dbqueue.Status.FAILED
    return task


def succeeded_task(a: int = 1, b: int = 2, queue: str = "default") -> dbqueue.Task:
    with dbqueue.inline():
        task = dbqueue.enqueue(jobs.add, (a, b), queue=queue)
    assert task.refresh().status is dbqueue.Status.SUCCEEDED
    return task


def set_row(db, task_id: int, **values) -> None:
    """Put a row in any state (River's testfactory); `*_ago` values are seconds before now."""
    for column in ("run_at", "started_at", "finished_at", "locked_at"):
        ago = values.pop(f"{column}_ago", None)
        if ago is not None:
            values[column] = db_now(-float(ago))
    with db.engine.begin() as conn:
        conn.execute(sa.update(tasks).where(tasks.c.id == task_id).values(**values))


def csrf_of(client: TestClient, path: str = "/") -> str:
    match = CSRF.search(client.get(path).text)
    assert match, f"no CSRF token on {path}"
    return match.group(1)


def snapshot(db) -> list[tuple]:
    return [tuple(r) for r in db.rows("SELECT id, status, attempts, queue FROM tasks ORDER BY id")]


def row_cells(html: str, first_cell: str) -> list[str]:
    """The text of each cell of the table row whose first cell is `first_cell`."""
    for row in re.findall(r"<tr(?: [^>]*)?>(.*?)</tr>", html, re.S):
        cells = [
            re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        ]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row for {first_cell!r}")


@pytest.fixture
def client(db) -> Iterator[TestClient]:
    with TestClient(create_app(db.settings)) as c:
        yield c


# -- pages -----------------------------------------------------------------------------------


def test_overview_counts_each_state_per_queue(db, client):
    ready = dbqueue.enqueue(jobs.noop, queue="mail")
    set_row(db, ready.id, run_at_ago=120)
    dbqueue.enqueue(jobs.noop, queue="mail")
    dbqueue.enqueue(jobs.noop, queue="mail", run_at=dt.timedelta(hours=1))
    running = dbqueue.enqueue(jobs.noop, queue="mail")
    set_row(db, running.id, status="running", locked_by="w1", started_at_ago=1)
    failed_task(queue="mail")
    succeeded_task(queue="mail")
    old = succeeded_task(queue="mail")
    set_row(db, old.id, finished_at_ago=3600)
    cancelled = dbqueue.enqueue(jobs.noop, queue="mail")
    with db.engine.begin() as conn:
        store.cancel(conn, [cancelled.id])
    succeeded_task(queue="other")

    with db.engine.connect() as conn:
        summary = {q.queue: q for q in queries.overview(conn)}
    mail = summary["mail"]
    assert (mail.ready, mail.scheduled, mail.running) == (2, 1, 1)
    assert (mail.failed, mail.succeeded, mail.cancelled) == (1, 2, 1)
    assert mail.recent_finished == 2  # the failed one and one succeeded; not the old one
    assert 120 <= mail.oldest_ready_age < 3600
    assert summary["other"].succeeded == 1 and summary["other"].oldest_ready_age is None

    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["x-frame-options"] == "DENY"  # its buttons cannot be clickjacked
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    cells = row_cells(page.text, "mail")
    assert cells[1:7] == ["2", "1", "1", "1", "2", "1"]
    assert cells[7].startswith("2m")  # oldest waiting: 2 minutes and some seconds
    assert cells[8] == "0.4"  # 2 finished in the last 5 minutes


def test_tasks_list_filters_and_pages(db, client):
    ids = dbqueue.enqueue_many(jobs.add, [(i, i) for i in range(55)], queue="bulk")
    later = dbqueue.enqueue(jobs.noop, queue="bulk", run_at=dt.timedelta(hours=1))
    failed = failed_task(queue="bulk")

    first = client.get("/tasks?queue=bulk")
    second = client.get("/tasks?queue=bulk&page=2")
    shown = [int(i) for i in re.findall(r'<td class="num"><a href="/tasks/(\d+)">', first.text)]
    shown2 = [int(i) for i in re.findall(r'<td class="num"><a href="/tasks/(\d+)">', second.text)]
    assert len(shown) == 50 and len(shown2) == 7
    assert shown + shown2 == sorted([*ids, later.id, failed.id], reverse=True)
    assert "page 2 of 2 · 57 tasks" in second.text and 'rel="prev"' in second.text

    only_failed = client.get("/tasks?status=failed&queue=bulk").text
    assert re.findall(r'<a href="/tasks/(\d+)">\d+', only_failed) == [str(failed.id)]
    scheduled = client.get("/tasks?status=scheduled").text
    assert re.findall(r'<a href="/tasks/(\d+)">\d+', scheduled) == [str(later.id)]
    assert client.get("/tasks?status=finished").status_code == 400
    assert "unknown status &#39;finished&#39;" in client.get("/tasks?status=finished").text
    assert client.get("/tasks?page=0").status_code == 400
    assert client.get("/tasks?page=x").status_code == 400


def listed_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<td class="num"><a href="/tasks/(\d+)">', html)]


def test_tasks_searchable_by_handler_substring_and_by_id(db, client):
    adds = dbqueue.enqueue_many(jobs.add, [(1, 1), (2, 2)], queue="mail")
    noop = dbqueue.enqueue(jobs.noop, queue="mail")
    other_add = dbqueue.enqueue(jobs.add, (3, 3), queue="other")

    assert listed_ids(client.get("/tasks?q=jobs:ADD").text) == [other_add.id, *adds[::-1]]
    assert listed_ids(client.get("/tasks?q=add&queue=mail").text) == adds[::-1]
    assert listed_ids(client.get(f"/tasks?q={noop.id}").text) == [noop.id]
    assert listed_ids(client.get(f"/tasks?q=%23{noop.id}").text) == [noop.id]
    assert listed_ids(client.get(f"/tasks?q={noop.id}&queue=other").text) == []
    # % and _ are literal characters, not LIKE wildcards; a search matches no id by accident.
    assert listed_ids(client.get("/tasks?q=%25").text) == []
    assert listed_ids(client.get("/tasks?q=jobs_add").text) == []
    page = client.get("/tasks?q=%3Cscript%3Ex").text
    assert 'value="&lt;script&gt;x"' in page and "<script>x" not in page
    assert client.get("/tasks?q=" + "x" * 201).status_code == 400
    # Paging keeps the search.
    dbqueue.enqueue_many(jobs.noop, [()] * 60, queue="mail")
    assert 'href="?q=noop&amp;page=2"' in client.get("/tasks?q=noop").text


def test_bulk_retry_of_a_filtered_list_confirms_then_acts_on_what_it_counted(db, client):
    failed = [failed_task(queue="mail").id for _ in range(3)]
    cancelled = dbqueue.enqueue(jobs.noop, queue="mail")
    with db.engine.begin() as conn:
        store.cancel(conn, [cancelled.id])
    elsewhere = failed_task(queue="other")
    succeeded_task(queue="mail")
    token = csrf_of(client, "/tasks?queue=mail")
    assert 'action="/tasks/bulk/retry"' in client.get("/tasks?queue=mail").text
    before = snapshot(db)

    assert client.post("/tasks/bulk/retry", data={"queue": "mail"}).status_code == 403
    confirm = client.post("/tasks/bulk/retry", data={"csrf_token": token, "queue": "mail"})
    assert confirm.status_code == 200 and snapshot(db) == before  # only counted
    assert "4 failed or cancelled tasks will be queued again" in confirm.text
    assert "Retry 4 tasks</button>" in confirm.text
    up_to = re.search(r'name="up_to" value="(\d+)"', confirm.text).group(1)
    assert int(up_to) == cancelled.id

    late = failed_task(queue="mail")  # failed after the confirmation page: not swept in
    fields = {"queue": "mail", "up_to": up_to}
    assert client.post("/tasks/bulk/retry", data=fields).status_code == 403
    assert snapshot(db)[:-1] == before
    reply = client.post(
        "/tasks/bulk/retry", data={"csrf_token": token, **fields}, follow_redirects=False
    )
    assert reply.status_code == 303
    assert reply.headers["location"] == "/tasks?queue=mail&done=bulk-retried&n=4"
    assert (
        "4 matching failed or cancelled task(s) queued again."
        in client.get(reply.headers["location"]).text
    )
    ids = [*failed, cancelled.id]
    assert (
        db.rows(f"SELECT status, attempts FROM tasks WHERE id IN {tuple(ids)}")
        == [("queued", 0)] * 4
    )
    assert late.refresh().status is dbqueue.Status.FAILED
    assert elsewhere.refresh().status is dbqueue.Status.FAILED

    nothing = client.post(
        "/tasks/bulk/retry", data={"csrf_token": token, "queue": "mail", "status": "succeeded"}
    )
    assert "nothing to retry" in nothing.text and "up_to" not in nothing.text
    assert client.post("/tasks/bulk/purge", data={"csrf_token": token}).status_code == 404


def test_bulk_cancel_of_a_search_cancels_queued_and_asks_running(db, client):
    queued = dbqueue.enqueue_many(jobs.noop, [()] * 3, queue="q")
    running = dbqueue.enqueue(jobs.noop, queue="q")
    set_row(db, running.id, status="running", locked_by="w1", started_at_ago=1)
    other = dbqueue.enqueue(jobs.add, (1, 2), queue="q")
    token = csrf_of(client)
    confirm = client.post("/tasks/bulk/cancel", data={"csrf_token": token, "q": "noop"})
    assert "4 queued or running tasks will be cancelled" in confirm.text
    up_to = re.search(r'name="up_to" value="(\d+)"', confirm.text).group(1)
    reply = client.post(
        "/tasks/bulk/cancel", data={"csrf_token": token, "q": "noop", "up_to": up_to}
    )
    assert "3 matching queued task(s) cancelled; 1 running task(s) asked to stop" in reply.text
    assert db.rows(f"SELECT DISTINCT status FROM tasks WHERE id IN {tuple(queued)}") == [
        ("cancelled",)
    ]
    assert running.refresh().status is dbqueue.Status.RUNNING
    assert db.scalar("SELECT cancel_requested_at FROM tasks WHERE id = :i", i=running.id)
    assert other.refresh().status is dbqueue.Status.QUEUED
    # The count in the message is a number read from the URL, never text from it.
    shown = client.get("/tasks?done=bulk-cancelled&n=<b>&m=7").text
    assert "0 matching queued task(s) cancelled; 7 running" in shown and "<b>" not in shown


def finished_rows(db, queue: str, status: str, *seconds_ago: float) -> None:
    """Finished tasks inserted directly, finished_at `seconds_ago` before the database's now."""
    with db.engine.begin() as conn:
        for ago in seconds_ago:
            conn.execute(
                sa.insert(tasks).values(
                    queue=queue,
                    status=status,
                    handler="tests.jobs:noop",
                    payload=b"x",
                    run_at=db_now(-ago - 1),
                    created_at=db_now(-ago - 1),
                    started_at=db_now(-ago - 0.5),
                    finished_at=db_now(-ago),
                )
            )


def chart_bars(html: str, queue: str) -> dict[str, tuple[int, int]]:
    """The non-empty bars of one queue's chart: 'HH:MM' -> (succeeded, failed)."""
    figure = re.search(rf"<figcaption><strong>{re.escape(queue)}</strong>.*?</figure>", html, re.S)
    assert figure, f"no chart for {queue!r}"
    bars = re.findall(r"<title>(\d\d:\d\d) UTC: (\d+) succeeded, (\d+) failed</title>", figure[0])
    return {t: (int(ok), int(bad)) for t, ok, bad in bars if (ok, bad) != ("0", "0")}


def expected_bars(db, queue: str, step: int, window: int) -> dict[str, tuple[int, int]]:
    """What the chart must show: the stored finished_at of the rows of the last `window`
    seconds (the rows are far from the window's edge), floored to `step`."""
    with db.engine.connect() as conn:
        since = queries.now(conn) - dt.timedelta(seconds=window)
    counts: dict[str, list[int]] = {}
    for status, finished in db.rows(
        "SELECT status, finished_at FROM tasks WHERE queue = :q AND finished_at IS NOT NULL",
        q=queue,
    ):
        if isinstance(finished, str):  # SQLite's text
            finished = dt.datetime.fromisoformat(finished)
        if finished.tzinfo is None:  # SQLite's text, MySQL's DATETIME: UTC
            finished = finished.replace(tzinfo=dt.timezone.utc)
        if status == "cancelled" or finished < since:
            continue
        floor = int(finished.timestamp()) // step * step
        key = dt.datetime.fromtimestamp(floor, dt.timezone.utc).strftime("%H:%M")
        counts.setdefault(key, [0, 0])[status == "failed"] += 1
    return {k: (v[0], v[1]) for k, v in counts.items()}


def test_throughput_chart_counts_the_rows_by_finished_at(db, client):
    finished_rows(db, "mail", "succeeded", 30, 31, 32, 300, 300.5, 1800, 3000)
    finished_rows(db, "mail", "failed", 33, 1800.2)
    finished_rows(db, "mail", "cancelled", 40)  # not a throughput figure
    finished_rows(db, "mail", "succeeded", 2 * 3600, 2 * 3600 + 10)  # the day's chart only
    finished_rows(db, "mail", "failed", 23 * 3600)
    finished_rows(db, "mail", "succeeded", 25 * 3600)  # in neither chart
    finished_rows(db, "<i>sms</i>", "failed", 120)
    dbqueue.enqueue(jobs.noop, queue="idle")  # nothing finished: no chart

    page = client.get("/").text
    assert "Finished tasks per minute, last hour" in page
    hour = chart_bars(page, "mail")
    assert hour == expected_bars(db, "mail", 60, 3600)
    assert sum(ok for ok, _ in hour.values()) == 7 and sum(bad for _, bad in hour.values()) == 2
    assert page.count('<rect class="hover"') == 2 * 60  # a bar per minute: mail, sms
    assert chart_bars(page, "&lt;i&gt;sms&lt;/i&gt;") and "<i>sms</i>" not in page
    assert "<figcaption><strong>idle</strong>" not in page

    day_page = client.get("/?chart=day").text
    assert "Finished tasks per 15 minutes, last 24 hours" in day_page
    day = chart_bars(day_page, "mail")
    assert sum(ok for ok, _ in day.values()) == 9 and sum(bad for _, bad in day.values()) == 3
    assert day == expected_bars(db, "mail", 900, 24 * 3600)
    assert client.get("/?chart=week").status_code == 400

    with db.engine.connect() as conn:
        data = queries.throughput(conn, 60, 60)
    assert sum(data.succeeded["mail"]) == 7 and sum(data.failed["mail"]) == 2
    assert data.start + dt.timedelta(minutes=60) > data.now >= data.start + dt.timedelta(minutes=59)


def test_chart_history_reads_only_the_buckets_still_filling(db):
    finished_rows(db, "mail", "succeeded", 600, 300)
    finished_rows(db, "mail", "failed", 240)
    kept = history.ThroughputHistory()
    with db.engine.connect() as conn:
        first = kept.read(conn, 60, 60)
        fresh = queries.throughput(conn, 60, 60)
    assert (first.succeeded, first.failed) == (fresh.succeeded, fresh.failed)
    assert sum(first.succeeded["mail"]) == 2 and sum(first.failed["mail"]) == 1

    finished_rows(db, "mail", "succeeded", 900)  # into a sealed bucket: not read again
    finished_rows(db, "mail", "failed", 0)  # the current bucket is read at every view
    with db.engine.connect() as conn:
        second = kept.read(conn, 60, 60)
        fresh = queries.throughput(conn, 60, 60)
    assert sum(second.succeeded["mail"]) == 2 and sum(second.failed["mail"]) == 2
    assert sum(fresh.succeeded["mail"]) == 3  # a dashboard started now sees it
    with db.engine.connect() as conn:
        day = kept.read(conn, 900, 96)  # each bucket size is kept apart
    assert sum(day.succeeded["mail"]) == 3 and sum(day.failed["mail"]) == 2


def test_auto_refresh_script_is_allowed_by_its_hash_and_switched_off_by_a_cookie(db, client):
    import base64
    import hashlib

    dbqueue.enqueue(jobs.noop, queue="mail")
    page = client.get("/")
    script = re.search(r"<script>(.*?)</script>", page.text, re.S)
    assert script and "window.location.reload()" in script[1]
    digest = base64.b64encode(hashlib.sha256(script[1].encode()).digest()).decode()
    policy = page.headers["content-security-policy"]
    assert f"script-src 'sha256-{digest}';" in policy  # this script, and no other, may run
    assert 'href="?refresh=off"' in page.text and "Auto-refresh on" in page.text

    off = client.get("/tasks?queue=mail&refresh=off")
    assert "<script>" not in off.text and 'href="?queue=mail&amp;refresh=on"' in off.text
    assert "dbqueue_refresh=off" in off.headers["set-cookie"]
    assert "<script>" not in client.get("/workers").text  # remembered
    assert "<script>" in client.get("/?refresh=on").text
    assert "<script>" in client.get("/workers").text
    # Pages that are forms or messages never reload under the operator.
    token = csrf_of(client)
    confirm = client.post("/tasks/bulk/retry", data={"csrf_token": token})
    assert "<script>" not in confirm.text and 'class="refresh-toggle"' not in confirm.text
    assert "<script>" not in client.get("/tasks/999999").text


def test_task_page_shows_arguments_result_and_traceback_escaped(db, client):
    task = failed_task("<script>alert(1)</script>")
    page = client.get(f"/tasks/{task.id}").text
    assert "tests.jobs:raise_value_error" in page
    assert "(&#39;&lt;script&gt;alert(1)&lt;/script&gt;&#39;,)" in page
    assert "<script>alert" not in page
    assert "Traceback (most recent call last)" in page
    assert "ValueError: &lt;script&gt;" in page
    assert "1 of 1" in page  # attempts

    done = succeeded_task(20, 22)
    assert "<code>42</code>" in client.get(f"/tasks/{done.id}").text

    big = dbqueue.enqueue(jobs.echo, ("x" * 100_000,), {"key": list(range(1000))})
    page = client.get(f"/tasks/{big.id}").text
    assert len(page) < 20_000 and "..." in page and "&#39;key&#39;" in page

    assert client.get("/tasks/999999").status_code == 404


class _Touch:
    """Unpickling this creates a file: proof that a payload was (or was not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_unverified_payload_and_result_are_never_unpickled(db, client, tmp_path):
    marker = tmp_path / "unpickled"
    task = succeeded_task()
    forged = serializer.Keyring(b"k" * 40)  # a key this dashboard does not have
    evil = pickle.dumps((("func",), (_Touch(str(marker)),), {}))
    set_row(
        db,
        task.id,
        payload=serializer.sign(forged, "payload", task.handler, evil),
        result=serializer.sign(forged, "result", task.handler, pickle.dumps(_Touch(str(marker)))),
    )
    page = client.get(f"/tasks/{task.id}").text
    assert page.count("signature did not verify") == 3  # args, kwargs, result
    assert not marker.exists()

    # The right key over a different handler does not verify either (the MAC covers it).
    good = serializer.Keyring(db.settings.keyring().current)
    set_row(db, task.id, payload=serializer.sign(good, "payload", "tests.jobs:noop", evil))
    assert "signature did not verify" in client.get(f"/tasks/{task.id}").text
    assert not marker.exists()


def test_workers_counters_and_bus_pages(db, client):
    synced = subprocess.run(
        [sys.executable, "-m", "dbqueue", "bus", "sync", "--import", "tests.bus_app_b"],
        env={**db.env, "DBQUEUE_APP_KEY": "app_b"},
        cwd=db.tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert synced.returncode == 0, synced.stderr
    with db.engine.begin() as conn:
        store.register_worker(conn, "host:1:abc", "host", 1, ["mail", "default"])
        store.register_worker(conn, "host:2:def", "host", 2, None)
        conn.execute(
            sa.text("UPDATE workers SET heartbeat_at = :t WHERE name = 'host:2:def'"),
            {"t": dt.datetime(2020, 1, 1)},
        )
        conn.execute(
            sa.insert(counter_deltas).values(created_at=db_now()),
            [
                {"table_name": "posts", "row_id": "7", "column_name": "comments_count", "delta": d}
                for d in (1, 1, 1, -1)
            ],
        )
    running = dbqueue.enqueue(jobs.noop)
    set_row(db, running.id, status="running", locked_by="host:1:abc")

    workers = client.get("/workers").text
    cells = row_cells(workers, "host:1:abc")
    assert cells[1:5] == ["host", "1", "mail,default", "1"] and " ago" in cells[6]
    silent = row_cells(workers, "host:2:def")
    assert silent[3] == "all" and silent[6].endswith("ago (stale)")
    assert row_cells(client.get("/counters").text, "posts")[1:5] == [
        "7",
        "comments_count",
        "2",
        "4",
    ]
    bus = client.get("/bus").text
    assert "<h2>app_b</h2>" in bus
    assert row_cells(bus, "user_paid")[1:3] == ["tests.bus_app_b:on_user_paid", "app_b_critical"]
    assert row_cells(bus, "/^user_/")[1:3] == ["tests.bus_app_b:on_any_user_event", "app_b_default"]


def test_a_database_without_the_schema_gives_a_readable_503(db, client):
    database.downgrade(db.settings, "base")
    page = client.get("/")
    assert page.status_code == 503
    assert "no dbqueue tables" in page.text and "dbqueue migrate" in page.text


# -- actions ---------------------------------------------------------------------------------


def test_actions_change_state_with_a_valid_csrf_token(db, client):
    failed = failed_task(queue="q1")
    queued = dbqueue.enqueue(jobs.noop, queue="q1")
    doomed = succeeded_task(queue="q1")
    token = csrf_of(client)

    reply = client.post(
        f"/tasks/{failed.id}/retry", data={"csrf_token": token}, follow_redirects=False
    )
    assert (
        reply.status_code == 303 and reply.headers["location"] == f"/tasks/{failed.id}?done=retried"
    )
    assert failed.refresh().status is dbqueue.Status.QUEUED and failed.attempts == 0
    assert "Task queued again." in client.get(reply.headers["location"]).text

    client.post(f"/tasks/{queued.id}/cancel", data={"csrf_token": token})
    assert queued.refresh().status is dbqueue.Status.CANCELLED
    client.post(f"/tasks/{doomed.id}/delete", data={"csrf_token": token})
    assert db.scalar("SELECT count(*) FROM tasks WHERE id = :i", i=doomed.id) == 0

    # A second cancel of a cancelled task changes nothing and says so.
    again = client.post(f"/tasks/{queued.id}/cancel", data={"csrf_token": token})
    assert "Nothing changed" in again.text

    more = [failed_task(queue="q2").id for _ in range(3)]
    keep = failed_task(queue="q3")
    client.post("/queues/retry-failed", data={"csrf_token": token, "queue": "q2"})
    assert (
        db.scalar(f"SELECT count(*) FROM tasks WHERE status = 'queued' AND id IN {tuple(more)}")
        == 3
    )
    assert keep.refresh().status is dbqueue.Status.FAILED

    client.post("/queues/clear", data={"csrf_token": token, "queue": "q2"})
    assert db.scalar("SELECT count(*) FROM tasks WHERE queue = 'q2'") == 0
    assert db.scalar("SELECT count(*) FROM tasks WHERE queue = 'q1'") == 2  # not its queue


def test_posts_without_a_valid_csrf_token_are_refused_and_change_nothing(db, client):
    failed = failed_task(queue="q")
    queued = dbqueue.enqueue(jobs.noop, queue="q")
    done = succeeded_task(queue="q")
    token = csrf_of(client)
    before = snapshot(db)
    posts = [
        (f"/tasks/{failed.id}/retry", {}),
        (f"/tasks/{queued.id}/cancel", {}),
        (f"/tasks/{done.id}/delete", {}),
        ("/queues/retry-failed", {"queue": "q"}),
        ("/queues/clear", {"queue": "q"}),
        ("/queues/pause", {"queue": "q"}),
        ("/queues/resume", {"queue": "q"}),
    ]
    altered = ("e" if token[0] == "f" else "f") + token[1:]
    other_app = create_app(db.settings)
    with TestClient(other_app) as stranger, TestClient(other_app) as cookieless:
        stranger.get("/")  # another browser, with a CSRF cookie of its own
        for path, fields in posts:
            for bad in (None, "", "0" * 64, altered):
                data = fields if bad is None else {**fields, "csrf_token": bad}
                assert client.post(path, data=data).status_code == 403, (path, bad)
            # A valid token sent with another session's cookie, or with none (a cross-site
            # form post from a page that copied the token), is refused too.
            assert stranger.post(path, data={**fields, "csrf_token": token}).status_code == 403
            assert cookieless.post(path, data={**fields, "csrf_token": token}).status_code == 403
    assert snapshot(db) == before
    assert dbqueue.paused_queues() == set()


def test_pause_and_resume_buttons_mark_the_queue_fleet_wide(db, client):
    dbqueue.enqueue(jobs.noop, queue="mail")
    succeeded_task(queue="default")
    token = csrf_of(client)
    assert "paused" not in row_cells(client.get("/").text, "mail")[0]

    reply = client.post(
        "/queues/pause", data={"csrf_token": token, "queue": "mail"}, follow_redirects=False
    )
    assert reply.status_code == 303 and reply.headers["location"] == "/?done=queue-paused"
    assert dbqueue.paused_queues() == {"mail"}  # in the table every worker reads
    # A queue with no task yet can be paused from a form too; the overview lists it.
    client.post("/queues/pause", data={"csrf_token": token, "queue": "<b>later</b>"})
    page = client.get(reply.headers["location"]).text
    assert "Queue paused: workers stop claiming its tasks within a second" in page
    assert row_cells(page, "mail paused")[1] == "1"
    assert row_cells(page, "&lt;b&gt;later&lt;/b&gt; paused")[1:8] == ["0"] * 6 + ["—"]
    assert "<b>later</b>" not in page
    assert row_cells(page, "default")[0] == "default"
    mail_row = next(r for r in page.split("<tr") if ">mail</a>" in r)
    assert 'action="/queues/resume"' in mail_row and 'action="/queues/pause"' not in mail_row

    dbqueue.enqueue(jobs.noop, queue="mail")  # enqueueing into a paused queue still works
    assert db.scalar("SELECT count(*) FROM tasks WHERE queue = 'mail' AND status = 'queued'") == 2

    client.post("/queues/resume", data={"csrf_token": token, "queue": "mail"})
    assert dbqueue.paused_queues() == {"<b>later</b>"}
    page = client.get("/").text
    assert row_cells(page, "mail")[0] == "mail" and "Queue resumed" not in page
    assert (
        client.post("/queues/pause", data={"csrf_token": token, "queue": "x" * 101}).status_code
        == 400
    )
    assert client.post("/queues/pause", data={"csrf_token": token}).status_code == 400


def test_cancel_button_on_a_running_task_asks_its_worker(db, client):
    running = dbqueue.enqueue(jobs.noop)
    set_row(db, running.id, status="running", locked_by="w1", started_at_ago=1)
    page = client.get(f"/tasks/{running.id}").text
    assert f'action="/tasks/{running.id}/cancel"' in page
    assert "asks its worker to stop it" in page
    token = CSRF.search(page).group(1)
    assert client.post(f"/tasks/{running.id}/cancel").status_code == 403
    assert db.scalar("SELECT cancel_requested_at FROM tasks WHERE id = :i", i=running.id) is None

    reply = client.post(
        f"/tasks/{running.id}/cancel", data={"csrf_token": token}, follow_redirects=False
    )
    assert reply.headers["location"] == f"/tasks/{running.id}?done=cancel-requested"
    assert running.refresh().status is dbqueue.Status.RUNNING  # its worker records it
    assert db.scalar("SELECT cancel_requested_at FROM tasks WHERE id = :i", i=running.id)
    page = client.get(reply.headers["location"]).text
    assert "Cancel requested: the task is running" in page and "<dt>cancel requested</dt>" in page
    assert f'action="/tasks/{running.id}/cancel"' not in page  # asked once is enough

    set_row(db, running.id, status="succeeded", finished_at_ago=0)  # its worker finished it
    again = client.post(f"/tasks/{running.id}/cancel", data={"csrf_token": token})
    assert "Nothing changed" in again.text
    assert running.refresh().status is dbqueue.Status.SUCCEEDED


def test_access_token_via_bearer_or_login_form(db):
    secret_token = "s3cret-token-for-the-dashboard"
    app = create_app(db.settings, token=secret_token)
    failed = failed_task()
    with TestClient(app) as anon:
        reply = anon.get("/tasks", follow_redirects=False)
        assert reply.status_code == 303 and reply.headers["location"] == "/login?next=%2Ftasks"
        assert anon.get("/metrics").status_code == 401
        assert anon.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert anon.get("/", headers={"Authorization": f"Bearer {secret_token}"}).status_code == 200
        metrics = anon.get("/metrics", headers={"Authorization": f"Bearer {secret_token}"})
        assert metrics.status_code == 200 and "dbqueue_tasks" in metrics.text

        # Bearer alone is not enough to act: actions still need the CSRF token.
        post = anon.post(
            f"/tasks/{failed.id}/retry", headers={"Authorization": f"Bearer {secret_token}"}
        )
        assert post.status_code == 403 and failed.refresh().status is dbqueue.Status.FAILED
        # No token at all: refused before anything else.
        token = csrf_of(anon, "/login")
        assert anon.post(f"/tasks/{failed.id}/retry", data={"csrf_token": token}).status_code == 401

        bad = anon.post("/login", data={"csrf_token": token, "token": "nope", "next": "/tasks"})
        assert bad.status_code == 401 and "not the dashboard" in bad.text
        assert anon.post("/login", data={"token": secret_token}).status_code == 403
        good = anon.post(
            "/login",
            data={"csrf_token": token, "token": secret_token, "next": "//evil.example/"},
            follow_redirects=False,
        )
        assert good.status_code == 303 and good.headers["location"] == "/"
        assert secret_token not in good.headers["set-cookie"]
        assert anon.get("/tasks").status_code == 200
        anon.post(f"/tasks/{failed.id}/retry", data={"csrf_token": token})
        assert failed.refresh().status is dbqueue.Status.QUEUED


def test_mounted_in_a_host_app_under_a_prefix(db):
    failed = failed_task()
    host = Starlette(routes=[Mount("/admin/queue", app=create_app(db.settings))])
    with TestClient(host) as c:
        page = c.get("/admin/queue/").text
        assert 'href="/admin/queue/tasks?queue=default&amp;status=failed"' in page
        assert c.cookies.get("dbqueue_csrf")
        task_page = c.get(f"/admin/queue/tasks/{failed.id}").text
        assert f'action="/admin/queue/tasks/{failed.id}/retry"' in task_page
        token = CSRF.search(task_page).group(1)
        reply = c.post(
            f"/admin/queue/tasks/{failed.id}/retry",
            data={"csrf_token": token},
            follow_redirects=False,
        )
        assert reply.headers["location"] == f"/admin/queue/tasks/{failed.id}?done=retried"
    assert failed.refresh().status is dbqueue.Status.QUEUED


# -- metrics ---------------------------------------------------------------------------------


def scrape(client: TestClient) -> dict[tuple[str, tuple], float]:
    reply = client.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    values = {}
    for family in parser.text_string_to_metric_families(reply.text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_metrics_in_prometheus_format(db, client):
    waiting = dbqueue.enqueue(jobs.noop, queue="mail")
    set_row(db, waiting.id, run_at_ago=90)
    dbqueue.enqueue(jobs.noop, queue="mail", run_at=dt.timedelta(hours=1))
    quick = succeeded_task(queue="mail")
    set_row(db, quick.id, started_at_ago=60.5, finished_at_ago=60.49)  # 10 ms
    slow = succeeded_task(queue="mail")
    set_row(db, slow.id, started_at_ago=63, finished_at_ago=60)  # 3 s
    bad = failed_task(queue="mail")
    set_row(db, bad.id, started_at_ago=61, finished_at_ago=60)

    first = scrape(client)
    mail = (("queue", "mail"),)
    assert first[("dbqueue_tasks", (("queue", "mail"), ("status", "queued")))] == 2
    assert first[("dbqueue_tasks", (("queue", "mail"), ("status", "failed")))] == 1
    assert first[("dbqueue_tasks", (("queue", "mail"), ("status", "running")))] == 0
    assert first[("dbqueue_tasks_scheduled", mail)] == 1
    assert 90 <= first[("dbqueue_oldest_queued_age_seconds", mail)] < 3600
    assert first[("dbqueue_tasks_processed_total", mail)] == 3
    assert first[("dbqueue_tasks_failed_total", mail)] == 1
    add = (("handler", "tests.jobs:add"),)
    assert first[("dbqueue_task_duration_seconds_count", add)] == 2
    assert first[("dbqueue_task_duration_seconds_bucket", (*add, ("le", "0.025")))] == 1
    assert first[("dbqueue_task_duration_seconds_bucket", (*add, ("le", "2.5")))] == 1
    assert first[("dbqueue_task_duration_seconds_bucket", (*add, ("le", "5.0")))] == 2
    assert first[("dbqueue_task_duration_seconds_bucket", (*add, ("le", "+Inf")))] == 2
    assert 2.9 < first[("dbqueue_task_duration_seconds_sum", add)] < 3.1

    # Totals only grow: pruning finished rows does not lower them, new ones add to them.
    with db.engine.begin() as conn:
        store.delete(conn, [quick.id, slow.id, bad.id])
    time.sleep(0.6)  # so the next task's finished_at (5.5 s ago) is past the first watermark
    again = failed_task(queue="mail")
    set_row(db, again.id, started_at_ago=6, finished_at_ago=5.5)
    second = scrape(client)
    assert second[("dbqueue_tasks_processed_total", mail)] == 4
    assert second[("dbqueue_tasks_failed_total", mail)] == 2
    assert second[("dbqueue_task_duration_seconds_count", add)] == 2
    assert scrape(client)[("dbqueue_tasks_processed_total", mail)] == 4  # not counted twice


def test_metrics_queue_paused_gauge(db, client):
    dbqueue.enqueue(jobs.noop, queue="mail")
    dbqueue.enqueue(jobs.noop, queue="default")
    dbqueue.pause("mail", "idle")  # idle has no task yet
    dbqueue.pause("sms")
    dbqueue.resume("sms")
    values = scrape(client)
    paused = {
        dict(labels)["queue"]: value
        for (name, labels), value in values.items()
        if name == "dbqueue_queue_paused"
    }
    assert paused == {"default": 0, "idle": 1, "mail": 1, "sms": 0}


# -- the `dbqueue web` command ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


@contextlib.contextmanager
def serve(db, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`dbqueue web` as a real process on a free port; yields its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dbqueue", "web", "--port", str(port), *args],
        env={**db.env, **(env or {})},
        cwd=db.tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                _, err = process.communicate()
                raise AssertionError(f"dbqueue web exited {process.returncode}: {err}")
            try:
                fetch(base + "/login")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        _, err = process.communicate(timeout=15)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: exit by that signal.
    assert process.returncode in (0, -signal.SIGTERM), err


def test_web_refuses_to_bind_beyond_loopback_without_a_token(db):
    env_without = {k: v for k, v in db.env.items() if k != "DBQUEUE_WEB_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "dbqueue", "web", "--host", "0.0.0.0", "--port", "1"],
        env=env_without,
        cwd=db.tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "refusing to serve the dashboard on 0.0.0.0" in result.stderr
    assert "DBQUEUE_WEB_TOKEN" in result.stderr and "Traceback" not in result.stderr
    short = subprocess.run(
        [sys.executable, "-m", "dbqueue", "web", "--host", "::", "--port", "1"],
        env={**env_without, "DBQUEUE_WEB_TOKEN": "short"},
        cwd=db.tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert short.returncode == 2 and "at least 16" in short.stderr


@pytest.mark.slow
def test_web_beyond_loopback_serves_with_the_token(db):
    token = "a-long-enough-dashboard-token"
    with serve(db, "--host", "0.0.0.0", env={"DBQUEUE_WEB_TOKEN": token}) as base:
        status, _ = fetch(base + "/")
        assert status == 303
        assert fetch(base + "/metrics")[0] == 401
        status, body = fetch(base + "/", {"Authorization": f"Bearer {token}"})
        assert status == 200 and "<h1>Queues</h1>" in body


# -- in a real browser ------------------------------------------------------------------------


def _browser_or_fail():
    """Playwright and Debian's chromium; a clear failure under CI, a skip on a laptop without."""
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ModuleNotFoundError:
        problem = "Playwright for Python is not installed (pip install -e '.[dev,web]')"
        sync_playwright = None
    if problem is None and not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        problem = (
            f"chromium is not installed at {CHROMIUM} (apt-get install -y chromium; "
            "or set DBQUEUE_TEST_CHROMIUM)"
        )
    if problem:  # a missing browser is a failure, never a skip: .ci/run installs it
        pytest.fail(f"the browser test needs a browser: {problem}")
    return sync_playwright


def _demo_data(db) -> dbqueue.Task:
    """A few queues in several states, so the screenshot shows what an operator sees."""
    for i in range(12):
        succeeded_task(i, i, queue="default")
    for i in range(4):
        succeeded_task(i, 1, queue="mail")
    dbqueue.enqueue_many(jobs.add, [(i, i) for i in range(7)], queue="default")
    dbqueue.enqueue_many(jobs.noop, [()] * 3, queue="mail", run_at=dt.timedelta(minutes=30))
    dbqueue.enqueue_many(jobs.noop, [()] * 5, queue="reports")
    with db.engine.begin() as conn:
        conn.execute(sa.update(tasks).where(tasks.c.queue == "reports").values(run_at=db_now(-95)))
    # An hour of history for the charts: a busy default queue, a quieter mail queue.
    for minute in range(60):
        spread = [minute * 60 + 20 + k * 3.1 for k in range(2 + (minute * 7) % 11)]
        finished_rows(db, "default", "succeeded", *spread)
        if minute % 6 == 2:
            finished_rows(db, "default", "failed", minute * 60 + 41)
        finished_rows(db, "mail", "succeeded", *spread[: 1 + minute % 4])
    return failed_task("card declined", queue="mail")


@pytest.mark.slow
def test_browser_retries_a_failed_task(db):
    sync_playwright = _browser_or_fail()
    failed = _demo_data(db)
    # The README's picture comes from the production database's run, when asked for
    # (DBQUEUE_UPDATE_SCREENSHOT=1): otherwise every run would leave the checkout modified.
    refresh = db.kind == "postgresql" and os.environ.get("DBQUEUE_UPDATE_SCREENSHOT") == "1"
    screenshot = ROOT / "docs" / "dashboard.png" if refresh else db.tmp_path / "s.png"
    screenshot.parent.mkdir(exist_ok=True)
    idle = db.popen("work", "--queue", "idle")  # a real worker, for the workers line
    try:
        db.wait_for("SELECT count(*) FROM workers", 1)
        with serve(db) as base, sync_playwright() as pw:
            _retry_in_browser(pw, base, failed, screenshot)
    finally:
        idle.terminate()
        idle.communicate(timeout=30)
    assert db.scalar("SELECT status FROM tasks WHERE id = :i", i=failed.id) == "queued"
    assert db.scalar("SELECT attempts FROM tasks WHERE id = :i", i=failed.id) == 0
    assert dbqueue.paused_queues(settings=db.settings) == {"mail"}
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'failed'") == 0
    assert screenshot.stat().st_size > 10_000


def _retry_in_browser(pw, base: str, failed: dbqueue.Task, screenshot: Path) -> None:
    """Overview (charts, auto-refresh, Pause) -> the queue's failed count -> the task ->
    Retry, as an operator would."""
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 640})
        page.goto(base + "/")
        charts = page.locator("svg.chart")
        assert charts.count() == 2 and charts.first.is_visible()  # default and mail
        assert page.locator("svg.chart rect.ok").count() > 60
        assert page.locator("svg.chart rect.failed").count() >= 10
        assert charts.first.bounding_box()["width"] > 500
        # The page reloads itself (the script runs under the CSP), until switched off.
        with page.expect_navigation(timeout=20_000):
            pass
        page.get_by_role("link", name="Auto-refresh on · turn off").click()
        page.wait_for_url("**/?refresh=off")
        assert page.locator("script").count() == 0
        mail = page.locator("tr", has=page.locator("td", has_text="mail")).first
        assert mail.locator("td").nth(4).inner_text() == "1"  # failed
        assert "1 worker process registered" in page.content()
        mail.get_by_role("button", name="Pause").click()
        page.wait_for_url("**/?done=queue-paused")
        assert page.get_by_role("status").inner_text().startswith("Queue paused")
        mail = page.locator("tr", has=page.locator("td", has_text="mail")).first
        assert mail.locator(".status-paused").inner_text() == "paused"
        assert mail.get_by_role("button", name="Resume").is_visible()
        assert page.locator("script").count() == 0  # the cookie remembered "off"
        page.screenshot(path=str(screenshot), full_page=True)
        mail.locator("td").nth(4).get_by_role("link").click()
        page.wait_for_url("**/tasks?queue=mail&status=failed")
        page.get_by_role("link", name=str(failed.id), exact=True).click()
        page.wait_for_url(f"**/tasks/{failed.id}")
        assert "ValueError: card declined" in page.locator("pre").inner_text()
        page.get_by_role("button", name="Retry").click()
        page.wait_for_url(f"**/tasks/{failed.id}?done=retried")
        assert page.get_by_role("status").inner_text() == "Task queued again."
        # Search the failed tasks by handler, then retry them all after the count.
        page.get_by_role("link", name="Tasks", exact=True).click()
        page.get_by_label("status").select_option("failed")
        page.get_by_label("handler contains, or task id").fill("jobs:NOOP")
        page.get_by_role("button", name="Filter").click()
        page.wait_for_url("**/tasks?status=failed&queue=&q=jobs%3ANOOP")
        assert page.locator("tbody tr").count() == 10  # the default queue's failures
        page.get_by_role("button", name="Retry all matching…").click()
        assert "10 failed or cancelled tasks will be queued again" in page.content()
        page.get_by_role("button", name="Retry 10 tasks").click()
        page.wait_for_url("**/tasks?status=failed&q=jobs%3ANOOP&done=bulk-retried&n=10")
        assert page.get_by_role("status").inner_text().startswith("10 matching failed")
        assert page.locator("tbody tr").count() == 0
    finally:
        browser.close()


def test_task_page_shows_meta_escaped(db, client):
    task = dbqueue.enqueue(jobs.noop, meta={"tenant": "<b>acme</b>"})
    page = client.get(f"/tasks/{task.id}").text
    assert "<dt>meta</dt>" in page and "tenant" in page
    assert "<b>acme</b>" not in page
    plain = dbqueue.enqueue(jobs.noop)
    assert "<dt>meta</dt>" not in client.get(f"/tasks/{plain.id}").text
