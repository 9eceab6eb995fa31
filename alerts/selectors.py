"""Reads of alerts, and the fleet-wide counts that involve them."""

from __future__ import annotations

from typing import TypedDict

from django.db.models import Count, QuerySet
from django.utils import timezone

from alerts.models import Alert, Severity
from hosts import selectors as host_selectors
from sysmanage.protocol import iso


def alert_list(
    *,
    severity: list[str] | None = None,
    status: list[str] | None = None,
    host_id: str | None = None,
) -> QuerySet[Alert]:
    """Alerts, newest first, optionally narrowed by severity, status and host."""
    alerts = Alert.objects.select_related("host")
    if severity:
        alerts = alerts.filter(severity__in=severity)
    if status:
        alerts = alerts.filter(status__in=status)
    if host_id:
        alerts = alerts.filter(host_id=host_id)
    return alerts.order_by("-created_at")


class FleetStats(TypedDict):
    """The ``fleet_status`` figures."""

    total_hosts: int
    online_hosts: int
    offline_hosts: int
    hosts_with_alerts: int
    pending_operations: int
    last_updated: str


def fleet_stats(filters: object = None) -> FleetStats:
    """The ``fleet_status`` figures, read from the database (``filters``: those of a
    ``fleet_status`` subscription, which has none)."""
    hosts_with_alerts = (
        Alert.objects.filter(status__in=Alert.ACTIVE_STATUSES, host__isnull=False)
        .values("host_id")
        .distinct()
        .count()
    )
    counts = host_selectors.host_counts()
    return {
        "total_hosts": counts["total_hosts"],
        "online_hosts": counts["online_hosts"],
        "offline_hosts": counts["offline_hosts"],
        "hosts_with_alerts": hosts_with_alerts,
        "pending_operations": host_selectors.pending_operation_count(),
        "last_updated": iso(timezone.now()),
    }


def alert_severity_counts() -> dict[str, int]:
    """Active (open or acknowledged) alerts per severity; every severity is present."""
    counts = dict(
        Alert.objects.filter(status__in=Alert.ACTIVE_STATUSES)
        .values_list("severity")
        .annotate(count=Count("id"))
        .order_by()
    )
    return {severity: counts.get(severity, 0) for severity in Severity.values}
