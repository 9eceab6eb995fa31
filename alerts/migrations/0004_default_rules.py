"""The default alert rules; editable (and removable) in the admin."""
from django.db import migrations

DEFAULT_RULES = [
    # name, metric, category, warning, critical, sustained samples, clear margin
    ("Disk usage", "disk_usage", "disk_space", 85.0, 95.0, 1, 3.0),
    ("Memory usage", "memory_usage", "memory", 90.0, 97.0, 3, 5.0),
    ("CPU usage", "cpu_usage", "cpu", 90.0, 98.0, 5, 10.0),
    ("Load per CPU", "load_per_cpu", "load", 2.0, 4.0, 3, 0.5),
    ("Host offline", "host_offline", "availability", None, 1.0, 1, 0.0),
]


def create_rules(apps, schema_editor):
    AlertRule = apps.get_model("alerts", "AlertRule")
    for name, metric, category, warning, critical, sustained, margin in DEFAULT_RULES:
        AlertRule.objects.get_or_create(name=name, defaults={
            "metric": metric, "category": category, "warning_threshold": warning,
            "critical_threshold": critical, "sustained_samples": sustained,
            "clear_margin": margin})


def remove_rules(apps, schema_editor):
    AlertRule = apps.get_model("alerts", "AlertRule")
    AlertRule.objects.filter(name__in=[r[0] for r in DEFAULT_RULES]).delete()


class Migration(migrations.Migration):
    dependencies = [("alerts", "0003_alert_rules")]
    operations = [migrations.RunPython(create_rules, remove_rules)]
