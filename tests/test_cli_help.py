"""`dbqueue --help` and each command's help read well: a one-line summary per command, named
placeholders (MODULE, SECONDS) rather than click's TEXT/FLOAT, every option explained."""

from __future__ import annotations

import re

import click
from click.testing import CliRunner

from dbqueue import cli


def help_text(*args: str) -> str:
    result = CliRunner().invoke(cli.cli, [*args, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def commands(group, prefix=()):
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name), command
        if hasattr(command, "commands"):
            yield from commands(command, (*prefix, name))


def test_top_level_help_lists_every_command_in_full():
    text = help_text()
    listed = text.split("Commands:")[1]
    for name in cli.cli.commands:
        line = next(line for line in listed.splitlines() if line.strip().startswith(name))
        assert not line.rstrip().endswith("..."), f"summary of {name} is cut: {line!r}"
    assert "dbqueue migrate" in text and "dbqueue COMMAND --help" in text


def test_each_command_help_names_its_placeholders_and_explains_its_options():
    for path, command in commands(cli.cli):
        text = help_text(*path)
        assert not re.search(r"\b(TEXT|FLOAT|INTEGER)\b", text), f"{path}: {text}"
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"dbqueue {' '.join(path)} {param.opts[0]} has no help"
