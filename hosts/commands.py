"""
``command`` messages on ``command_execution`` and ``package_operations``.

Each checks the request, checks permission, records the request with who made it, and
hands it to the host's agent.  A host that is unknown, offline or has no agent
connection gets the seed's ``COMMAND_FAILED`` at once.
"""
from __future__ import annotations

from dataclasses import dataclass

from channels.db import database_sync_to_async

from hosts import agent_link, services
from hosts.models import ExecutionStatus, Host, HostStatus, OperationStatus, PackageOperationKind
from sysmanage import permissions
from sysmanage.commands import CommandContext
from sysmanage.protocol import ClientMessage, ErrorCode, ProtocolError
from sysmanage.topics import parse_uuid

MAX_COMMAND_LENGTH = 4096
MAX_TIMEOUT = 3600


@dataclass(frozen=True)
class CommandRequest:
    """A validated ``command`` on ``command_execution``."""

    host_id: str
    command: str
    timeout: int


def _invalid(message: ClientMessage, why: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_COMMAND, why, channel=message.channel or "system",
                         id_=message.id)


def _host_id(message: ClientMessage) -> str:
    try:
        return parse_uuid(message.data.get("host_id"))
    except ValueError as exc:
        raise _invalid(message, f"'host_id' {exc}") from None


def parse_command(message: ClientMessage) -> CommandRequest:
    """Validate the data of a shell command request."""
    host_id = _host_id(message)
    command = message.data.get("command")
    if not isinstance(command, str) or not command.strip():
        raise _invalid(message, "'command' must be a non-empty string")
    if len(command) > MAX_COMMAND_LENGTH:
        raise _invalid(message, f"'command' must be at most {MAX_COMMAND_LENGTH} characters")
    timeout = message.data.get("timeout", 30)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) \
            or not 1 <= timeout <= MAX_TIMEOUT:
        raise _invalid(message, f"'timeout' must be a number of seconds from 1 to {MAX_TIMEOUT}")
    return CommandRequest(host_id=host_id, command=command, timeout=int(timeout))


def _command_failed(message: ClientMessage, why: str, host_id: str,
                    execution_id: str | None) -> ProtocolError:
    return ProtocolError(ErrorCode.COMMAND_FAILED, why, channel=message.channel or "system",
                         id_=message.id, host_id=host_id, execution_id=execution_id)


async def _require_permission(context: CommandContext, message: ClientMessage) -> None:
    # has_perm reads the user's permissions from the database on first use.
    if not await database_sync_to_async(permissions.can_run_commands)(context.user):
        raise ProtocolError(
            ErrorCode.PERMISSION_DENIED, "You do not have permission to run commands on hosts",
            channel=message.channel or "system", id_=message.id)


@database_sync_to_async
def _get_host(host_id: str) -> Host | None:
    return Host.objects.filter(id=host_id).first()


def _unreachable_reason(host: Host) -> str | None:
    if host.status != HostStatus.ONLINE:
        return f"Host not reachable: {host.hostname} is {host.status}"
    if agent_link.connection_for(str(host.id)) is None:
        return f"Host not reachable: no agent connection for {host.hostname}"
    return None


async def handle_command(context: CommandContext, message: ClientMessage) -> None:
    """Run a shell command on a host (``command`` on ``command_execution``)."""
    request = parse_command(message)
    await _require_permission(context, message)
    host = await _get_host(request.host_id)
    if host is None:
        raise _command_failed(message, "Host not found", request.host_id, None)
    execution = await database_sync_to_async(services.command_create)(
        host=host, command=request.command, timeout=request.timeout, user=context.user,
        request_id=str(message.id or ""))
    why = _unreachable_reason(host)
    connection = agent_link.connection_for(str(host.id))
    if why is not None or connection is None:
        why = why or "Host not reachable"
        await database_sync_to_async(services.command_finish)(
            execution=execution, status=ExecutionStatus.FAILED, error=why)
        raise _command_failed(message, why, request.host_id, str(execution.id))
    await connection.run_command(execution)


def parse_package_operation(message: ClientMessage) -> tuple[str, str, str]:
    """Validate the data of a package operation request: ``(host_id, operation, package)``."""
    host_id = _host_id(message)
    operation = message.data.get("operation")
    if operation not in PackageOperationKind.values:
        raise _invalid(message, "'operation' must be one of "
                       + ", ".join(PackageOperationKind.values))
    package = message.data.get("package")
    if not isinstance(package, str) or not package.strip() or len(package) > 255 \
            or package.startswith("-") or any(c.isspace() for c in package):
        raise _invalid(message, "'package' must be one package name")
    return host_id, operation, package


async def handle_package_operation(context: CommandContext, message: ClientMessage) -> None:
    """Start a package operation on a host (``command`` on ``package_operations``)."""
    host_id, operation, package = parse_package_operation(message)
    await _require_permission(context, message)
    host = await _get_host(host_id)
    if host is None:
        raise _command_failed(message, "Host not found", host_id, None)
    record = await database_sync_to_async(services.package_operation_create)(
        host=host, operation=operation, package=package, user=context.user)
    why = _unreachable_reason(host)
    connection = agent_link.connection_for(str(host.id))
    if why is not None or connection is None:
        why = why or "Host not reachable"
        await database_sync_to_async(services.package_operation_update)(
            operation=record, status=OperationStatus.FAILED, progress=0, message=why)
        raise _command_failed(message, why, host_id, str(record.id))
    await connection.run_package_operation(record)
