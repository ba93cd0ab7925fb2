"""dbqueue's dashboard inside a Django project's ASGI application, behind Django's own login.

    application = with_dashboard(get_asgi_application(), prefix="/dbqueue")

Requests under `prefix` go to the dashboard (dbqueue[web]) once `allow(user)` says yes (by
default: an active staff member); an anonymous visitor is sent to settings.LOGIN_URL, a
signed-in one who is not allowed gets 403. The user comes from Django's session cookie, as
AuthenticationMiddleware finds it. Everything else goes to Django.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie
from importlib import import_module
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

from django.tasks import DEFAULT_TASK_BACKEND_ALIAS

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


def is_staff(user: Any) -> bool:
    """The default rule: an active staff member."""
    return bool(user.is_active and user.is_staff)


async def _user(scope: Scope) -> Any:
    from django.conf import settings
    from django.contrib import auth
    from django.contrib.auth.models import AnonymousUser

    cookie = SimpleCookie()
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            cookie.load(value.decode("latin-1"))
    morsel = cookie.get(settings.SESSION_COOKIE_NAME)
    if morsel is None:
        return AnonymousUser()
    store = import_module(settings.SESSION_ENGINE).SessionStore(morsel.value)
    return await auth.aget_user(SimpleNamespace(session=store))


async def _respond(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def with_dashboard(
    django_app: ASGIApp,
    *,
    prefix: str = "/dbqueue",
    allow: Callable[[Any], bool] = is_staff,
    backend: str = DEFAULT_TASK_BACKEND_ALIAS,
) -> ASGIApp:
    """`django_app` with the dashboard of `backend`'s database mounted at `prefix`."""
    prefix = "/" + prefix.strip("/")
    dashboard: ASGIApp | None = None

    def get_dashboard() -> ASGIApp:
        nonlocal dashboard
        if dashboard is None:
            from django.tasks import task_backends

            from dbqueue.django.backend import TaskBackend
            from dbqueue.web.app import create_app

            chosen = task_backends[backend]
            if not isinstance(chosen, TaskBackend):
                raise TypeError(f"TASKS[{backend!r}] is not dbqueue's TaskBackend")
            dashboard = create_app(chosen.worker_settings())
        return dashboard

    async def application(scope: Scope, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == prefix or path.startswith(prefix + "/")):
            await django_app(scope, receive, send)
            return
        user = await _user(scope)
        if not user.is_authenticated:
            from django.conf import settings

            target = f"{settings.LOGIN_URL}?next={quote(path)}".encode()
            await _respond(send, 302, [(b"location", target)], b"")
            return
        if not allow(user):
            await _respond(send, 403, [(b"content-type", b"text/plain")], b"staff only\n")
            return
        if path == prefix:  # the dashboard's pages are under prefix/
            await _respond(send, 308, [(b"location", (prefix + "/").encode())], b"")
            return
        inner = {**scope, "root_path": scope.get("root_path", "") + prefix}
        await get_dashboard()(inner, receive, send)

    return application
