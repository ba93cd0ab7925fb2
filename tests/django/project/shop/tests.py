"""The shop's tests under Django's own test runner (`manage.py test shop`): a TestCase runs
the enqueued tasks in its transaction with dbqueue.django.testing."""

from __future__ import annotations

from django.tasks import TaskResultStatus
from django.test import TestCase

from dbqueue.django.testing import inline, run_tasks
from shop.models import Order


class ReceiptTests(TestCase):
    def test_the_receipt_is_sent_by_the_task(self) -> None:
        response = self.client.post("/orders", {"email": "ada@example.com"})
        order = Order.objects.get(pk=response.json()["id"])
        self.assertFalse(order.receipt_sent)

        [result] = run_tasks()  # every ready task, here, in this test's transaction

        self.assertEqual(result.status, TaskResultStatus.SUCCESSFUL)
        self.assertEqual(result.return_value, "ada@example.com")
        order.refresh_from_db()
        self.assertTrue(order.receipt_sent)

    def test_inline_tasks_run_when_the_request_commits(self) -> None:
        with inline(), self.captureOnCommitCallbacks(execute=True):
            response = self.client.post("/orders", {"email": "grace@example.com"})
        self.assertTrue(Order.objects.get(pk=response.json()["id"]).receipt_sent)

    def test_a_rejected_order_leaves_no_task(self) -> None:
        response = self.client.post("/orders", {"email": "not-an-email"})
        self.assertEqual(response.status_code, 422)
        self.assertEqual(run_tasks(), [])
