"""The app's place in a project: Django's system check, and `import dbqueue` without Django."""

from __future__ import annotations

import subprocess
import sys

from tests.django.conftest import manage_env


def test_the_system_check_wants_the_app_installed():
    from django.tasks import task_backends
    from django.test import override_settings

    backend = task_backends["default"]
    assert backend.check() == []
    from django.conf import settings

    without = [app for app in settings.INSTALLED_APPS if app != "dbqueue.django"]
    with override_settings(INSTALLED_APPS=without):
        [error] = backend.check()
    assert error.id == "dbqueue.E001"
    assert "INSTALLED_APPS" in error.msg and "manage.py migrate" in error.hint


def test_import_dbqueue_loads_nothing_of_django_where_django_is_installed():
    probe = (
        "import sys, dbqueue\n"
        "from dbqueue import enqueue, Task, handle_asynchronously, configure\n"
        "import dbqueue.worker\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'django' "
        "or m.startswith('dbqueue.django')))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], env=manage_env(), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_bad_options_are_refused_when_the_backend_is_made():
    from django.tasks.exceptions import InvalidTaskBackend

    from dbqueue.django import TaskBackend

    for options, wanted in (
        ({"DATABSE": "default"}, "unknown key"),
        ({"MAX_ATTEMPTS": 0}, "MAX_ATTEMPTS"),
        ({"TIMEOUT": "30"}, "TIMEOUT"),
    ):
        try:
            TaskBackend("broken", {"OPTIONS": options})
        except InvalidTaskBackend as exc:
            assert wanted in str(exc)
        else:
            raise AssertionError(f"{options} was accepted")
