"""Events of the activity app."""

from __future__ import annotations

import dataclasses

from sysmanage.audit import AuditDetails
from sysmanage.events import Event


@dataclasses.dataclass(frozen=True, kw_only=True)
class UserActivityRecorded(Event):
    """A user did something worth recording (login, logout, a command...)."""

    channel = "user_activity"
    name = "user.activity"

    activity_id: str
    user_id: str | None
    username: str
    action: str
    ip_address: str | None
    user_agent: str
    timestamp: str
    details: AuditDetails
