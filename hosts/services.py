"""
Writes of the hosts app: every change to hosts, commands and package operations goes
through here, and each publishes its event after the transaction commits.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from hosts.events import (
    CommandExecutionUpdated,
    HostMetricsReported,
    HostStatusChanged,
    PackageOperationUpdated,
)
from hosts.models import (
    CommandExecution,
    ExecutionStatus,
    Host,
    HostStatus,
    OperationStatus,
    PackageOperation,
)
from sysmanage.events import publish
from sysmanage.fleet import fleet_changed
from sysmanage.protocol import iso, utc_now_iso

HOST_FACT_FIELDS = (
    "fqdn", "ip_addresses", "os_name", "os_version", "kernel", "architecture",
    "cpu_count", "memory_total", "agent_version",
)


def host_create(*, hostname: str, **facts: Any) -> Host:
    """Create a host (status unknown until its agent connects)."""
    unknown = set(facts) - set(HOST_FACT_FIELDS)
    if unknown:
        raise TypeError(f"unknown host fields: {', '.join(sorted(unknown))}")
    with transaction.atomic():
        host = Host.objects.create(hostname=hostname, **facts)
        fleet_changed()
    return host


def host_delete(*, host: Host) -> None:
    """Delete a host and everything recorded about it."""
    with transaction.atomic():
        host.delete()
        fleet_changed()


def host_set_status(*, host_id: Any, status: str, seen_at: datetime | None = None) -> Host:
    """Set a host's status; publish ``host_status`` (with the previous one) if it changed."""
    if status not in HostStatus.values:
        raise ValueError(f"unknown host status {status!r}")
    with transaction.atomic():
        host = Host.objects.select_for_update().get(id=host_id)
        previous = host.status
        host.status = status
        fields = ["status", "updated_at"]
        if status == HostStatus.ONLINE or seen_at is not None:
            host.last_seen = seen_at or timezone.now()
            fields.append("last_seen")
        host.save(update_fields=fields)
        if previous != status:
            publish(HostStatusChanged(
                host_id=str(host.id), hostname=host.hostname, status=status,
                previous_status=previous, timestamp=iso(timezone.now()) or utc_now_iso(),
            ))
            fleet_changed()
    return host


def host_report_metrics(*, host: Host, metrics: dict[str, Any],
                        timestamp: str | None = None) -> None:
    """Publish a host's live metrics on ``host_metrics`` (no database write)."""
    publish(HostMetricsReported(
        host_id=str(host.id), hostname=host.hostname, timestamp=timestamp or utc_now_iso(),
        metrics=metrics,
    ))


def _command_event(execution: CommandExecution) -> CommandExecutionUpdated:
    return CommandExecutionUpdated(
        execution_id=str(execution.id), host_id=str(execution.host_id),
        hostname=execution.host.hostname, command=execution.command, status=execution.status,
        exit_code=execution.exit_code, stdout=execution.stdout, stderr=execution.stderr,
        execution_time=execution.execution_time,
        requested_by=execution.requested_by.username if execution.requested_by else None,
        error=execution.error,
    )


def command_create(*, host: Host, command: str, timeout: int, user: Any,
                   request_id: str = "") -> CommandExecution:
    """Record a command a user asked to run; it starts as pending."""
    with transaction.atomic():
        execution = CommandExecution.objects.create(
            host=host, command=command, timeout=timeout, requested_by=user,
            request_id=request_id,
        )
        publish(_command_event(execution))
        fleet_changed()
    return execution


def command_finish(*, execution: CommandExecution, status: str, exit_code: int | None = None,
                   stdout: str = "", stderr: str = "", execution_time: float | None = None,
                   error: str = "") -> CommandExecution:
    """Record a command's end (completed, failed or timed out) and publish it."""
    if status not in (ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.TIMEOUT):
        raise ValueError(f"{status!r} is not a final status")
    with transaction.atomic():
        execution.status = status
        execution.exit_code = exit_code
        execution.stdout = stdout
        execution.stderr = stderr
        execution.execution_time = execution_time
        execution.error = error
        execution.finished_at = timezone.now()
        execution.save()
        publish(_command_event(execution))
        fleet_changed()
    return execution


def _operation_event(operation: PackageOperation) -> PackageOperationUpdated:
    return PackageOperationUpdated(
        execution_id=str(operation.id), host_id=str(operation.host_id),
        hostname=operation.host.hostname, operation=operation.operation,
        package=operation.package, status=operation.status, progress=operation.progress,
        message=operation.message,
    )


def package_operation_create(*, host: Host, operation: str, package: str,
                             user: Any) -> PackageOperation:
    """Record a package operation a user asked for; it starts as pending."""
    with transaction.atomic():
        record = PackageOperation.objects.create(
            host=host, operation=operation, package=package, requested_by=user,
        )
        publish(_operation_event(record))
        fleet_changed()
    return record


def package_operation_update(*, operation: PackageOperation, status: str, progress: int,
                             message: str = "", output: str | None = None) -> PackageOperation:
    """Record progress or the end of a package operation and publish it."""
    if status not in OperationStatus.values:
        raise ValueError(f"unknown operation status {status!r}")
    with transaction.atomic():
        operation.status = status
        operation.progress = max(0, min(100, progress))
        operation.message = message
        if output is not None:
            operation.output = output
        if status in (OperationStatus.COMPLETED, OperationStatus.FAILED):
            operation.finished_at = timezone.now()
        operation.save()
        publish(_operation_event(operation))
        if status in (OperationStatus.COMPLETED, OperationStatus.FAILED):
            fleet_changed()
    return operation
