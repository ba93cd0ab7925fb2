"""dbqueue for Django (`pip install dbqueue[django]`, Django 6.1 or newer).

    INSTALLED_APPS += ["dbqueue.django"]           # `manage.py migrate` creates dbqueue's tables
    TASKS = {"default": {"BACKEND": "dbqueue.django.TaskBackend"}}
    python manage.py dbqueue work                  # workers, with the project's settings

docs/guides/django.md has the whole recipe. Nothing here is imported by `import dbqueue`, and
this package imports Django's task machinery only when the backend is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dbqueue.django.backend import TaskBackend
    from dbqueue.django.runner import DbqueueTask

__all__ = ["DbqueueTask", "TaskBackend"]


def __getattr__(name: str) -> Any:
    # Lazily: Django imports this package as an app before its settings are ready for tasks.
    if name in __all__:
        from dbqueue.django import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'dbqueue.django' has no attribute {name!r}")
