"""The alert model: something about a host that an operator should act on."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from hosts.models import Host


class Severity(models.TextChoices):
    """How urgent an alert is."""

    INFO = "info", "Info"
    WARNING = "warning", "Warning"
    CRITICAL = "critical", "Critical"


class AlertStatus(models.TextChoices):
    """Where an alert is in its life cycle."""

    OPEN = "open", "Open"
    ACKNOWLEDGED = "acknowledged", "Acknowledged"
    RESOLVED = "resolved", "Resolved"


class RuleMetric(models.TextChoices):
    """What an alert rule watches."""

    DISK = "disk_usage", "Disk usage (%), per mount point"
    MEMORY = "memory_usage", "Memory usage (%)"
    CPU = "cpu_usage", "CPU usage (%)"
    LOAD = "load_per_cpu", "1-minute load average per CPU"
    OFFLINE = "host_offline", "Host offline"
    REBOOT = "reboot_required", "Hours a host has needed a reboot"
    #: lower is worse: a rule's warning threshold is at least its critical one
    CERT_EXPIRY = "cert_expiry", "Days until a certificate expires"


#: The metrics whose alerts grow worse as the value falls.
LOWER_IS_WORSE = frozenset({RuleMetric.CERT_EXPIRY.value})


class AlertRule(models.Model):
    """A threshold on a metric (or host state) that raises, updates and resolves alerts."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100, unique=True)
    metric = models.CharField(max_length=20, choices=RuleMetric.choices)
    category = models.CharField(max_length=50)
    warning_threshold = models.FloatField(null=True, blank=True)
    critical_threshold = models.FloatField(null=True, blank=True)
    sustained_samples = models.PositiveIntegerField(
        default=1, help_text="Consecutive samples over a threshold before the alert is raised."
    )
    clear_margin = models.FloatField(
        default=5.0,
        help_text="How far below a threshold the value must fall before the "
        "alert is lowered or resolved, so that it does not flap.",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        """Thresholds in the order of the metric: critical at least the warning one,
        except for metrics where lower is worse (days until a certificate expires),
        where the warning threshold is at least the critical one."""
        warning, critical = self.warning_threshold, self.critical_threshold
        if warning is None or critical is None or self.metric == RuleMetric.OFFLINE:
            return
        if self.metric in LOWER_IS_WORSE and critical > warning:
            raise ValidationError(
                {
                    "critical_threshold": "Lower is worse for this metric: the critical "
                    "threshold must not be above the warning threshold."
                }
            )
        if self.metric not in LOWER_IS_WORSE and critical < warning:
            raise ValidationError(
                {"critical_threshold": "The critical threshold must not be below the warning one."}
            )


class Alert(models.Model):
    """One alert; open and acknowledged alerts are active, resolved ones are history."""

    ACTIVE_STATUSES = (AlertStatus.OPEN, AlertStatus.ACKNOWLEDGED)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    host = models.ForeignKey(
        Host, null=True, blank=True, on_delete=models.CASCADE, related_name="alerts"
    )
    severity = models.CharField(max_length=10, choices=Severity.choices, db_index=True)
    category = models.CharField(max_length=50, db_index=True)
    title = models.CharField(max_length=200)
    message = models.TextField(blank=True)
    status = models.CharField(
        max_length=12, choices=AlertStatus.choices, default=AlertStatus.OPEN, db_index=True
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    acknowledged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    resolved_at = models.DateTimeField(null=True, blank=True)
    rule = models.ForeignKey(
        AlertRule, null=True, blank=True, on_delete=models.SET_NULL, related_name="alerts"
    )
    # Which instance of the rule (a mount point for disk rules; empty otherwise).
    rule_key = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["host", "rule", "rule_key"],
                condition=models.Q(status__in=["open", "acknowledged"]),
                name="one_active_alert_per_host_rule",
            ),
        ]

    def __str__(self) -> str:
        return f"[{self.severity}] {self.title}"
