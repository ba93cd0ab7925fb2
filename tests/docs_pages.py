"""Read the documentation's code the way a reader does, so tests can run it.

A page is a sequence of fenced blocks. Two kinds are runnable:

- ```python title="tasks.py"``` is a file the reader saves: its code is written to that name;
- ```console``` holds `$ command` lines, each followed by the output the reader should see.
  Each output line shown must appear in the command's output, in order (whitespace runs are
  one space; `…` stands for anything). `pip install` lines are skipped (dbqueue is installed
  already) and `export NAME=VALUE` sets a variable, which the test may substitute (a real
  database URL for the page's example one).

A page holding `<!-- runnable: ... -->` is run from that mark to its end, in a fresh directory
on a fresh SQLite database, by tests/test_docs.py. `<!-- recipe: PATH -->` before a
```python``` block says the block is an excerpt of PATH, a file a test runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

FENCE = re.compile(r"^```(\S*)(.*)$")
TITLE = re.compile(r'title="([^"]+)"')
RUNNABLE = "<!-- runnable:"  # a page that says so is run whole by tests/test_docs.py
RECIPE = re.compile(r"<!-- recipe: (\S+) -->\n```python\n(.*?)```", re.S)


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    title: str | None
    code: str
    section: str  # the heading above it


def blocks(markdown: str) -> list[Block]:
    """Every fenced block of a page, with its language, title and section heading."""
    found: list[Block] = []
    section = ""
    lines = iter(markdown.splitlines())
    for line in lines:
        if line.startswith("#"):
            section = line.lstrip("#").strip()
            continue
        match = FENCE.match(line)
        if not match:
            continue
        body: list[str] = []
        for inner in lines:
            if inner.startswith("```"):
                break
            body.append(inner)
        title = TITLE.search(match.group(2))
        found.append(
            Block(
                match.group(1), title.group(1) if title else None, "\n".join(body) + "\n", section
            )
        )
    return found


def runnable_blocks(markdown: str) -> list[Block]:
    """The blocks after the page's `<!-- runnable: ... -->` mark (none without one): what
    comes before it (a sketch, a production command) is not run."""
    if RUNNABLE not in markdown:
        return []
    before, _, after = markdown.partition(RUNNABLE)
    section = ""
    for line in before.splitlines():
        if line.startswith("#"):
            section = line.lstrip("#").strip()
    return blocks(f"# {section}\n" + after.partition("-->")[2])


def recipes(markdown: str) -> list[tuple[str, str]]:
    """(path, code) of each `<!-- recipe: PATH -->` block."""
    return RECIPE.findall(markdown)


def _pattern(shown: str) -> re.Pattern[str]:
    parts = [re.escape(part) for part in " ".join(shown.split()).split("…")]
    return re.compile(".*".join(parts))


def check_output(command: str, shown: list[str], output: str) -> None:
    """Each shown line matches a line of `output`, in order."""
    actual = [" ".join(line.split()) for line in output.splitlines()]
    position = 0
    for line in shown:
        pattern = _pattern(line)
        while position < len(actual) and not pattern.fullmatch(actual[position]):
            position += 1
        if position == len(actual):
            raise AssertionError(
                f"`{command}` did not print {line!r} (after the lines before it); "
                f"it printed:\n{output}"
            )
        position += 1


def run(
    page_blocks: Iterable[Block],
    cwd: Path,
    env: dict[str, str],
    substitute: Mapping[str, str] | None = None,
) -> None:
    """Save the page's files and run its console blocks, in page order, in `cwd`."""
    for block in page_blocks:
        if block.lang == "python" and block.title:
            path = cwd / block.title
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.code)
        elif block.lang == "console":
            for command, shown in _commands(block.code):
                _run_one(command, shown, cwd, env, substitute or {})


def _commands(code: str) -> list[tuple[str, list[str]]]:
    commands: list[tuple[str, list[str]]] = []
    for line in code.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif line.strip():
            assert commands, f"output before any command: {line!r}"
            commands[-1][1].append(line)
    return commands


def _run_one(
    command: str, shown: list[str], cwd: Path, env: dict[str, str], substitute: Mapping[str, str]
) -> None:
    if command.startswith("pip install"):
        return
    export = re.fullmatch(r"export (\w+)=(\S+)", command)
    if export:
        name, value = export.groups()
        env[name] = substitute.get(name, value)
        return
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, f"`{command}` exited {result.returncode}:\n{result.stderr}"
    check_output(command, shown, result.stdout)


def reader_env(home: Path) -> dict[str, str]:
    """A reader's shell: this Python's `python` and `dbqueue` first on PATH, no DBQUEUE_*
    setting (the page sets what it needs), a key file of its own under `home`."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("DBQUEUE_")}
    env.pop("PYTHONPATH", None)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env["XDG_CONFIG_HOME"] = str(home / "config")
    env["HOME"] = str(home)
    return env
