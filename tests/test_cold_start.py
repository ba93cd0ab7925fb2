"""Cold start (issue 21): what `import dbqueue`, the common imports and the CLI load, checked
in fresh interpreters (the time itself is scripts/bench's and docs/performance.md's business).

`import dbqueue` loads the exceptions only; alembic, the bus, the counter caches, the
dashboard and croniter load when something uses them. Every public name still resolves, to
the same object as before (the functions `enqueue` and `periodic`, not their modules)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta

import dbqueue
from tests import jobs

NEVER_AT_START = ("alembic", "dbqueue.bus", "dbqueue.counters", "dbqueue.web", "croniter")


def loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `code`."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in NEVER_AT_START or m in NEVER_AT_START}


def test_import_dbqueue_loads_the_exceptions_only():
    modules = loaded_after("import dbqueue")
    assert {m for m in modules if m.startswith("dbqueue")} == {"dbqueue", "dbqueue.errors"}
    assert not {m for m in modules if m.split(".")[0] in ("sqlalchemy", "alembic", "click")}


def test_enqueueing_code_loads_no_alembic_bus_counters_dashboard_or_croniter():
    modules = loaded_after(
        "from dbqueue import enqueue, enqueue_many, handle_asynchronously, delay, schedule, "
        "Task, Status, Settings, configure, inline, enqueue_async, pause"
    )
    assert "dbqueue.enqueue" in modules and "sqlalchemy" in modules
    assert heavy(modules) == set()


def test_the_cli_help_loads_neither_sqlalchemy_nor_the_worker():
    modules = loaded_after(
        "from dbqueue.cli import cli\ntry:\n    cli(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert "click" in modules
    assert not {m for m in modules if m.split(".")[0] in ("sqlalchemy", "alembic")}
    assert "dbqueue.worker" not in modules and "dbqueue.supervisor" not in modules


def test_every_public_name_resolves_in_a_fresh_interpreter():
    names = json.dumps(dbqueue.__all__)
    modules = loaded_after(
        "import dbqueue, types\n"
        f"for name in {names}:\n"
        "    value = getattr(dbqueue, name)\n"
        "    assert not isinstance(value, types.ModuleType) or name in ('bus', 'counters'), name\n"
        "assert set(dbqueue.__all__) <= set(dir(dbqueue))\n"
        "from dbqueue import *"
    )
    assert "dbqueue.bus" in modules and "dbqueue.counters" in modules


def test_enqueue_and_periodic_stay_functions_whoever_imports_their_modules_first():
    loaded_after(
        "import dbqueue\n"
        "import dbqueue.enqueue\n"  # sets the package attribute to the module, unless kept
        "from dbqueue.periodic import Periodic\n"
        "import dbqueue.worker\n"
        "from dbqueue import enqueue, periodic\n"
        "assert callable(enqueue) and enqueue.__module__ == 'dbqueue.enqueue', enqueue\n"
        "assert callable(periodic) and periodic.__module__ == 'dbqueue.periodic', periodic\n"
        "assert dbqueue.enqueue is enqueue and dbqueue.periodic is periodic\n"
        "import importlib\n"
        "assert importlib.import_module('dbqueue.enqueue').build\n"
    )


def test_an_unknown_name_is_an_attribute_error():
    loaded_after(
        "import dbqueue\n"
        "try:\n"
        "    dbqueue.enqueu\n"
        "except AttributeError as exc:\n"
        "    assert \"no attribute 'enqueu'\" in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
        "assert not hasattr(dbqueue, 'Worker')\n"
    )


def _workoff_processes(db, tmp_path) -> list[dict[str, object]]:
    probe = tmp_path / "probe.jsonl"
    env = dict(db.env, DBQUEUE_TEST_PROBE=str(probe))
    done = subprocess.run(
        [sys.executable, "-m", "dbqueue", "workoff", "-c", "2", "--import", "tests.import_probe"],
        env=env,
        cwd=db.tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in probe.read_text().splitlines()]


def test_workoff_on_an_empty_queue_starts_no_worker_and_loads_no_alembic(db, tmp_path):
    dbqueue.schedule(timedelta(hours=1), jobs.noop)  # queued, not ready: nothing to run now
    (command,) = _workoff_processes(db, tmp_path)  # the command alone imported the module
    assert heavy(set(command["modules"])) == set()  # type: ignore[arg-type]


def test_workoff_with_a_ready_task_starts_its_workers(db, tmp_path):
    dbqueue.enqueue(jobs.noop)
    processes = _workoff_processes(db, tmp_path)
    assert len(processes) == 3  # the command and its two worker processes
    assert db.scalar("SELECT status FROM tasks") == "succeeded"
