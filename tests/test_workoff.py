"""`dbqueue workoff`: progress, summary, exit status, and structured log lines."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

import dbqueue
from dbqueue import database
from tests import jobs


def test_workoff_prints_progress_and_a_summary(db):
    dbqueue.enqueue_many(jobs.sleep, [(0.01,)] * 150)
    result = db.cli("workoff", "--import", "tests.jobs")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "workoff: 150 tasks in" in result.stdout
    assert "150 succeeded, 0 retried, 0 failed" in result.stdout
    progress = [line for line in result.stderr.splitlines() if line.startswith("workoff: ")]
    assert progress, result.stderr[-2000:]  # plain lines when stderr is not a terminal
    assert "ready" in progress[0]


def test_workoff_exits_non_zero_when_a_task_failed(db):
    dbqueue.enqueue(jobs.raise_value_error, max_attempts=1)
    dbqueue.enqueue(jobs.add, args=(1, 1))
    result = db.cli("workoff", "--import", "tests.jobs")
    assert result.returncode == 1
    assert "1 succeeded, 0 retried, 1 failed" in result.stdout


def test_json_log_lines_carry_the_task_fields(db):
    task = dbqueue.enqueue(jobs.add, args=(1, 2), queue="maths")
    result = db.cli("--log-format", "json", "workoff", "--import", "tests.jobs")
    assert result.returncode == 0
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    finished = [e for e in events if e.get("event") == "task_finished"]
    assert len(finished) == 1
    (event,) = finished
    assert event["task_id"] == task.id and event["handler"] == "tests.jobs:add"
    assert event["queue"] == "maths" and event["outcome"] == "succeeded"
    assert event["duration"] >= 0 and event["level"] == "info"


def test_status_prints_counts_per_queue_and_workers(db):
    dbqueue.enqueue_many(jobs.noop, [()] * 3, queue="mail")
    dbqueue.enqueue(jobs.noop, queue="images")
    result = db.cli("status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["queue", "queued", "running"]
    mail = next(line for line in lines if line.startswith("mail"))
    assert mail.split()[1] == "3"
    assert "workers: 0" in result.stdout


@pytest.mark.postgresql_only
def test_status_warns_about_a_transaction_holding_back_vacuum(db):
    with db.engine.connect() as holder:
        holder.execute(sa.text("SET application_name = 'long-report'"))
        holder.execute(sa.text("BEGIN ISOLATION LEVEL REPEATABLE READ"))
        holder.execute(sa.text("SELECT count(*) FROM tasks"))
        with db.engine.begin() as conn:
            rows = database.long_transactions(conn, older_than_seconds=0)
        assert any(r.application_name == "long-report" for r in rows)
        holder.rollback()
