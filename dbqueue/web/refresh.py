"""The dashboard's one script: reload a page every few seconds, unless switched off.

Every page works without it. Where JavaScript runs, the pages that show changing state
(overview, task lists, a task, workers) reload themselves every `SECONDS`, skipping a turn
while the tab is hidden or the operator is typing in a field or selecting text. The toggle
in the header (`?refresh=off` / `?refresh=on`) is remembered in a cookie. The script is a
constant, allowed by its hash in the Content-Security-Policy, so no other script can run.
"""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from dbqueue.web import security

SECONDS = 5
COOKIE = "dbqueue_refresh"
SCRIPT = f"""
(function () {{
  var every = {SECONDS * 1000};
  function busy() {{
    var field = document.activeElement;
    return document.hidden || String(window.getSelection()).length > 0 ||
      (field && /^(INPUT|SELECT|TEXTAREA)$/.test(field.tagName));
  }}
  function tick() {{
    if (busy()) {{ setTimeout(tick, every); return; }}
    var url = new URL(window.location.href);
    ["done", "n", "m", "refresh"].forEach(function (k) {{ url.searchParams.delete(k); }});
    if (url.href === window.location.href) {{ window.location.reload(); }}
    else {{ window.location.replace(url.href); }}
  }}
  setTimeout(tick, every);
}})();
"""
CSP_SOURCE = "'sha256-" + base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode() + "'"


def wanted(request: Request) -> tuple[bool, str | None]:
    """(whether this page reloads itself, the cookie value to set when the toggle was used)."""
    asked = request.query_params.get("refresh")
    if asked in ("on", "off"):
        return asked == "on", asked
    return request.cookies.get(COOKIE) != "off", None


def toggle_href(request: Request, on: bool) -> str:
    """This page's address with the toggle flipped (a message's `done` dropped)."""
    params = {
        k: v for k, v in request.query_params.items() if k not in ("done", "n", "m", "refresh")
    }
    return "?" + urlencode({**params, "refresh": "off" if on else "on"})


def remember(response: Response, request: Request, value: str) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=365 * 86400,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path=security.cookie_path(request),
    )
