"""dbqueue.django.testing under the two test runners a Django project uses: Django's own
(`manage.py test`, shop/tests.py) and pytest-django (shop/tests_pytest.py), each a real run
in its own process on a test database it makes and drops."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.django.conftest import SITE, manage, manage_env


def test_under_djangos_test_runner():
    run = manage("test", "shop", "--noinput", "-v", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Ran 3 tests" in run.stderr and "OK" in run.stderr, run.stderr


def test_under_pytest_django():
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "pytest_django",
            "--ds",
            "djproject.settings",
            "--noconftest",
            "-c",
            os.devnull,
            "--rootdir",
            str(SITE),
            "-p",
            "no:cacheprovider",
            "shop/tests_pytest.py",
        ],
        cwd=SITE,
        env=manage_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout, run.stdout
