"""
Wiring of alert rules to the events of the hosts app.

Metrics reports are judged in memory by this process's :class:`~alerts.rules.RuleEngine`;
only verdicts reach the database.  Host status changes raise and resolve the "host
offline" alerts.  Both listeners run off the event loop (:func:`sysmanage.events.listen`).
A periodic check (:func:`check_reboots`) raises and resolves the "reboot pending" ones,
another (:func:`check_certificates`) those of certificates about to expire.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta
from typing import Any

from django.utils import timezone

from alerts import services
from alerts.models import Alert, AlertRule, RuleMetric
from alerts.rules import RuleEngine, RuleSpec, Verdict
from hosts import selectors as host_selectors
from hosts.certificates import alert_key, days_left
from hosts.models import Host
from sysmanage.events import defer

logger = logging.getLogger(__name__)

ENGINE = RuleEngine()
#: Not empty while a first load of the rules, asked for by a metrics report, is queued.
_LOADING: set[bool] = set()

TITLES = {
    "disk_usage": "High disk usage on {key}",
    "memory_usage": "High memory usage",
    "cpu_usage": "High CPU usage",
    "load_per_cpu": "High load",
}
MESSAGES = {
    "disk_usage": "Disk usage on {key} is {value:.1f}% ({severity} at {threshold:g}%)",
    "memory_usage": "Memory usage is {value:.1f}% ({severity} at {threshold:g}%)",
    "cpu_usage": "CPU usage is {value:.1f}% ({severity} at {threshold:g}%, "
    "sustained over {sustained} samples)",
    "load_per_cpu": "Load average is {value:.2f} per CPU ({severity} at {threshold:g})",
}


def reload_rules() -> None:
    """Read the enabled rules from the database (periodically and after edits), and
    forget the state of hosts that were deleted meanwhile."""
    ENGINE.set_rules([RuleSpec.from_model(r) for r in AlertRule.objects.filter(enabled=True)])
    forget_deleted_hosts()


def forget_deleted_hosts() -> None:
    """Drop the engine's state of hosts that no longer exist.

    A host is deleted in whichever process served the request, while its metrics were
    judged in the process holding its agent, so each process sweeps its own engine on
    the rules' reload interval instead of listening for the deletion.
    """
    known = {host_id: _as_uuid(host_id) for host_id in ENGINE.host_ids()}
    if not known:
        return
    ids = [pk for pk in known.values() if pk is not None]
    existing = set(Host.objects.filter(id__in=ids).values_list("id", flat=True))
    for host_id, pk in known.items():
        if pk not in existing:
            ENGINE.forget_host(host_id)


def _as_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def apply_verdicts(verdicts: list[Verdict]) -> None:
    """Write the engine's verdicts through the alert services."""
    for verdict in _worth_writing(verdicts):
        rule = verdict.rule
        threshold = rule.critical if verdict.severity == "critical" else rule.warning
        values = {
            "key": verdict.key,
            "value": verdict.value,
            "severity": verdict.severity,
            "threshold": threshold or 0,
            "sustained": rule.sustained,
        }
        services.rule_alert_sync(
            host_id=verdict.host_id,
            rule_id=rule.id,
            key=verdict.key,
            severity=verdict.severity,
            category=rule.category,
            title=TITLES[rule.metric].format(**values),
            message=MESSAGES[rule.metric].format(**values) if verdict.severity else "",
        )


def _worth_writing(verdicts: list[Verdict]) -> list[Verdict]:
    """Drop "no alert" verdicts where there is no active alert to resolve, in one query.

    After a start every host's first report yields such a verdict per rule and mount;
    checking them together keeps a fleet reconnecting at once from queueing thousands
    of transactions on the database thread.
    """
    clear = [v for v in verdicts if v.severity is None]
    if not clear:
        return verdicts
    active = {
        (str(host_id), str(rule_id), key)
        for host_id, rule_id, key in Alert.objects.filter(
            host_id__in={v.host_id for v in clear},
            rule_id__in={v.rule.id for v in clear},
            status__in=Alert.ACTIVE_STATUSES,
        ).values_list("host_id", "rule_id", "rule_key")
    }
    return [
        v for v in verdicts if v.severity is not None or (v.host_id, v.rule.id, v.key) in active
    ]


def on_metrics(data: dict[str, Any]) -> None:
    """Listener of ``host.metrics_reported`` (non-blocking): judge in memory, and leave
    the database work, loading the rules and writing verdicts, to :func:`defer`."""
    if ENGINE.rules is None:
        if not _LOADING:  # one load at a time, however many reports arrive meanwhile
            _LOADING.add(True)
            defer(_load_rules)
        if ENGINE.rules is None:  # loading in the background: this report is not judged
            return
    verdicts = ENGINE.observe(
        data["host_id"], data.get("hostname", ""), data.get("metrics") or {}, data.get("cpu_count")
    )
    if verdicts:
        defer(apply_verdicts, verdicts)


def _load_rules() -> None:
    try:
        reload_rules()
    finally:
        _LOADING.clear()


def on_status(data: dict[str, Any]) -> None:
    """Listener of ``host.status_changed`` (runs after commit, in a worker thread)."""
    rules = AlertRule.objects.filter(enabled=True, metric=RuleMetric.OFFLINE)
    offline = data["status"] == "offline"
    for rule in rules:
        severity = (
            "critical"
            if (rule.critical_threshold is not None or rule.warning_threshold is None)
            else "warning"
        )
        services.rule_alert_sync(
            host_id=data["host_id"],
            rule_id=rule.id,
            key="",
            severity=severity if offline else None,
            category=rule.category,
            title=f"Host offline: {data['hostname']}",
            message=f"{data['hostname']} went offline (was {data['previous_status']}) at "
            f"{data['timestamp']}",
        )


def check_reboots() -> None:
    """Raise, raise in severity and resolve the alerts of the ``reboot_required`` rules:
    a host that has needed a reboot for at least a threshold's hours (warning, then
    critical) has one; a host rebooted since (or reporting no need) has it resolved.
    Runs every ``ALERT_REBOOT_CHECK_SECONDS`` in each server process."""
    rules = list(AlertRule.objects.filter(enabled=True, metric=RuleMetric.REBOOT))
    if not rules:
        return
    now = timezone.now()
    waiting = {h.host_id: h for h in host_selectors.hosts_needing_reboot()}
    for rule in rules:
        alerted = set(
            Alert.objects.filter(rule=rule, status__in=Alert.ACTIVE_STATUSES).values_list(
                "host_id", flat=True
            )
        )
        for host_id in alerted | set(waiting):
            host = waiting.get(host_id)
            hours = (now - host.since).total_seconds() / 3600 if host is not None else 0.0
            _sync_reboot_alert(rule, host_id, host.hostname if host else "", hours)


def _sync_reboot_alert(rule: AlertRule, host_id: Any, hostname: str, hours: float) -> None:
    """Make the rule's alert of one host match ``hours`` of needing a reboot."""
    severity = None
    if rule.critical_threshold is not None and hours >= rule.critical_threshold:
        severity = "critical"
    elif rule.warning_threshold is not None and hours >= rule.warning_threshold:
        severity = "warning"
    services.rule_alert_sync(
        host_id=host_id,
        rule_id=rule.id,
        key="",
        severity=severity if hostname else None,
        category=rule.category,
        title=f"Reboot pending: {hostname}",
        message=f"{hostname} has needed a reboot for {hours:.1f} hours",
    )


def check_certificates() -> None:
    """Raise, raise in severity and resolve the alerts of the ``cert_expiry`` rules, one
    per host and certificate file (the alert's key): a certificate that expires within
    a threshold's days (warning, then critical; an expired one is critical) has one; a
    certificate renewed, removed or no longer reported has it resolved.  CA certificates
    (the trust store) are not judged.  Runs every ``ALERT_CERT_CHECK_SECONDS`` in each
    server process."""
    rules = list(AlertRule.objects.filter(enabled=True, metric=RuleMetric.CERT_EXPIRY))
    if not rules:
        return
    now = timezone.now()
    horizon = max(
        (t for rule in rules for t in (rule.warning_threshold, rule.critical_threshold) if t),
        default=0.0,
    )
    due = host_selectors.certificates_expiring(now + timedelta(days=max(0.0, horizon)))
    by_key = {(str(c.host_id), alert_key(c.file_path)): c for c in due}
    for rule in rules:
        alerted = {
            (str(host_id), key)
            for host_id, key in Alert.objects.filter(
                rule=rule, status__in=Alert.ACTIVE_STATUSES
            ).values_list("host_id", "rule_key")
        }
        for host_id, key in sorted(alerted | set(by_key)):
            cert = by_key.get((host_id, key))
            severity = certificate_severity(rule, cert.not_after, now) if cert else None
            if severity is None and (host_id, key) not in alerted:
                continue
            _sync_certificate_alert(rule, host_id, key, cert, severity, now)


def certificate_severity(rule: AlertRule, not_after: datetime, now: datetime) -> str | None:
    """The severity a ``cert_expiry`` rule gives a certificate expiring at ``not_after``:
    critical once expired or within the critical threshold's days, warning within the
    warning threshold's, else none."""
    left = days_left(not_after, now)
    if left < 0 or (rule.critical_threshold is not None and left <= rule.critical_threshold):
        return "critical"
    if rule.warning_threshold is not None and left <= rule.warning_threshold:
        return "warning"
    return None


def _sync_certificate_alert(
    rule: AlertRule,
    host_id: str,
    key: str,
    cert: host_selectors.CertificateDue | None,
    severity: str | None,
    now: datetime,
) -> None:
    if cert is None:
        services.rule_alert_sync(
            host_id=host_id,
            rule_id=rule.id,
            key=key,
            severity=None,
            category=rule.category,
            title="",
            message="",
        )
        return
    left = days_left(cert.not_after, now)
    label = cert.name or cert.file_path
    whole = int(left)  # whole days, toward zero, as the host page and the API count them
    if left < 0:
        title = f"Certificate expired: {label} on {cert.hostname}"
        when = f"expired {-whole} days ago" if whole else "expired today"
    else:
        title = f"Certificate expiring: {label} on {cert.hostname}"
        when = f"expires in {whole} days" if whole else "expires within a day"
    services.rule_alert_sync(
        host_id=host_id,
        rule_id=rule.id,
        key=key,
        severity=severity,
        category=rule.category,
        title=title[:200],
        message=f"{cert.file_path} on {cert.hostname} {when} "
        f"(not after {cert.not_after:%Y-%m-%d %H:%M} UTC)",
    )
