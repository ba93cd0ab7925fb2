"""`python manage.py dbqueue work|workoff|status|...`: the `dbqueue` command, Django set up.

The same click commands as `dbqueue` (every option of theirs works), with the database taken
from the backend's `DATABASES` alias, the signing key the web process uses, and every worker
process importing dbqueue.django.boot (django.setup()) before it claims a task.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.tasks import DEFAULT_TASK_BACKEND_ALIAS, task_backends

_WORKERS = ("work", "workoff")


class Command(BaseCommand):
    help = (
        "Run dbqueue's command with this project's settings: work, workoff, status, ... "
        "(`manage.py dbqueue --help` lists them; options go after the command)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--backend",
            default=DEFAULT_TASK_BACKEND_ALIAS,
            help="The TASKS alias whose database and key to use (default: %(default)s).",
        )
        # dbqueue's own options that come before its command: argparse would refuse them
        # there, and after the command click would.
        parser.add_argument(
            "--log-level",
            choices=["debug", "info", "warning", "error"],
            type=str.lower,
            default="info",
            help="dbqueue's log lines at this level and above (default: %(default)s).",
        )
        parser.add_argument(
            "--log-format",
            choices=["text", "json"],
            default="text",
            help="dbqueue's log lines as text or JSON objects (default: %(default)s).",
        )
        parser.add_argument("dbqueue_args", nargs=argparse.REMAINDER, metavar="COMMAND ...")

    def handle(self, *args: Any, **options: Any) -> None:
        from dbqueue import cli
        from dbqueue.django.backend import TaskBackend

        backend = task_backends[options["backend"]]
        if not isinstance(backend, TaskBackend):
            raise CommandError(
                f"TASKS[{options['backend']!r}] is {type(backend).__name__}; set its BACKEND "
                "to 'dbqueue.django.TaskBackend' (or pass --backend)"
            )
        settings = backend.worker_settings()
        # Worker processes are spawned: they read the key (and Django's settings module)
        # from the environment they inherit.
        if settings.secret_key:
            os.environ["DBQUEUE_SECRET_KEY"] = settings.secret_key
        os.environ["DBQUEUE_SECRET_KEY_FALLBACKS"] = ",".join(settings.fallback_keys)
        argv = list(options["dbqueue_args"])
        if argv and argv[0] in _WORKERS:
            argv[1:1] = ["--import", "dbqueue.django.boot"]
        cli.main(
            [
                *("--database-url", settings.database_url),
                *("--log-level", options["log_level"], "--log-format", options["log_format"]),
                *argv,
            ]
        )
