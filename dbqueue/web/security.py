"""Who may see the dashboard and who may press its buttons: the access token and CSRF tokens.

CSRF: the signed double-submit cookie (OWASP's recommended stateless pattern). A random
session id lives in an HttpOnly, SameSite=Strict cookie; each form carries
HMAC(secret, session id). A POST is accepted only when the form's token is the HMAC of the
cookie it came with, so another site can neither read nor forge it. The secret is derived from
dbqueue's signing key when none is given, so every dashboard process behind one load balancer
accepts the others' forms.

Access: with a token configured, every request needs `Authorization: Bearer <token>` or the
cookie the login form sets, which holds HMAC(secret, token), never the token itself.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

CSRF_COOKIE = "dbqueue_csrf"
AUTH_COOKIE = "dbqueue_auth"
CSRF_FIELD = "csrf_token"


def derive_secret(key: bytes) -> bytes:
    """A secret for the dashboard's MACs, separate from the key that signs payloads."""
    return hmac.new(key, b"dbqueue-web-v1", hashlib.sha256).digest()


def _mac(secret: bytes, purpose: str, value: str) -> str:
    return hmac.new(secret, f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()


class Guard:
    """CSRF tokens and the optional access token, for one dashboard app."""

    def __init__(self, secret: bytes, token: str | None) -> None:
        self.secret = secret
        self.token = token or None

    # -- CSRF -----------------------------------------------------------------------------------

    def session_id(self, request: Request) -> tuple[str, bool]:
        """(the browser's CSRF session id, whether it is new and must be set as a cookie)."""
        existing = request.cookies.get(CSRF_COOKIE, "")
        if len(existing) == 43 and existing.replace("-", "").replace("_", "").isalnum():
            return existing, False
        return secrets.token_urlsafe(32), True

    def csrf_token(self, session_id: str) -> str:
        return _mac(self.secret, "csrf", session_id)

    def csrf_valid(self, request: Request, form: Any) -> bool:
        """Whether the form's token is the MAC of the session cookie sent with it."""
        session_id = request.cookies.get(CSRF_COOKIE)
        submitted = form.get(CSRF_FIELD)
        if not session_id or not isinstance(submitted, str) or not submitted:
            return False
        return hmac.compare_digest(self.csrf_token(session_id), submitted)

    @staticmethod
    def set_session_cookie(response: Response, request: Request, session_id: str) -> None:
        response.set_cookie(
            CSRF_COOKIE,
            session_id,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path=cookie_path(request),
        )

    # -- access ---------------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            credential.strip().encode(), self.token.encode()
        ):
            return True
        cookie = request.cookies.get(AUTH_COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie, self.auth_cookie_value())

    def token_matches(self, submitted: str) -> bool:
        return self.token is not None and hmac.compare_digest(
            submitted.strip().encode(), self.token.encode()
        )

    def auth_cookie_value(self) -> str:
        return _mac(self.secret, "auth", self.token or "")

    def set_auth_cookie(self, response: Response, request: Request) -> None:
        response.set_cookie(
            AUTH_COOKIE,
            self.auth_cookie_value(),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path=cookie_path(request),
        )


def cookie_path(request: Request) -> str:
    """The dashboard's own path, so its cookies are not sent to the rest of a host app."""
    root = str(request.scope.get("root_path", "")).rstrip("/")
    return root + "/" if root else "/"
