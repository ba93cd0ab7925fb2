from __future__ import annotations

from django.tasks import task

from shop.models import Order


@task(queue_name="mail", priority=10)
def send_receipt(order_id: int) -> str:
    order = Order.objects.get(pk=order_id)
    # ... send the e-mail to order.email here ...
    Order.objects.filter(pk=order.pk).update(receipt_sent=True)
    return order.email
