"""Bus test application B: subscribes by name, on two queues, and by regex."""

from __future__ import annotations

import re
from typing import Any

from dbqueue import bus
from tests import jobs


@bus.subscribe("user_created")
def on_user_created(attributes: dict[str, Any]) -> str:
    jobs.record_bus_event("app_b", "on_user_created", attributes)
    return f"welcomed {attributes['first_name']}"


@bus.subscribe("user_paid", queue="critical")
def on_user_paid(attributes: dict[str, Any]) -> int:
    jobs.record_bus_event("app_b", "on_user_paid", attributes)
    return int(attributes["cents"])


@bus.subscribe(re.compile(r"^user_"))
def on_any_user_event(attributes: dict[str, Any]) -> None:
    jobs.record_bus_event("app_b", "on_any_user_event", attributes)
