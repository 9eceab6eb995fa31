"""Reads of alerts, and the fleet-wide counts that involve them."""

from __future__ import annotations

from typing import Any, TypedDict

from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from alerts.events import alert_event
from alerts.models import Alert, AlertStatus, Severity
from hosts import selectors as host_selectors
from sysmanage.permissions import HostScope
from sysmanage.protocol import iso
from sysmanage.topics import NOBODY, Filters, Viewer, snapshot_list


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


#: The ``action`` a ``system_alerts`` snapshot gives an active alert: the step that left
#: it in its state (an open alert whose severity changed since says ``raised`` too).
CURRENT_ACTION: dict[str, str] = {
    AlertStatus.OPEN: "raised",
    AlertStatus.ACKNOWLEDGED: "acknowledged",
}


def alert_snapshot(filters: Filters, viewer: Viewer = NOBODY) -> dict[str, Any]:
    """The ``system_alerts`` snapshot: the unresolved (open or acknowledged) alerts that
    match the subscription's ``severity`` and ``host_id`` filters, newest first, each as
    its ``system_alerts`` event shows it (``sysmanage.topics.snapshot_list``)."""
    severity = filters.get("severity")
    rows = alert_list(
        severity=list(severity) if severity else None,
        status=list(Alert.ACTIVE_STATUSES),
        host_id=filters.get("host_id"),
    )
    if viewer.scope is not None:  # alerts of the hosts the viewer sees, and about no host
        rows = rows.filter(Q(host_id__in=viewer.scope) | Q(host__isnull=True))
    return snapshot_list(
        "system_alerts",
        "alerts",
        rows,
        lambda alert: alert_event(alert, CURRENT_ACTION[alert.status]).data(),
        filters,
        viewer,
    )


class FleetStats(TypedDict):
    """The ``fleet_status`` figures."""

    total_hosts: int
    online_hosts: int
    offline_hosts: int
    unknown_hosts: int
    hosts_with_alerts: int
    pending_operations: int
    hosts_with_security_updates: int
    hosts_needing_reboot: int
    last_updated: str


def fleet_stats(scope: HostScope = None) -> FleetStats:
    """The ``fleet_status`` figures, read from the database: over the hosts in ``scope``
    (None: every host)."""
    alerting = Alert.objects.filter(status__in=Alert.ACTIVE_STATUSES, host__isnull=False)
    if scope is not None:
        alerting = alerting.filter(host_id__in=scope)
    hosts_with_alerts = alerting.values("host_id").distinct().count()
    counts = host_selectors.host_counts(scope)
    patches = host_selectors.patch_counts(scope)
    return {
        "total_hosts": counts["total_hosts"],
        "online_hosts": counts["online_hosts"],
        "offline_hosts": counts["offline_hosts"],
        "unknown_hosts": counts["unknown_hosts"],
        "hosts_with_alerts": hosts_with_alerts,
        "pending_operations": host_selectors.pending_operation_count(scope),
        "hosts_with_security_updates": patches["hosts_with_security_updates"],
        "hosts_needing_reboot": patches["hosts_needing_reboot"],
        "last_updated": iso(timezone.now()),
    }


def fleet_snapshot(filters: Filters, viewer: Viewer = NOBODY) -> dict[str, Any]:
    """The ``fleet_status`` snapshot: the figures, counted over the hosts ``viewer`` sees
    (the channel has no filters)."""
    return dict(fleet_stats(viewer.scope))


def alert_severity_counts(
    statuses: tuple[str, ...] = Alert.ACTIVE_STATUSES, *, scope: HostScope = None
) -> dict[str, int]:
    """Alerts in ``statuses`` (by default the active ones: open or acknowledged) per
    severity, of the hosts in ``scope`` and about no host (None: all); every severity is
    present."""
    alerts = Alert.objects.filter(status__in=statuses)
    if scope is not None:
        alerts = alerts.filter(Q(host_id__in=scope) | Q(host__isnull=True))
    counts = dict(alerts.values_list("severity").annotate(count=Count("id")).order_by())
    return {severity: counts.get(severity, 0) for severity in Severity.values}
