"""The shop project end to end: Django's test client posts an order, the view enqueues in
`atomic()`, a real `manage.py dbqueue workoff` process runs the task."""

from __future__ import annotations

import sqlalchemy as sa

from dbqueue import database
from tests.django.conftest import manage


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
    # behind: add dbqueue/django/migrations/NNNN_*.py with REVISION = the new head.
    assert latest_revision() == database.head_revision()
    again = manage("dbqueue", "migrate")  # dbqueue's own command finds nothing to do
    assert again.returncode == 0, again.stdout + again.stderr
    shown = manage("showmigrations", "dbqueue")
    assert "[X] 0001_initial" in shown.stdout, shown.stdout + shown.stderr
