"""Reads of hosts, command executions and package operations."""
from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from hosts.models import CommandExecution, Host, HostStatus, PackageOperation
from sysmanage.protocol import iso


def host_list(*, search: str | None = None, status: str | None = None) -> QuerySet[Host]:
    """Hosts, optionally narrowed by a hostname/FQDN search and a status."""
    hosts = Host.objects.all()
    if search:
        hosts = hosts.filter(hostname__icontains=search) | hosts.filter(fqdn__icontains=search)
    if status:
        hosts = hosts.filter(status=status)
    return hosts.order_by("hostname")


def host_status_row(host: Host) -> dict[str, Any]:
    """One host as the ``host_status`` channel shows it."""
    return {
        "host_id": str(host.id),
        "hostname": host.hostname,
        "status": host.status,
        "last_seen": iso(host.last_seen),
    }


def host_status_snapshot(filters: dict[str, Any]) -> dict[str, Any]:
    """Current status of every host (or the one in ``filters``), for new subscribers."""
    hosts = Host.objects.all().order_by("hostname")
    if filters.get("host_id"):
        hosts = hosts.filter(id=filters["host_id"])
    return {"hosts": [host_status_row(h) for h in hosts]}


def host_id_problem(host_id: str) -> str | None:
    """Why ``host_id`` cannot be used as a filter (no such host), or None."""
    return None if Host.objects.filter(id=host_id).exists() else f"no host with id {host_id}"


def host_counts() -> dict[str, int]:
    """Total and online host counts."""
    total = Host.objects.count()
    online = Host.objects.filter(status=HostStatus.ONLINE).count()
    return {"total_hosts": total, "online_hosts": online, "offline_hosts": total - online}


def pending_operation_count() -> int:
    """Command executions and package operations not yet finished."""
    return (
        CommandExecution.objects.filter(status__in=CommandExecution.ACTIVE_STATUSES).count()
        + PackageOperation.objects.filter(status__in=PackageOperation.ACTIVE_STATUSES).count()
    )


def pending_work(host_id: str) -> tuple[list[CommandExecution], list[PackageOperation]]:
    """Commands and package operations queued for a host's agent and not yet finished."""
    commands = list(CommandExecution.objects.filter(
        host_id=host_id, status__in=CommandExecution.ACTIVE_STATUSES).order_by("created_at"))
    operations = list(PackageOperation.objects.filter(
        host_id=host_id, status__in=PackageOperation.ACTIVE_STATUSES).order_by("created_at"))
    return commands, operations


def host_for_token(token: str) -> Host | None:
    """The host whose current agent token is ``token``, if any."""
    from hosts.tokens import token_digest

    if not token:
        return None
    return Host.objects.filter(token_hash=token_digest(token)).first()


def metric_history(host_id: str, *, since: Any) -> list[dict[str, Any]]:
    """A host's per-minute metrics since ``since``, oldest first."""
    from hosts.models import MetricSample

    rows = MetricSample.objects.filter(host_id=host_id, minute__gte=since).order_by("minute")
    return [{"minute": iso(r.minute), "samples": r.samples, "cpu_usage": r.cpu_usage,
             "memory_usage": r.memory_usage, "disk_usage": r.disk_usage,
             "load_average": r.load_average} for r in rows]


def command_event_data(execution_id: Any) -> dict[str, Any]:
    """An execution as its ``command_execution`` events show it."""
    from hosts.events import command_event

    execution = CommandExecution.objects.select_related("host", "requested_by").get(
        id=execution_id)
    return command_event(execution).data()

