"""Periodic tasks for worker processes started by tests/test_periodic.py (`--import`).

Kept out of tests/jobs.py on purpose: @periodic registers at import, and a worker of any other
test that imported these would start enqueueing them into that test's database.
"""

from __future__ import annotations

import datetime as dt
import os

from dbqueue import periodic
from tests import jobs


@periodic(every=dt.timedelta(seconds=1))
def every_second() -> str:
    return jobs.record_run(os.environ["DBQUEUE_DATABASE_URL"], "every_second")


@periodic(cron="0 3 * * *", tz="Europe/Paris")
def nightly() -> None:
    return None
