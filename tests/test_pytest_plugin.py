"""The pytest plugin, as a user sees it: a real pytest run of an application's tests.

The inner run is a subprocess (the plugin is loaded through its `pytest11` entry point, as in
any project that installed dbqueue) against the outer test's database.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

CONFTEST = """
import pytest
import sqlalchemy as sa

import dbqueue


@pytest.fixture(autouse=True)
def empty_queue():
    settings = dbqueue.configure()  # DBQUEUE_DATABASE_URL: the test database
    with settings.get_engine().begin() as conn:
        conn.execute(sa.text("DELETE FROM tasks"))
    yield
    settings.get_engine().dispose()
"""

TESTS = """
import pytest

import dbqueue
from tests import jobs


def test_assert_and_refute_enqueued(assert_enqueued, refute_enqueued):
    dbqueue.enqueue(jobs.add, (1, 2), queue="math")
    jobs.send_mail("a@example.com")
    (task,) = assert_enqueued(jobs.add, args=(1, 2), queue="math")
    assert task.handler == "tests.jobs:add"
    assert_enqueued(jobs.add)
    assert_enqueued("tests.jobs:add", count=1)
    assert_enqueued(jobs.send_mail, args=["a@example.com"], kwargs={}, queue="mail")
    refute_enqueued(jobs.add, args=(2, 2))
    refute_enqueued(jobs.add, queue="default")
    refute_enqueued(jobs.noop)


def test_failures_say_what_was_queued(assert_enqueued, refute_enqueued):
    dbqueue.enqueue(jobs.add, (1, 3), kwargs={})
    with pytest.raises(AssertionError) as info:
        assert_enqueued(jobs.add, args=(1, 2))
    message = str(info.value)
    assert "expected a queued task tests.jobs:add with args=(1, 2), found 0" in message
    assert "args=(1, 3) kwargs={} queue='default'" in message
    with pytest.raises(AssertionError, match="expected 2 queued task"):
        assert_enqueued(jobs.add, count=2)
    with pytest.raises(AssertionError, match="expected no queued task tests.jobs:add, found 1"):
        refute_enqueued(jobs.add)
    with pytest.raises(AssertionError, match="Queued tasks of tests.jobs:noop: none"):
        assert_enqueued(jobs.noop)


def test_workoff_drains_the_queue_in_process(dbqueue_workoff, refute_enqueued):
    task = jobs.decorated_add(2, 3)
    failing = dbqueue.enqueue(jobs.raise_value_error, max_attempts=1)
    summary = dbqueue_workoff()
    assert (summary.succeeded, summary.failed) == (1, 1)
    assert task.refresh().result == 5
    assert "ValueError: boom" in failing.refresh().error
    refute_enqueued(jobs.decorated_add)


def test_workoff_of_some_queues(dbqueue_workoff, assert_enqueued):
    jobs.send_mail("b@example.com")
    dbqueue.enqueue(jobs.noop)
    assert dbqueue_workoff(["default"]).succeeded == 1
    assert_enqueued(jobs.send_mail, queue="mail")


def test_inline_runs_at_enqueue(dbqueue_inline, refute_enqueued):
    task = jobs.decorated_add(4, 5)
    assert task.status == "succeeded"
    assert task.result == 9
    refute_enqueued(jobs.decorated_add)


def test_inline_ends_with_its_test(assert_enqueued):
    jobs.decorated_add(1, 1)
    assert_enqueued(jobs.decorated_add, args=(1, 1))
"""


def test_plugin_fixtures_in_a_real_pytest_run(db):
    (db.tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (db.tmp_path / "test_app.py").write_text(textwrap.dedent(TESTS))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "error",
            "--durations=3",
            "test_app.py",
        ],
        cwd=db.tmp_path,
        env=db.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout


def test_fixtures_are_listed_with_their_help(tmp_path):
    """The entry point loads the plugin in any project, without configuration."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--fixtures", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for name in (
        "dbqueue_inline",
        "dbqueue_workoff",
        "assert_enqueued",
        "refute_enqueued",
        "dbqueue_published",
        "assert_published",
        "refute_published",
    ):
        assert name in result.stdout
