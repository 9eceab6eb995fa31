"""Recording user activity; each record is published on ``user_activity``."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser
from django.db import transaction
from django.http import HttpRequest
from rest_framework.request import Request

from activity.events import UserActivityRecorded
from activity.models import UserActivity
from sysmanage.audit import AuditDetails
from sysmanage.events import publish
from sysmanage.protocol import iso

if TYPE_CHECKING:
    from sysmanage.models import User


def _clean_ip(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def activity_record(
    *,
    action: str,
    user: User | AnonymousUser | None = None,
    username: str | None = None,
    ip_address: str | None = None,
    user_agent: str = "",
    details: AuditDetails | None = None,
) -> UserActivity:
    """Store one activity record and publish it."""
    person = user if isinstance(user, get_user_model()) else None  # not an anonymous visitor
    name = username or (person.get_username() if person is not None else "") or "anonymous"
    with transaction.atomic():
        record = UserActivity.objects.create(
            user=person,
            username=name[:150],
            action=action,
            ip_address=_clean_ip(ip_address),
            user_agent=(user_agent or "")[:500],
            details=details or {},
        )
        publish(
            UserActivityRecorded(
                activity_id=str(record.id),
                user_id=str(person.pk) if person is not None else None,
                username=record.username,
                action=action,
                ip_address=record.ip_address,
                user_agent=record.user_agent,
                timestamp=iso(record.timestamp) or "",
                details=record.details,
            )
        )
    return record


def request_origin(request: HttpRequest | Request | None) -> tuple[str | None, str]:
    """``(ip_address, user_agent)`` of an HTTP request."""
    if request is None:
        return None, ""
    meta = getattr(request, "META", {})
    return meta.get("REMOTE_ADDR"), meta.get("HTTP_USER_AGENT", "")
