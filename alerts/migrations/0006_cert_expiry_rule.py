"""The "cert_expiry" rule metric, and a default rule: a warning when a certificate (other
than a CA certificate) expires within 30 days, critical within 7 or once expired
(editable, and removable, in the admin)."""

from django.apps.registry import Apps
from django.db import migrations, models
from django.db.backends.base.schema import BaseDatabaseSchemaEditor

RULE = "Certificate expiring"


def create_rule(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    AlertRule = apps.get_model("alerts", "AlertRule")
    AlertRule.objects.get_or_create(
        name=RULE,
        defaults={
            "metric": "cert_expiry",
            "category": "certificates",
            "warning_threshold": 30.0,
            "critical_threshold": 7.0,
            "sustained_samples": 1,
            "clear_margin": 0.0,
        },
    )


def remove_rule(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    apps.get_model("alerts", "AlertRule").objects.filter(name=RULE).delete()


class Migration(migrations.Migration):
    dependencies = [("alerts", "0005_reboot_rule")]

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
                    ("cert_expiry", "Days until a certificate expires"),
                ],
                max_length=20,
            ),
        ),
        migrations.RunPython(create_rule, remove_rule),
    ]
