"""Recording user activity; each record is published on ``user_activity``."""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import TYPE_CHECKING

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser
from django.db import transaction
from django.db.models import Model, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from rest_framework.request import Request

from activity.events import UserActivityRecorded
from activity.models import LoginCounter, UserActivity
from alerts.models import Alert
from hosts.models import CommandExecution, MetricSample, PackageOperation
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


#: Rows deleted per transaction by :func:`history_prune`.
PRUNE_BATCH = 1000


def history_prune(*, cutoff: datetime, dry_run: bool = False) -> dict[str, int]:
    """Delete history older than ``cutoff`` (or only count it): per-minute metrics,
    activity, finished commands and package operations, resolved alerts, and failed-login
    counters that lock nothing.  Unfinished work and open alerts are kept.  Returns the
    count per kind of record."""
    targets: dict[str, QuerySet[Model]] = {
        "metric samples": MetricSample.objects.filter(minute__lt=cutoff),
        "activity records": UserActivity.objects.filter(timestamp__lt=cutoff),
        "command executions": CommandExecution.objects.filter(created_at__lt=cutoff).exclude(
            status__in=CommandExecution.ACTIVE_STATUSES
        ),
        "package operations": PackageOperation.objects.filter(created_at__lt=cutoff).exclude(
            status__in=PackageOperation.ACTIVE_STATUSES
        ),
        "resolved alerts": Alert.objects.filter(status="resolved", updated_at__lt=cutoff),
        # Counters whose window began before the cutoff and that lock nothing now: they
        # would be started afresh at the next attempt anyway.
        "login counters": LoginCounter.objects.filter(window_started__lt=cutoff).exclude(
            blocked_until__gt=timezone.now()
        ),
    }
    return {
        label: queryset.count() if dry_run else _delete_in_batches(queryset)
        for label, queryset in targets.items()
    }


def _delete_in_batches(queryset: QuerySet[Model]) -> int:
    """Delete rows a batch at a time so that no long lock blocks a running server."""
    total = 0
    while True:
        ids = list(queryset.values_list("pk", flat=True)[:PRUNE_BATCH])
        if not ids:
            return total
        with transaction.atomic():
            deleted, _ = queryset.model._default_manager.filter(pk__in=ids).delete()
        total += deleted
