"""Events of the hosts app, and its control messages about commands."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from sysmanage.control import Control
from sysmanage.events import Event

if TYPE_CHECKING:
    from hosts.metrics import Metrics
    from hosts.models import CommandExecution, PackageOperation
    from sysmanage.node import EventMessage


@dataclasses.dataclass(frozen=True, kw_only=True)
class HostStatusChanged(Event):
    """A host went online, offline or unknown."""

    channel = "host_status"
    name = "host.status_changed"

    host_id: str
    hostname: str
    status: str
    previous_status: str
    timestamp: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class HostMetricsReported(Event):
    """A host's agent reported live metrics."""

    channel = "host_metrics"
    name = "host.metrics_reported"

    host_id: str
    hostname: str
    timestamp: str
    metrics: Metrics
    cpu_count: int | None = None

    def data(self) -> dict[str, Any]:
        """The payload, its values as they are, not deep-copied as
        :meth:`~sysmanage.events.Event.data` does: a report's figures are built for it
        alone (:func:`hosts.metrics.clean_metrics`) and nothing changes them afterwards,
        and the copy cost more than the rest of publishing a report."""
        return {name: getattr(self, name) for name in _METRICS_FIELDS}

    def to_message(self) -> EventMessage:
        """The layer message, stamped with the report's own time (taken as it arrived)
        rather than the clock read again."""
        return {
            "type": "hub.event",
            "event": self.name,
            "channel": self.channel,
            "data": self.data(),
            "timestamp": self.timestamp,
        }


_METRICS_FIELDS = tuple(field.name for field in dataclasses.fields(HostMetricsReported))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommandExecutionUpdated(Event):
    """A command execution was created, started or finished."""

    channel = "command_execution"
    name = "command.updated"

    execution_id: str
    host_id: str
    hostname: str
    command: str
    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    #: whether ``stdout``/``stderr`` hold less than the command wrote
    stdout_truncated: bool
    stderr_truncated: bool
    #: the size in bytes of all the command wrote there, when known
    stdout_bytes: int | None
    stderr_bytes: int | None
    execution_time: float | None
    requested_by: str | None
    #: who may see ``command``, ``stdout``, ``stderr`` and ``error`` besides the holders of
    #: ``hosts.view_command_output``; never sent to clients (sysmanage.topics)
    requested_by_id: str | None
    error: str
    final: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackageOperationUpdated(Event):
    """A package operation was created, made progress or finished."""

    channel = "package_operations"
    name = "package_operation.updated"

    execution_id: str
    host_id: str
    hostname: str
    operation: str
    package: str
    status: str
    progress: int
    message: str
    #: whether the stored output holds less than the package manager wrote
    output_truncated: bool
    final: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class FleetRunProgress(Event):
    """A fleet run's progress: its counts, the hosts that started and the results of the
    hosts that ended since the last one.  Published at most every
    ``FLEET_RUN_PROGRESS_INTERVAL`` seconds per run while it runs, and once more when it
    ends (``final``)."""

    channel = "command_execution"
    name = "fleet_run.progress"

    run_id: str
    #: ``command`` or ``package`` (a package operation, ``command`` reading
    #: ``<operation> <package>``)
    kind: str
    state: str
    #: the command (shown only to those who may see its text, as for one command)
    command: str
    total: int
    #: ``queued``, ``running``, ``succeeded``, ``failed``, ``skipped``
    counts: dict[str, int]
    #: hosts that ended since the previous progress event: ``host_id``, ``hostname``,
    #: ``status`` (succeeded, failed, skipped), ``exit_code``, ``execution_id`` (a
    #: command's) or ``operation_id`` (a package operation's), ``reason``
    results: list[dict[str, Any]]
    #: hosts whose turn came since the previous progress event (``host_id``,
    #: ``hostname``): they are running now, unless ``results`` already says how they ended
    started: list[dict[str, Any]]
    reason: str
    requested_by: str | None
    #: who may see ``command`` (never sent to clients, as for one command)
    requested_by_id: str | None
    final: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentTook(Control):
    """An agent was sent the command or package operation ``ref`` (``hosts.commands``)."""

    action = "agent_took"

    ref: str
    host_id: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommandFinished(Control):
    """Command ``execution_id`` ended, its result stored (``hosts.commands``)."""

    action = "command_finished"

    execution_id: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackageOperationFinished(Control):
    """Package operation ``operation_id`` ended, its result stored (``hosts.commands``)."""

    action = "package_operation_finished"

    operation_id: str


def command_event(execution: CommandExecution) -> CommandExecutionUpdated:
    """The event describing ``execution`` as it is now."""
    return CommandExecutionUpdated(
        execution_id=str(execution.id),
        host_id=str(execution.host_id),
        hostname=execution.host.hostname,
        command=execution.command,
        status=execution.status,
        exit_code=execution.exit_code,
        stdout=execution.stdout,
        stderr=execution.stderr,
        stdout_truncated=execution.stdout_truncated,
        stderr_truncated=execution.stderr_truncated,
        stdout_bytes=execution.stdout_bytes,
        stderr_bytes=execution.stderr_bytes,
        execution_time=execution.execution_time,
        requested_by=execution.requested_by.username if execution.requested_by else None,
        requested_by_id=str(execution.requested_by_id) if execution.requested_by_id else None,
        error=execution.error,
        final=execution.status not in execution.ACTIVE_STATUSES,
    )


def operation_event(operation: PackageOperation) -> PackageOperationUpdated:
    """The event describing ``operation`` as it is now."""
    return PackageOperationUpdated(
        execution_id=str(operation.id),
        host_id=str(operation.host_id),
        hostname=operation.host.hostname,
        operation=operation.operation,
        package=operation.package,
        status=operation.status,
        progress=operation.progress,
        message=operation.message,
        output_truncated=operation.output_truncated,
        final=operation.status not in operation.ACTIVE_STATUSES,
    )
