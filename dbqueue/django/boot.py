"""Imported first by every worker process of `manage.py dbqueue work|workoff` (`--import`):
it sets Django up (DJANGO_SETTINGS_MODULE, which the command's environment carries into the
spawned children), so the project's apps, models and tasks import as in the web process."""

from __future__ import annotations

import django

django.setup()
