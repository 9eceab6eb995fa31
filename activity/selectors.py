"""Reads of the user activity log."""

from __future__ import annotations

import ipaddress
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from activity.models import UserActivity


def activity_recent(*, limit: int) -> list[UserActivity]:
    """The ``limit`` most recent activity records, newest first."""
    return list(UserActivity.objects.order_by("-timestamp")[:limit])


def login_address_familiar(*, username: str, ip_address: str | None) -> bool:
    """Whether ``username`` logged in from ``ip_address`` within ``LOGIN_FAMILIAR_DAYS``
    (such addresses are exempt from the slow-down of an account under attack)."""
    days = settings.LOGIN_FAMILIAR_DAYS
    try:
        address = str(ipaddress.ip_address(ip_address or ""))
    except ValueError:
        return False
    if days <= 0:
        return False
    since = timezone.now() - timedelta(days=days)
    return UserActivity.objects.filter(
        action="login", username=username, ip_address=address, timestamp__gte=since
    ).exists()
