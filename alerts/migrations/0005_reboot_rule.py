"""The "reboot_required" rule metric, and a default rule: a warning once a host has
needed a reboot for 24 hours (editable, and removable, in the admin)."""

from django.apps.registry import Apps
from django.db import migrations, models
from django.db.backends.base.schema import BaseDatabaseSchemaEditor

RULE = "Reboot pending"


def create_rule(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    AlertRule = apps.get_model("alerts", "AlertRule")
    AlertRule.objects.get_or_create(
        name=RULE,
        defaults={
            "metric": "reboot_required",
            "category": "patching",
            "warning_threshold": 24.0,
            "critical_threshold": None,
            "sustained_samples": 1,
            "clear_margin": 0.0,
        },
    )


def remove_rule(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    apps.get_model("alerts", "AlertRule").objects.filter(name=RULE).delete()


class Migration(migrations.Migration):
    dependencies = [("alerts", "0004_default_rules")]

    operations = [
        migrations.AlterField(
            model_name="alertrule",
            name="metric",
            field=models.CharField(
                choices=[
                    ("disk_usage", "Disk usage (%), per mount point"),
                    ("memory_usage", "Memory usage (%)"),
                    ("cpu_usage", "CPU usage (%)"),
                    ("load_per_cpu", "1-minute load average per CPU"),
                    ("host_offline", "Host offline"),
                    ("reboot_required", "Hours a host has needed a reboot"),
                ],
                max_length=20,
            ),
        ),
        migrations.RunPython(create_rule, remove_rule),
    ]
