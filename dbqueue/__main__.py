"""`python -m dbqueue` runs the CLI."""

from __future__ import annotations

from dbqueue.cli import main

main()
