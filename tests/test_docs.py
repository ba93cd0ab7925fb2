"""The documentation's code runs (issue 22): Getting started is executed as a reader would,
on SQLite and on PostgreSQL; the README's first task is the same code; every recipe shown is
the code of a file that a test runs; the configuration page names every setting the code reads.
The site itself is built with `mkdocs build --strict` by scripts/docs (run by scripts/test)."""

from __future__ import annotations

import re

import pytest

from tests import docs_pages
from tests.conftest import ROOT

DOCS = ROOT / "docs"
GETTING_STARTED = DOCS / "getting-started.md"
POSTGRESQL_SECTION = "Then PostgreSQL"


def page_blocks(path):
    return docs_pages.blocks(path.read_text())


def sqlite_part(blocks):
    return [b for b in blocks if b.section != POSTGRESQL_SECTION]


def test_getting_started_runs_on_sqlite(tmp_path):
    """Install aside, every file and command of the SQLite part, in a fresh directory with no
    DBQUEUE_* setting: the default SQLite file and a key file created on first use."""
    blocks = page_blocks(GETTING_STARTED)
    assert {b.title for b in blocks if b.title} == {"tasks.py", "enqueue.py", "result.py"}
    docs_pages.run(sqlite_part(blocks), tmp_path, docs_pages.reader_env(tmp_path))
    assert (tmp_path / "dbqueue.sqlite3").exists()
    assert (tmp_path / "config" / "dbqueue" / "key").exists()


@pytest.mark.postgresql_only
def test_getting_started_runs_on_postgresql(db, tmp_path):
    """The whole page, its PostgreSQL part on a real, empty PostgreSQL database (the page's
    example URL replaced by the test's)."""
    blocks = page_blocks(GETTING_STARTED)
    assert any(b.section == POSTGRESQL_SECTION and b.lang == "console" for b in blocks)
    work = tmp_path / "reader"
    work.mkdir()
    env = docs_pages.reader_env(work)
    docs_pages.run(blocks, work, env, substitute={"DBQUEUE_DATABASE_URL": db.url})
    assert env["DBQUEUE_DATABASE_URL"] == db.url
    assert db.rows("SELECT handler, status FROM tasks") == [("tasks:add", "succeeded")]


def test_the_readme_first_task_is_the_getting_started_code():
    """The README's files and commands are those of Getting started, which is run above."""
    readme = docs_pages.blocks((ROOT / "README.md").read_text())
    page = GETTING_STARTED.read_text()
    shown = [b for b in readme if b.section in ("Install", "A first task")]
    assert {b.title for b in shown if b.title} == {"tasks.py", "enqueue.py"}
    for block in shown:
        assert block.code.strip() in page, f"README block not in getting-started.md:\n{block.code}"


def test_every_recipe_shown_is_the_tested_code():
    """Each block marked `<!-- recipe: PATH -->` (docs pages and README) appears, line for
    line, in PATH; the Flask and FastAPI recipes are among them (tests/test_recipes.py runs
    both files)."""
    seen = set()
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for path, block in docs_pages.recipes(page.read_text()):
            source = (ROOT / path).read_text()
            assert block.strip() in source, f"{page.relative_to(ROOT)}: the {path} block differs"
            seen.add((page.relative_to(ROOT).as_posix(), path))
    assert {
        ("docs/guides/flask.md", "tests/recipes/flask_app.py"),
        ("docs/guides/fastapi.md", "tests/recipes/fastapi_app.py"),
        ("docs/operations/upgrading.md", "tests/test_alembic_side_by_side.py"),
        ("docs/guides/django.md", "tests/django/project/shop/views.py"),
    } <= seen


def test_the_configuration_page_names_every_setting_the_code_reads():
    documented = (DOCS / "reference" / "configuration.md").read_text()
    read = set()
    for path in (ROOT / "dbqueue").rglob("*.py"):
        read |= set(re.findall(r"\bDBQUEUE_[A-Z_]*[A-Z]\b", path.read_text()))
    missing = sorted(name for name in read if f"`{name}" not in documented)
    assert not missing, f"docs/reference/configuration.md does not name {missing}"


def test_output_lines_are_checked(tmp_path):
    """The runner fails on a command whose output differs from the page, or that fails."""
    env = docs_pages.reader_env(tmp_path)
    good = docs_pages.Block("console", None, "$ echo 'a  b'\na b\n$ echo xyz\nx…\n", "")
    docs_pages.run([good], tmp_path, env)
    with pytest.raises(AssertionError, match="did not print"):
        docs_pages.run([docs_pages.Block("console", None, "$ echo a\nb\n", "")], tmp_path, env)
    with pytest.raises(AssertionError, match="exited 3"):
        docs_pages.run([docs_pages.Block("console", None, "$ exit 3\n", "")], tmp_path, env)


RUNNABLE_PAGES = sorted(
    page.relative_to(DOCS).as_posix()
    for page in DOCS.rglob("*.md")
    if docs_pages.RUNNABLE in page.read_text()
)


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_runnable_page(page, tmp_path):
    """A page marked `<!-- runnable: ... -->` runs as a reader would run it: from the mark on,
    its files saved and its console sessions run in order in a fresh directory (SQLite, a key
    file of its own)."""
    blocks = docs_pages.runnable_blocks((DOCS / page).read_text())
    assert any(b.lang == "console" for b in blocks), f"{page} has nothing to run"
    docs_pages.run(blocks, tmp_path, docs_pages.reader_env(tmp_path))


def test_the_guides_run():
    """The guides whose code is meant to run are marked so (a mark lost is a test lost)."""
    assert {
        "guides/async.md",
        "guides/counters.md",
        "guides/event-bus.md",
        "guides/periodic.md",
        "guides/retries.md",
        "guides/scheduling.md",
        "guides/tasks.md",
        "guides/testing.md",
        "guides/unique-tasks.md",
        "hooks.md",
        "operations/dashboard.md",
        "operator-controls.md",
        "tracing.md",
    } <= set(RUNNABLE_PAGES)
