"""Bus test application C: a subscriber whose handler fails, and one that can be removed.

`on_user_archived` exists only when BUS_APP_C_LEGACY is set: the same application before
and after a deploy that removed a handler.
"""

from __future__ import annotations

import os
from typing import Any

from dbqueue import bus
from tests import jobs


@bus.subscribe("user_created")
def on_user_created(attributes: dict[str, Any]) -> None:
    jobs.record_bus_event("app_c", "on_user_created", attributes)
    raise RuntimeError("app c is broken")


if os.environ.get("BUS_APP_C_LEGACY"):

    @bus.subscribe("user_archived")
    def on_user_archived(attributes: dict[str, Any]) -> None:
        jobs.record_bus_event("app_c", "on_user_archived", attributes)
