"""Events of the alerts app."""

from __future__ import annotations

import dataclasses

from sysmanage.events import Event


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
