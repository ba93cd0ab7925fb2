"""The same tests under pytest-django (`pytest --ds djproject.settings shop/tests_pytest.py`)."""

from __future__ import annotations

import pytest
from django.tasks import TaskResultStatus

from dbqueue.django.testing import inline, run_tasks
from shop.models import Order


@pytest.mark.django_db
def test_the_receipt_is_sent_by_the_task(client) -> None:
    response = client.post("/orders", {"email": "ada@example.com"})

    [result] = run_tasks()

    assert result.status == TaskResultStatus.SUCCESSFUL
    assert Order.objects.get(pk=response.json()["id"]).receipt_sent


@pytest.mark.django_db
def test_inline_tasks_run_when_the_request_commits(client, django_capture_on_commit_callbacks):
    with inline(), django_capture_on_commit_callbacks(execute=True):
        response = client.post("/orders", {"email": "grace@example.com"})
    assert Order.objects.get(pk=response.json()["id"]).receipt_sent
