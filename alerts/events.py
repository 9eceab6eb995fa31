"""Events of the alerts app."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from sysmanage.events import Event
from sysmanage.protocol import iso

if TYPE_CHECKING:
    from alerts.models import Alert


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlertChanged(Event):
    """An alert was raised, updated, acknowledged or resolved (``action`` says which)."""

    channel = "system_alerts"
    name = "alert.changed"

    alert_id: str
    action: str
    severity: str
    status: str
    title: str
    message: str
    host_id: str | None
    hostname: str | None
    category: str
    timestamp: str


def alert_event(alert: Alert, action: str) -> AlertChanged:
    """The event describing ``alert`` as it is now, after ``action`` (its host joined)."""
    return AlertChanged(
        alert_id=str(alert.id),
        action=action,
        severity=alert.severity,
        status=alert.status,
        title=alert.title,
        message=alert.message,
        host_id=str(alert.host_id) if alert.host_id else None,
        hostname=alert.host.hostname if alert.host else None,
        category=alert.category,
        timestamp=iso(alert.updated_at) or "",
    )
