"""
Record logins and logouts made through Django's own views (admin, dashboards).

Django announces them only through its auth signals, so these receivers are the hook;
the work is done by :func:`activity.services.activity_record`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.dispatch import receiver
from django.http import HttpRequest

from activity.services import activity_record, request_origin

if TYPE_CHECKING:
    from sysmanage.models import User


@receiver(user_logged_in)
def record_login(sender: type[User], request: HttpRequest, user: User, **kwargs: object) -> None:
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
def record_logout(
    sender: type[User], request: HttpRequest, user: User | None, **kwargs: object
) -> None:
    """Called after a session logout."""
    if user is None:
        return
    ip, agent = request_origin(request)
    activity_record(
        action="logout", user=user, ip_address=ip, user_agent=agent, details={"via": "session"}
    )


@receiver(user_login_failed)
def record_login_failure(
    sender: str,
    credentials: Mapping[str, object],
    request: HttpRequest | None = None,
    **kwargs: object,
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
