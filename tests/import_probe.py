"""Imported by `dbqueue workoff --import tests.import_probe` (tests/test_cold_start.py): each
process that imports it appends, at its exit, one JSON line to $DBQUEUE_TEST_PROBE with its
pid and the modules it had loaded, so a test sees which processes ran and what they loaded."""

from __future__ import annotations

import atexit
import json
import os
import sys


def _report() -> None:
    with open(os.environ["DBQUEUE_TEST_PROBE"], "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "modules": sorted(sys.modules)}) + "\n")


atexit.register(_report)
