"""
Record logins and logouts made through Django's own views (admin, dashboards).

Django announces them only through its auth signals, so these receivers are the hook;
the work is done by :func:`activity.services.activity_record`.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.dispatch import receiver

from activity.services import activity_record, request_origin


@receiver(user_logged_in)
def record_login(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    """Called after a session login."""
    ip, agent = request_origin(request)
    activity_record(
        action="login",
        user=user,
        ip_address=ip,
        user_agent=agent,
        details={"via": "session", "path": getattr(request, "path", "")},
    )


@receiver(user_logged_out)
def record_logout(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    """Called after a session logout."""
    if user is None:
        return
    ip, agent = request_origin(request)
    activity_record(
        action="logout", user=user, ip_address=ip, user_agent=agent, details={"via": "session"}
    )


@receiver(user_login_failed)
def record_login_failure(
    sender: Any, credentials: dict[str, Any], request: Any = None, **kwargs: Any
) -> None:
    """Called after a failed login on any path (admin, token endpoint)."""
    ip, agent = request_origin(request)
    activity_record(
        action="login_failed",
        username=str(credentials.get("username", ""))[:150],
        ip_address=ip,
        user_agent=agent,
        details={"path": getattr(request, "path", "")},
    )
