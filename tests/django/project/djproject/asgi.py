"""The project's ASGI application, with dbqueue's dashboard at /dbqueue for staff only."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproject.settings")
django_application = get_asgi_application()

from dbqueue.django.dashboard import with_dashboard  # noqa: E402  (after Django's set-up)

application = with_dashboard(django_application, prefix="/dbqueue")
