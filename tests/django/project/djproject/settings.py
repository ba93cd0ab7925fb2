"""Settings of the test project: a shop whose orders send their receipt through dbqueue.

The database comes from SHOP_DATABASE_URL (sqlite:///path, postgresql://user@host:port/name or
mysql://user@host:port/name),
which tests/django/conftest.py points at a throwaway database.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

SECRET_KEY = "test-only-secret-key-of-the-shop-project-0123456789"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
USE_TZ = True
ROOT_URLCONF = "djproject.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
LOGIN_URL = "/login/"


def database(url: str) -> dict[str, object]:
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": parts.path[1:],
            # Workers write beside the web process: WAL, and BEGIN IMMEDIATE (dbqueue's way).
            "OPTIONS": {
                "init_command": "PRAGMA journal_mode=WAL;",
                "transaction_mode": "IMMEDIATE",
            },
        }
    engine = "mysql" if parts.scheme == "mysql" else "postgresql"
    return {
        "ENGINE": f"django.db.backends.{engine}",
        "NAME": parts.path.lstrip("/"),
        "USER": parts.username or "",
        "PASSWORD": parts.password or "",
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }


DATABASES = {"default": database(os.environ["SHOP_DATABASE_URL"])}

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "dbqueue.django",  # dbqueue's tables come with `manage.py migrate`
    "shop",
]

TASKS = {
    "default": {
        "BACKEND": "dbqueue.django.TaskBackend",
        "QUEUES": ["default", "mail"],
        "OPTIONS": {"DATABASE": "default", "MAX_ATTEMPTS": 3},
    }
}
