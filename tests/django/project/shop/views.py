from __future__ import annotations

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET, require_POST

from shop.models import Order
from shop.tasks import send_receipt


class NotAnEmail(Exception):
    pass


@require_POST
def create_order(request: HttpRequest) -> JsonResponse:
    try:
        with transaction.atomic():
            order = Order.objects.create(email=request.POST["email"])
            result = send_receipt.enqueue(order.pk)  # a row in this transaction
            order.receipt_task = result.id
            order.save(update_fields=["receipt_task"])
            if "@" not in order.email:
                raise NotAnEmail(order.email)  # rolls back the order and its task
    except NotAnEmail:
        return JsonResponse({"error": "not an e-mail address"}, status=422)
    return JsonResponse({"id": order.pk, "task_id": result.id}, status=201)


@require_GET
def order_status(request: HttpRequest, order_id: int) -> JsonResponse:
    order = Order.objects.get(pk=order_id)
    result = send_receipt.get_result(order.receipt_task)
    return JsonResponse({"receipt": result.status, "sent": order.receipt_sent})
