"""The shop project end to end: Django's test client posts an order, the view enqueues in
`atomic()`, a real `manage.py dbqueue workoff` process runs the task."""

from __future__ import annotations

import sys

import pytest
import sqlalchemy as sa
from django.db import DatabaseError

from dbqueue import database
from tests.conftest import Background
from tests.django.conftest import SITE, manage, manage_env


def plain_engine():
    from django.tasks import task_backends

    url = task_backends["default"].worker_settings().database_url
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


def test_an_order_sends_its_receipt_through_a_real_worker():
    from django.test import Client
    from shop.models import Order

    client = Client()
    created = client.post("/orders", {"email": "ada@example.com"})
    assert created.status_code == 201, created.content
    refused = client.post("/orders", {"email": "not-an-email"})
    assert refused.status_code == 422

    engine = plain_engine()
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, handler, queue, priority FROM tasks")).all()
    finally:
        engine.dispose()
    assert [(r.handler, r.queue, r.priority) for r in rows] == [
        ("shop.tasks:send_receipt", "mail", -10)  # Django's priority 10, dbqueue's order
    ]
    assert str(rows[0].id) == created.json()["task_id"]
    assert Order.objects.count() == 1
    assert client.get(f"/orders/{created.json()['id']}").json() == {
        "receipt": "READY",
        "sent": False,
    }

    worker = manage("dbqueue", "workoff")
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert "1 succeeded" in worker.stdout, worker.stdout
    assert client.get(f"/orders/{created.json()['id']}").json() == {
        "receipt": "SUCCESSFUL",
        "sent": True,
    }
    from shop.tasks import send_receipt

    assert send_receipt.get_result(created.json()["task_id"]).return_value == "ada@example.com"


def test_a_failing_task_is_recorded_by_the_worker_with_its_traceback():
    from django.tasks import TaskResultStatus
    from shop.jobs import explode

    result = explode.enqueue("from a worker")
    worker = manage("dbqueue", "workoff")
    assert worker.returncode == 1, worker.stdout + worker.stderr  # a task raised
    failed = explode.get_result(result.id)
    assert failed.status == TaskResultStatus.FAILED
    assert failed.errors[0].exception_class is LookupError
    assert "LookupError: from a worker" in failed.errors[0].traceback


def test_status_and_the_schema_agree_with_dbqueues_own_migrations():
    from dbqueue.django.schema import latest_revision

    status = manage("dbqueue", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    engine = plain_engine()
    try:
        with engine.connect() as conn:
            assert database.current_revision(conn) == database.head_revision()
    finally:
        engine.dispose()
    # A dbqueue revision without a Django migration pinned to it would leave Django projects
    # behind (their `migrate` would not run it).
    assert latest_revision() == database.head_revision(), (
        f"dbqueue's alembic head is {database.head_revision()}, the dbqueue.django app's last "
        f"migration brings {latest_revision()}: add dbqueue/django/migrations/NNNN_*.py "
        "(a RunPython of schema.upgrade_to(new head), downgrade_to(previous)) depending on it"
    )
    again = manage("dbqueue", "migrate")  # dbqueue's own command finds nothing to do
    assert again.returncode == 0, again.stdout + again.stderr
    shown = manage("showmigrations", "dbqueue")
    assert "[X] 0001_initial" in shown.stdout, shown.stdout + shown.stderr


def test_manage_py_dbqueue_work_runs_tasks_until_stopped():
    import signal
    import time

    from django.tasks import TaskResultStatus
    from shop.jobs import add

    worker = Background(
        [sys.executable, "manage.py", "dbqueue", "work", "--sleep-delay", "0.2"],
        cwd=SITE,
        env=manage_env(),
    )
    try:
        result = add.enqueue(40, 2)
        deadline = time.monotonic() + 60
        while add.get_result(result.id).status != TaskResultStatus.SUCCESSFUL:
            assert worker.poll() is None, worker.output()
            assert time.monotonic() < deadline, worker.output()
            time.sleep(0.1)
        assert add.get_result(result.id).return_value == 42
    finally:
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, out + err


def test_manage_py_dbqueue_takes_dbqueues_log_options_and_logs_each_task():
    """`--log-format` / `--log-level` go before the command (argparse refused them there,
    click after it), and the workers' own lines outlive django.setup()'s logging set-up."""
    import json

    from shop.jobs import add

    result = add.enqueue(1, 2)
    worker = manage("dbqueue", "--log-format", "json", "workoff")
    assert worker.returncode == 0, worker.stdout + worker.stderr
    events = [json.loads(line) for line in worker.stderr.splitlines() if line.startswith("{")]
    finished = [e for e in events if e.get("event") == "task_finished"]
    assert [(e["task_id"], e["outcome"]) for e in finished] == [(int(result.id), "succeeded")], (
        worker.stderr
    )

    add.enqueue(3, 4)
    quiet = manage("dbqueue", "--log-level", "WARNING", "workoff")
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert "1 succeeded" in quiet.stdout, quiet.stdout
    assert "task_finished" not in quiet.stderr and "worker_started" not in quiet.stderr


def test_migrate_to_zero_and_back_removes_and_recreates_dbqueues_tables():
    from shop.jobs import add

    down = manage("migrate", "dbqueue", "zero")
    assert down.returncode == 0, down.stdout + down.stderr
    engine = plain_engine()
    try:
        with engine.connect() as conn:
            assert "tasks" not in sa.inspect(conn).get_table_names()
            assert database.current_revision(conn) is None
        with pytest.raises(DatabaseError):  # Django's own error class, as for any query
            add.enqueue(1, 1)
        up = manage("migrate", "dbqueue")
        assert up.returncode == 0, up.stdout + up.stderr
        with engine.connect() as conn:
            assert database.current_revision(conn) == database.head_revision()
    finally:
        engine.dispose()
    assert add.enqueue(1, 1).id
