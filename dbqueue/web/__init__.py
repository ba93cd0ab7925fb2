"""The dashboard (`dbqueue web`) and `/metrics`: an ASGI app to serve alone or mount in an app.

Needs the `web` extra: `pip install 'dbqueue[web]'`.
"""

from __future__ import annotations

try:
    from dbqueue.web.app import create_app
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the installation
    if exc.name not in {"starlette", "jinja2", "prometheus_client", "python_multipart"}:
        raise
    raise ModuleNotFoundError(
        f"the dbqueue dashboard needs {exc.name}: pip install 'dbqueue[web]'", name=exc.name
    ) from exc

__all__ = ["create_app"]
