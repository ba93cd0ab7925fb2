"""The dashboard mounted in the project's ASGI application (djproject/asgi.py), behind
Django's login: staff see it, other users get 403, anonymous visitors go to LOGIN_URL."""

from __future__ import annotations

import asyncio
import uuid


def get(path: str, cookie: str | None = None) -> tuple[int, dict[bytes, bytes], bytes]:
    """One GET through the project's real ASGI application."""
    from djproject.asgi import application

    headers = [(b"host", b"testserver")]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 50000),
    }
    sent = []
    requested = []

    async def receive():
        if requested:  # the client stays connected: Django listens for a disconnect
            await asyncio.Event().wait()
        requested.append(True)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(application(scope, receive, send))
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def session_cookie(*, staff: bool) -> str:
    from django.contrib.auth.models import User
    from django.test import Client

    user = User.objects.create_user(f"user-{uuid.uuid4().hex[:8]}", is_staff=staff)
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def test_staff_see_the_dashboard_others_do_not():
    from shop.jobs import add

    add.using(queue_name="mail").enqueue(1, 2)

    status, _, body = get("/dbqueue/tasks", session_cookie(staff=True))
    assert status == 200, body[:500]
    assert b"shop.jobs:add" in body and b"mail" in body  # the task enqueued above

    status, headers, _ = get("/dbqueue", session_cookie(staff=True))
    assert (status, headers[b"location"]) == (308, b"/dbqueue/")

    status, _, body = get("/dbqueue/tasks", session_cookie(staff=False))
    assert status == 403

    status, headers, _ = get("/dbqueue/tasks")
    assert status == 302
    assert headers[b"location"] == b"/login/?next=/dbqueue/tasks"

    status, _, _ = get("/no-such-page")  # everything else is Django's
    assert status == 404
