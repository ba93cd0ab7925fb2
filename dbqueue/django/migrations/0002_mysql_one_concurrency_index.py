"""dbqueue's alembic revision 0009: on MySQL/MariaDB, one concurrency index instead of two."""

from __future__ import annotations

from django.db import migrations

from dbqueue.django.schema import downgrade_to, upgrade_to

REVISION = "0009"  # dbqueue's alembic revision this migration brings the schema to


class Migration(migrations.Migration):
    dependencies = [("dbqueue", "0001_initial")]
    operations = [migrations.RunPython(upgrade_to(REVISION), downgrade_to("0008"))]
