"""Events of the hosts app."""
from __future__ import annotations

import dataclasses
from typing import Any

from sysmanage.events import Event


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
    metrics: dict[str, Any]


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
    execution_time: float | None
    requested_by: str | None
    error: str


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
