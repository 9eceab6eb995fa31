"""Writes of alerts: raise, acknowledge, resolve; each publishes on ``system_alerts``."""

from __future__ import annotations

import uuid
from typing import Protocol

from django.db import IntegrityError, transaction
from django.utils import timezone

from alerts.events import alert_event
from alerts.models import Alert, AlertStatus, Severity
from hosts.models import Host
from sysmanage.audit import Actor, audit
from sysmanage.events import publish
from sysmanage.fleet import fleet_changed

#: An alert's (or rule's, or host's) id as callers hold it: a UUID or its text.
ModelId = uuid.UUID | str


class AlertStateError(Exception):
    """The alert cannot make the requested transition (e.g. resolving it twice)."""


class AlertTransition(Protocol):
    """A person's change of an alert's state (:func:`alert_acknowledge`,
    :func:`alert_resolve`); raises :class:`AlertStateError`."""

    def __call__(self, *, alert_id: ModelId, actor: Actor) -> Alert:
        """Make the change as ``actor`` and publish it."""


def _publish(alert: Alert, action: str) -> None:
    publish(alert_event(alert, action))
    fleet_changed()


def alert_raise(
    *, severity: str, category: str, title: str, message: str = "", host: Host | None = None
) -> Alert:
    """Open a new alert."""
    if severity not in Severity.values:
        raise ValueError(f"unknown severity {severity!r}")
    with transaction.atomic():
        alert = Alert.objects.create(
            severity=severity, category=category, title=title, message=message, host=host
        )
        _publish(alert, "raised")
    return alert


def alert_acknowledge(*, alert_id: ModelId, actor: Actor) -> Alert:
    """Acknowledge an open alert."""
    user = actor.user
    with transaction.atomic():
        alert = (
            Alert.objects.select_for_update(of=("self",)).select_related("host").get(id=alert_id)
        )
        if alert.status != AlertStatus.OPEN:
            raise AlertStateError(f"alert is {alert.status}, not open")
        alert.status = AlertStatus.ACKNOWLEDGED
        alert.acknowledged_by = user
        alert.acknowledged_at = timezone.now()
        alert.save()
        _publish(alert, "acknowledged")
        audit("alert_acknowledged", actor, alert_id=str(alert.id), title=alert.title)
    return alert


def alert_resolve(*, alert_id: ModelId, actor: Actor | None) -> Alert:
    """Resolve an open or acknowledged alert (``actor`` None when resolved automatically)."""
    user = actor.user if actor is not None else None
    with transaction.atomic():
        alert = (
            Alert.objects.select_for_update(of=("self",)).select_related("host").get(id=alert_id)
        )
        if alert.status == AlertStatus.RESOLVED:
            raise AlertStateError("alert is resolved already")
        alert.status = AlertStatus.RESOLVED
        alert.resolved_by = user
        alert.resolved_at = timezone.now()
        alert.save()
        _publish(alert, "resolved")
        audit("alert_resolved", actor, alert_id=str(alert.id), title=alert.title)
    return alert


def rule_alert_sync(
    *,
    host_id: ModelId,
    rule_id: ModelId,
    key: str,
    severity: str | None,
    title: str,
    message: str,
    category: str,
) -> Alert | None:
    """Make the active alert of (host, rule, key) match ``severity``; None resolves it.

    Raises the alert if there is none, updates its severity and text if it differs, and
    resolves it (automatically, by no one) when ``severity`` is None.
    """
    active_alerts = Alert.objects.filter(
        host_id=host_id, rule__pk=rule_id, rule_key=key, status__in=Alert.ACTIVE_STATUSES
    )
    if severity is None and not active_alerts.exists():
        return None  # nothing to resolve: no write transaction (hosts coming online)
    with transaction.atomic():
        active = (
            Alert.objects.select_for_update(of=("self",))
            .select_related("host")
            .filter(
                host_id=host_id, rule__pk=rule_id, rule_key=key, status__in=Alert.ACTIVE_STATUSES
            )
            .first()
        )
        if severity is None:
            return alert_resolve(alert_id=active.id, actor=None) if active else None
        if active is None:
            try:
                with transaction.atomic():
                    alert = Alert.objects.create(
                        host_id=host_id,
                        rule_id=rule_id,
                        rule_key=key,
                        severity=severity,
                        category=category,
                        title=title,
                        message=message,
                    )
            except IntegrityError:  # another process raised it a moment ago
                return None
            alert = Alert.objects.select_related("host").get(id=alert.id)
            _publish(alert, "raised")
            return alert
        if active.severity != severity:
            active.severity, active.title, active.message = severity, title, message
            active.save()
            _publish(active, "updated")
        return active
