"""The alert model: something about a host that an operator should act on."""
from __future__ import annotations

import uuid

from django.conf import settings
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
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
        related_name="+",
    )
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
        related_name="+",
    )
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"[{self.severity}] {self.title}"
