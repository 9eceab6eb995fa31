"""``manage.py fleet_report``: a readable table of hosts, their status and open alerts."""

from __future__ import annotations

import json
from typing import Any, TypedDict

from django.core.management.base import BaseCommand, CommandParser
from django.db.models import Count, Q
from django.utils import timezone

from alerts.selectors import fleet_stats
from hosts.models import Host


class AlertCounts(TypedDict):
    """A host's open and acknowledged alerts per severity."""

    critical: int
    warning: int
    info: int


class HostRow(TypedDict):
    """One line of the report."""

    hostname: str
    status: str
    last_seen: str
    os: str
    alerts: AlertCounts


def _age(host: Host) -> str:
    if host.last_seen is None:
        return "never"
    seconds = int((timezone.now() - host.last_seen).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


class Command(BaseCommand):
    """Print the fleet: one line per host, then the totals."""

    help = "Print a table of hosts with status, last contact, OS and open alerts."

    def add_arguments(self, parser: CommandParser) -> None:
        """Options: status filter and JSON output."""
        parser.add_argument(
            "--status", choices=["online", "offline", "unknown"], help="only hosts in this status"
        )
        parser.add_argument("--json", action="store_true", help="print JSON instead")

    def handle(self, *args: Any, **options: Any) -> None:
        """Print the report."""
        active = Q(alerts__status__in=["open", "acknowledged"])
        hosts = Host.objects.annotate(
            critical=Count("alerts", filter=active & Q(alerts__severity="critical")),
            warning=Count("alerts", filter=active & Q(alerts__severity="warning")),
            info=Count("alerts", filter=active & Q(alerts__severity="info")),
        ).order_by("hostname")
        if options["status"]:
            hosts = hosts.filter(status=options["status"])
        rows = [
            HostRow(
                hostname=h.hostname,
                status=h.status,
                last_seen=_age(h),
                os=f"{h.os_name} {h.os_version}".strip() or "-",
                alerts=AlertCounts(critical=h.critical, warning=h.warning, info=h.info),
            )
            for h in hosts
        ]
        if options["json"]:
            self.stdout.write(json.dumps({"hosts": rows, "fleet": fleet_stats()}, indent=2))
            return
        self._table(rows)

    def _table(self, rows: list[HostRow]) -> None:
        header = ("HOST", "STATUS", "LAST SEEN", "OS", "CRIT", "WARN", "INFO")
        lines = [
            (
                r["hostname"],
                r["status"],
                r["last_seen"],
                r["os"],
                str(r["alerts"]["critical"]),
                str(r["alerts"]["warning"]),
                str(r["alerts"]["info"]),
            )
            for r in rows
        ]
        widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=False)]
        for line in (header, *lines):
            self.stdout.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))
        stats = fleet_stats()
        self.stdout.write(
            f"\n{stats['total_hosts']} hosts: {stats['online_hosts']} online, "
            f"{stats['offline_hosts'] - stats['unknown_hosts']} offline, "
            f"{stats['unknown_hosts']} unknown (never heard from); "
            f"{stats['hosts_with_alerts']} with open alerts; "
            f"{stats['pending_operations']} operations pending; "
            f"{stats['hosts_with_security_updates']} with security updates, "
            f"{stats['hosts_needing_reboot']} needing a reboot"
        )
