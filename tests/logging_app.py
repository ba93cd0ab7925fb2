"""A task module that configures logging when imported, as Django's setup() does
(logging.config.dictConfig closes every handler it finds, dbqueue's own included)."""

from __future__ import annotations

import logging.config

from dbqueue import handle_asynchronously

logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})


@handle_asynchronously
def double(x: int) -> int:
    return 2 * x
