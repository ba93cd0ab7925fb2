"""dbqueue's tables, as dbqueue's alembic revisions 0001 to 0008 create them."""

from __future__ import annotations

from django.db import migrations

from dbqueue.django.schema import downgrade_to, upgrade_to

REVISION = "0008"  # dbqueue's alembic revision this migration brings the schema to


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []
    operations = [migrations.RunPython(upgrade_to(REVISION), downgrade_to(None))]
