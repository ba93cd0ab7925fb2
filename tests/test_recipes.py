"""The framework recipes of docs/guides/flask.md and fastapi.md, run: a request enqueues in its
own transaction, a real worker process runs the task, and a rolled-back request leaves no task
behind. tests/test_docs.py checks that the pages show these files' code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dbqueue import Status, Task


def workoff(db) -> subprocess.CompletedProcess[str]:
    """`dbqueue workoff` in a worker process that imports the recipe (DATABASE_URL for the app)."""
    return subprocess.run(
        [sys.executable, "-m", "dbqueue", "workoff", "--import", "tests.recipes"],
        env={**db.env, "DATABASE_URL": db.url},
        cwd=db.tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_flask_enqueue_commits_with_the_request(db, monkeypatch):
    from tests.recipes import flask_app

    monkeypatch.setenv("DATABASE_URL", db.url)
    flask_app.Base.metadata.create_all(db.engine)
    app = flask_app.create_app(db.url)
    try:
        client = app.test_client()
        created = client.post("/orders", json={"email": "ada@example.com"})
        assert created.status_code == 201, created.text
        refused = client.post("/orders", json={"email": "not-an-email"})
        assert refused.status_code == 422
    finally:
        with app.app_context():
            flask_app.db.engine.dispose()

    rows = db.rows("SELECT id, handler, queue, status FROM tasks")
    assert [(r.handler, r.queue, r.status) for r in rows] == [
        ("tests.recipes.flask_app:send_receipt", "mail", "queued")
    ]
    assert rows[0].id == created.json["task_id"]
    assert db.scalar("SELECT count(*) FROM orders") == 1

    result = workoff(db)
    assert result.returncode == 0, result.stdout + result.stderr
    assert Task.get(created.json["task_id"]).status is Status.SUCCEEDED
    assert db.scalar("SELECT receipt_sent FROM orders WHERE id = :id", id=created.json["id"])


@pytest.mark.slow
def test_fastapi_async_enqueue_commits_with_the_request(db, monkeypatch):
    from fastapi.testclient import TestClient

    from tests.recipes import fastapi_app

    monkeypatch.setenv("DATABASE_URL", db.url)
    fastapi_app.Base.metadata.create_all(db.engine)
    with TestClient(fastapi_app.create_app(db.url)) as client:
        created = client.post("/orders", json={"email": "grace@example.com"})
        assert created.status_code == 201, created.text
        refused = client.post("/orders", json={"email": "not-an-email"})
        assert refused.status_code == 422, refused.text

    rows = db.rows("SELECT id, handler, queue, status FROM tasks")
    assert [(r.handler, r.queue, r.status) for r in rows] == [
        ("tests.recipes.fastapi_app:send_receipt", "mail", "queued")
    ]
    assert rows[0].id == created.json()["task_id"]
    assert db.scalar("SELECT count(*) FROM orders") == 1

    result = workoff(db)
    assert result.returncode == 0, result.stdout + result.stderr
    assert Task.get(created.json()["task_id"]).status is Status.SUCCEEDED
    assert db.scalar("SELECT receipt_sent FROM orders WHERE id = :id", id=created.json()["id"])
