"""
Who may do what: the one place the WebSocket consumers and the REST API ask.
"""
from __future__ import annotations

from typing import Any

#: Channels only staff may subscribe to.
STAFF_CHANNELS = frozenset({"user_activity"})


def subscribe_denied_reason(user: Any, channel: str) -> str | None:
    """Return why ``user`` may not subscribe to ``channel``, or None when it may."""
    if user is None or not user.is_authenticated or not user.is_active:
        return "Authentication required"
    if channel in STAFF_CHANNELS and not user.is_staff:
        return f"Insufficient permissions for channel '{channel}'"
    return None


def can_run_commands(user: Any) -> bool:
    """Whether ``user`` may run commands and package operations on hosts."""
    return bool(
        user is not None
        and user.is_authenticated
        and user.is_active
        and (user.is_superuser or user.has_perm("sysmanage.run_command"))
    )


def can_manage_alerts(user: Any) -> bool:
    """Whether ``user`` may acknowledge, resolve or raise alerts."""
    return bool(
        user is not None
        and user.is_authenticated
        and user.is_active
        and (user.is_staff or user.has_perm("alerts.change_alert"))
    )


def can_view_activity(user: Any) -> bool:
    """Whether ``user`` may read the user activity log."""
    return bool(user is not None and user.is_authenticated and user.is_active and user.is_staff)
