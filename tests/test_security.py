"""Forged rows never run (reliability.md R25): a real worker process against forged payloads,
and forged result/exception columns read through Task.result / Task.exception.

Each forged pickle, if it were ever unpickled, would create a marker file through
`os.system`; the tests prove the file never appears and the task fails without a retry.
"""

from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

import dbqueue
from dbqueue import schema, serializer, worker
from tests import jobs

OTHER_KEY = b"an-attacker-key-that-is-long-enough-to-be-accepted"


class Touch:
    """Unpickling this runs `touch <path>`: the classic malicious pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def marker(tmp_path: Path) -> Path:
    return tmp_path / f"pwned-{uuid.uuid4().hex}"


def flip_bit(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def set_columns(db, task_id: int, **values) -> None:
    with db.engine.begin() as conn:
        conn.execute(sa.update(schema.tasks).where(schema.tasks.c.id == task_id).values(**values))


def forged_payload(db, variant: str, path: Path) -> tuple[str, bytes]:
    """(handler, payload) of a forged row whose pickle would touch `path` if unpickled."""
    handler = "tests.jobs:noop"
    evil = pickle.dumps((("func",), (Touch(path),), {}))
    if variant == "unsigned":
        return handler, evil
    if variant == "unsigned-with-header":
        # the right version byte and our real key id in front of a raw pickle
        key_id = serializer.Keyring.key_id(db.settings.keyring().current)
        return handler, serializer.VERSION + key_id + b"\0" * 32 + evil
    if variant == "other-key":
        return handler, serializer.sign(serializer.Keyring(OTHER_KEY), "payload", handler, evil)
    if variant == "flipped-bit":
        signed = serializer.sign(db.settings.keyring(), "payload", handler, evil)
        return handler, flip_bit(signed, 20)  # inside the MAC: the pickle is intact
    if variant == "other-handler":
        # validly signed for tests.jobs:echo, pasted into a row that says tests.jobs:noop
        return handler, serializer.sign(db.settings.keyring(), "payload", "tests.jobs:echo", evil)
    if variant == "other-purpose":
        return handler, serializer.sign(db.settings.keyring(), "result", handler, evil)
    if variant == "not-allow-listed":
        # validly signed with the real key, but os:system is outside DBQUEUE_ALLOWED_MODULES;
        # the kwargs would also touch the file if the payload were unpickled before the check
        body = pickle.dumps((("func",), (f"touch {path}",), {"x": Touch(path)}))
        return "os:system", serializer.sign(db.settings.keyring(), "payload", "os:system", body)
    raise AssertionError(variant)


VARIANTS = [
    ("unsigned", "signature did not verify (purpose=payload): unknown envelope version"),
    ("unsigned-with-header", "signature did not verify (purpose=payload, key id="),
    ("other-key", "signed with a key this process does not have"),
    ("flipped-bit", "signature did not verify (purpose=payload, key id="),
    ("other-handler", "signature did not verify (purpose=payload, key id="),
    ("other-purpose", "signature did not verify (purpose=payload, key id="),
    ("not-allow-listed", "handler os:system is not allowed (DBQUEUE_ALLOWED_MODULES=tests)"),
]


def forge_rows(db, tmp_path: Path) -> list[tuple[dbqueue.Task, str, Path, dbqueue.Task]]:
    """One forged row per variant, each followed by an ordinary task."""
    rows = []
    for index, (variant, message) in enumerate(VARIANTS):
        path = marker(tmp_path)
        forged = dbqueue.enqueue(jobs.noop)
        handler, payload = forged_payload(db, variant, path)
        set_columns(db, forged.id, handler=handler, payload=payload)
        rows.append((forged, message, path, dbqueue.enqueue(jobs.add, args=(index, 1))))
    return rows


def assert_forged_rows_failed(rows) -> None:
    for forged, message, path, normal in rows:
        assert not path.exists(), f"the forged pickle ran: {path} exists"
        forged.refresh()
        assert forged.status is dbqueue.Status.FAILED, (forged, forged.error)
        assert forged.attempts == 1 and forged.max_attempts > 1  # failed at once, not retried
        assert message in forged.error
        assert forged.exception is not None and message in str(forged.exception)
        assert normal.refresh().status is dbqueue.Status.SUCCEEDED


def test_forged_payloads_never_run_in_a_real_workoff(db, monkeypatch):
    rows = forge_rows(db, db.tmp_path)
    monkeypatch.setenv("DBQUEUE_ALLOWED_MODULES", "tests")
    proc = db.cli("workoff", "--import", "tests.jobs")
    assert proc.returncode == 1, proc.stderr  # workoff exits 1 when a task failed
    n = len(VARIANTS)
    assert f"{n} succeeded, 0 retried, {n} failed" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr
    for _forged, message, _path, _normal in rows:
        assert message in proc.stderr  # each logged with its reason
    assert_forged_rows_failed(rows)
    assert [normal.result for *_, normal in rows] == [n + 1 for n in range(len(VARIANTS))]


def test_running_worker_fails_forged_rows_and_goes_on(db, monkeypatch):
    """A long-running `dbqueue work` meets forged rows, keeps polling, serves a later task."""
    rows = forge_rows(db, db.tmp_path)
    monkeypatch.setenv("DBQUEUE_ALLOWED_MODULES", "tests")
    proc = db.popen("work", "--import", "tests.jobs", "--sleep-delay", "0.1")
    try:
        db.wait_for(
            "SELECT count(*) FROM tasks WHERE status IN ('succeeded', 'failed')", len(rows) * 2
        )
        # the worker has gone idle and polled again; a task enqueued now still runs
        db.wait_for("SELECT count(*) FROM tasks WHERE status = 'running'", 0)
        late = dbqueue.enqueue(jobs.add, args=(1, 1))
        assert late.wait(timeout=30).result == 2
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert_forged_rows_failed(rows)
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'failed'") == len(VARIANTS)


def _finished_task(db, func=jobs.add, args=(1, 2)) -> dbqueue.Task:
    task = dbqueue.enqueue(func, args=args, max_attempts=1)
    worker.Worker(db.settings).work_off()
    return task.refresh()


RESULT_VARIANTS = ["unsigned", "other-key", "flipped-bit", "other-purpose", "other-handler"]


def forged_column(db, variant: str, purpose: str, handler: str, path: Path) -> bytes:
    evil = pickle.dumps(Touch(path))
    ring = db.settings.keyring()
    if variant == "unsigned":
        return evil
    if variant == "other-key":
        return serializer.sign(serializer.Keyring(OTHER_KEY), purpose, handler, evil)
    if variant == "flipped-bit":
        return flip_bit(serializer.sign(ring, purpose, handler, evil), 20)
    if variant == "other-purpose":
        other = "payload" if purpose != "payload" else "result"
        return serializer.sign(ring, other, handler, evil)
    if variant == "other-handler":
        return serializer.sign(ring, purpose, "tests.jobs:echo", evil)
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", RESULT_VARIANTS)
def test_forged_result_is_never_unpickled(db, variant):
    path = marker(db.tmp_path)
    task = _finished_task(db)
    assert task.result == 3
    set_columns(db, task.id, result=forged_column(db, variant, "result", task.handler, path))
    task.refresh()
    with pytest.raises(dbqueue.ResultNotStored, match="signature did not verify") as info:
        _ = task.result
    assert f"task {task.id}" in str(info.value)
    assert not path.exists()
    # a fresh handle, as another process would have, is no different
    with pytest.raises(dbqueue.ResultNotStored, match="signature did not verify"):
        _ = dbqueue.Task.get(task.id).result
    assert not path.exists()


@pytest.mark.parametrize("variant", RESULT_VARIANTS)
def test_forged_exception_is_never_unpickled(db, variant):
    path = marker(db.tmp_path)
    task = _finished_task(db, jobs.raise_value_error, ("real error",))
    assert isinstance(task.exception, ValueError)
    set_columns(db, task.id, exception=forged_column(db, variant, "exception", task.handler, path))
    task.refresh()
    with pytest.raises(dbqueue.ResultNotStored, match="signature did not verify"):
        _ = task.exception
    assert not path.exists()
    assert "ValueError: real error" in task.error  # the readable text is still there


def test_exception_is_not_rebuilt_from_names_in_the_error_text(db):
    """The error column is text for people; no class is looked up from it (CVE-2021-23727)."""
    path = marker(db.tmp_path)
    task = _finished_task(db, jobs.raise_value_error, ("x",))
    set_columns(
        db,
        task.id,
        exception=None,
        error=f"Traceback (most recent call last):\nos.system: touch {path}",
    )
    task.refresh()
    assert task.exception is None
    assert not path.exists()


def test_a_copied_envelope_only_verifies_where_it_was_signed(db):
    """Replay limit, documented in the README: a signed payload copied into a row with the
    same handler verifies (signing cannot stop someone who can write rows from re-running)."""
    first = dbqueue.enqueue(jobs.add, args=(2, 3))
    second = dbqueue.enqueue(jobs.add, args=(10, 10))
    other = dbqueue.enqueue(jobs.echo, args=("e",))
    payload = db.scalar("SELECT payload FROM tasks WHERE id = :id", id=first.id)
    set_columns(db, second.id, payload=bytes(payload))
    set_columns(db, other.id, payload=bytes(payload))
    worker.Worker(db.settings).work_off()
    assert second.refresh().result == 5  # same handler: a replay, which signing allows
    other.refresh()
    assert other.status is dbqueue.Status.FAILED
    assert "signature did not verify" in other.error
