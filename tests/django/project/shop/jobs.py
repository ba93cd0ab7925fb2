"""Tasks the backend's tests enqueue (the recipe's task is in tasks.py)."""

from __future__ import annotations

import asyncio
import time

from django.tasks import TaskContext, task

from shop.models import Order


@task
def add(a: int, b: int) -> int:
    return a + b


@task(max_attempts=1)
def explode(message: str) -> None:
    raise LookupError(message)


@task(max_attempts=2)
def explode_twice(message: str) -> None:
    raise LookupError(message)


@task(takes_context=True)
def who_am_i(context: TaskContext, tag: str) -> dict[str, object]:
    return {
        "id": context.task_result.id,
        "attempt": context.attempt,
        "tag": tag,
        "args": context.task_result.args,
    }


@task
async def double_later(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


@task
def note(email: str) -> None:
    Order.objects.create(email=email)


@task
def returns_set() -> object:
    return {1, 2}


@task(timeout=0.5, max_attempts=1)
def overstay(seconds: float) -> None:
    time.sleep(seconds)
