"""The demo's application tasks: what `scripts/demo` enqueues and works off."""

from __future__ import annotations

import hashlib
import time

from dbqueue import handle_asynchronously


@handle_asynchronously(queue="mail")
def send_welcome_email(address: str) -> str:
    time.sleep(0.01)  # pretend to talk to an SMTP server
    return f"welcome email sent to {address}"


@handle_asynchronously(queue="images", priority=-1)
def make_thumbnail(name: str, size: int = 128) -> str:
    digest = hashlib.sha256(f"{name}:{size}".encode()).hexdigest()[:12]
    return f"{name} -> thumbnails/{digest}_{size}px.png"


@handle_asynchronously(max_attempts=3)
def charge_card(order_id: int, cents: int) -> dict[str, object]:
    if cents <= 0:
        raise ValueError(f"order {order_id}: amount must be positive, got {cents}")
    return {"order": order_id, "charged": cents, "status": "paid"}
