"""The `dbqueue.django` app: its migrations create dbqueue's tables, its command runs workers."""

from __future__ import annotations

from django.apps import AppConfig


class DbqueueConfig(AppConfig):
    name = "dbqueue.django"
    label = "dbqueue"
    verbose_name = "dbqueue"
