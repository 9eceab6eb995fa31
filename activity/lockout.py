"""
Locking out repeated failed logins, by account and by address.

Counts come from the ``login_failed`` activity records, so every server process (and a
restarted one) sees the same lockouts.  Both the token endpoint and the session login
form ask :func:`lockout_remaining` before checking a password.
"""
from __future__ import annotations

import math
from datetime import timedelta

from django.conf import settings
from django.db.models import Max, QuerySet
from django.utils import timezone

from activity.models import UserActivity


def _remaining(failures: QuerySet[UserActivity], threshold: int) -> int:
    window_start = timezone.now() - timedelta(seconds=settings.LOGIN_LOCKOUT_WINDOW_SECONDS)
    recent = failures.filter(action="login_failed", timestamp__gte=window_start)
    if threshold <= 0 or recent.count() < threshold:
        return 0
    last = recent.aggregate(last=Max("timestamp"))["last"]
    until = last + timedelta(seconds=settings.LOGIN_LOCKOUT_SECONDS)
    return max(0, math.ceil((until - timezone.now()).total_seconds()))


def lockout_remaining(*, username: str | None, ip_address: str | None) -> int:
    """Seconds until ``username`` or ``ip_address`` may try again (0: not locked)."""
    by_user = _remaining(UserActivity.objects.filter(username=username),
                         settings.LOGIN_LOCKOUT_THRESHOLD) if username else 0
    by_address = _remaining(UserActivity.objects.filter(ip_address=ip_address),
                            settings.LOGIN_LOCKOUT_ADDRESS_THRESHOLD) if ip_address else 0
    return max(by_user, by_address)


def lockout_message(seconds: int) -> str:
    """The words shown to a locked-out person."""
    minutes = max(1, math.ceil(seconds / 60))
    return (f"Too many failed logins for this account or address. Try again in {minutes} "
            f"minute{'s' if minutes != 1 else ''}.")
