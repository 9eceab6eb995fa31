"""
``command`` messages on ``command_execution`` and ``package_operations``.

Each checks the request, checks permission, records the request with who made it, and
hands it to the host's agent.  A host that is unknown, offline or has no agent
connection gets the seed's ``COMMAND_FAILED`` at once.

The request waits in the process that took it, whichever process holds the host's
agent: for :class:`~hosts.events.AgentTook` (the agent was sent it) and, for a shell
command, :class:`~hosts.events.CommandFinished` (its result is stored).  Both are
control messages to every process; :func:`wait_for` and the two handlers below, which
``hosts.apps`` registers, tie them to the waiting request by an :class:`Awaited` key.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from django.conf import settings

from hosts import delivery, selectors, services
from hosts.delivery import WorkKind
from hosts.events import AgentTook, CommandFinished, PackageOperationFinished
from hosts.models import (
    PACKAGE_CHANGES,
    Host,
    HostStatus,
    OperationStatus,
    is_package_name,
)
from sysmanage import permissions
from sysmanage.audit import Actor
from sysmanage.commands import CommandContext
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.hub import Hub
from sysmanage.node import Node
from sysmanage.protocol import ClientMessage, ErrorCode, MessageType, ProtocolError, envelope
from sysmanage.topics import parse_uuid

T = TypeVar("T")

MAX_COMMAND_LENGTH = 4096
MAX_TIMEOUT = 3600


@dataclass(frozen=True)
class Awaited:
    """What a request waits for: its command or operation ``ref`` ``taken`` by an agent,
    or ``finished``."""

    what: Literal["taken", "finished"]
    ref: str


_WAITERS: dict[Awaited, list[asyncio.Future[None]]] = {}


def wait_for(key: Awaited) -> asyncio.Future[None]:
    """A future done when this process hears of ``key`` (start waiting before the
    request is recorded, so that the news cannot come first)."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    _WAITERS.setdefault(key, []).append(future)
    future.add_done_callback(lambda done: _forget(key, done))
    return future


def _resolve(key: Awaited) -> None:
    for future in _WAITERS.pop(key, ()):
        if not future.done():
            future.set_result(None)


def _forget(key: Awaited, future: asyncio.Future[None]) -> None:
    waiters = _WAITERS.get(key)
    if waiters and future in waiters:
        waiters.remove(future)
        if not waiters:
            del _WAITERS[key]


def on_agent_took(hub: Hub, message: AgentTook) -> None:
    """Control message ``agent_took``: wake the request waiting for ``ref`` here."""
    _resolve(Awaited("taken", message.ref))


def on_command_finished(hub: Hub, message: CommandFinished) -> None:
    """Control message ``command_finished``: wake the request waiting for its result here."""
    _resolve(Awaited("finished", message.execution_id))


def on_package_operation_finished(hub: Hub, message: PackageOperationFinished) -> None:
    """Control message ``package_operation_finished``: wake whoever waits for it here."""
    _resolve(Awaited("finished", message.operation_id))


@dataclass(frozen=True)
class CommandRequest:
    """A validated ``command`` on ``command_execution``."""

    host_id: str
    command: str
    timeout: int


def _invalid(message: ClientMessage, why: str) -> ProtocolError:
    return ProtocolError(
        ErrorCode.INVALID_COMMAND, why, channel=message.channel or "system", id_=message.id
    )


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
    if "\x00" in command:
        raise _invalid(message, "'command' must not contain NUL characters")
    timeout = message.data.get("timeout", 30)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 1 <= timeout <= MAX_TIMEOUT
    ):
        raise _invalid(message, f"'timeout' must be a number of seconds from 1 to {MAX_TIMEOUT}")
    return CommandRequest(host_id=host_id, command=command, timeout=int(timeout))


def _command_failed(
    message: ClientMessage, why: str, host_id: str, execution_id: str | None
) -> ProtocolError:
    return ProtocolError(
        ErrorCode.COMMAND_FAILED,
        why,
        channel=message.channel or "system",
        id_=message.id,
        host_id=host_id,
        execution_id=execution_id,
    )


#: What each kind of work needs, and how a refusal says it.
_RUN_RIGHTS = {
    "command": ("run_command", "You do not have permission to run commands on hosts"),
    "package": (
        "run_package_operation",
        "You do not have permission to run package operations on hosts",
    ),
}


def _may_run(user: Any, right: str, host_id: str) -> bool | None:
    """Whether ``user``, as the database has them now, may use ``right`` on the host; None
    when they may use it somewhere but do not see this host (answered as a host that does
    not exist).  Someone who may use it nowhere is refused whatever the host."""
    now = permissions.fresh(user)
    if permissions.may_on_host(now, right, host_id):
        return True
    if permissions.may_anywhere(now, right) and not permissions.may_on_host(now, "view", host_id):
        return None
    return False


async def _require_permission(
    context: CommandContext, message: ClientMessage, kind: str, host_id: str
) -> None:
    # As the database has the user now: the socket's user object is from connect time.
    right, refusal = _RUN_RIGHTS[kind]
    allowed = await database_sync_to_async(_may_run)(context.user, right, host_id)
    if allowed is None:
        raise _command_failed(message, "Host not found", host_id, None)
    if not allowed:
        raise ProtocolError(
            ErrorCode.PERMISSION_DENIED,
            refusal,
            channel=message.channel or "system",
            id_=message.id,
        )


@database_sync_to_async
def _get_host(host_id: str) -> Host | None:
    return Host.objects.filter(id=host_id).first()


async def _reachable_host(message: ClientMessage, host_id: str) -> Host:
    """The host, if it exists and its agent is online; else ``COMMAND_FAILED`` at once."""
    host = await _get_host(host_id)
    if host is None:
        raise _command_failed(message, "Host not found", host_id, None)
    return host


def _offline_reason(host: Host) -> str | None:
    if host.status != HostStatus.ONLINE:
        return f"Host not reachable: {host.hostname} is {host.status}"
    return None


def _delivery_window(host: Host) -> float:
    """How long a request waits for the host's agent to take it (its kind's policy)."""
    return delivery.policy_for(host.agent_kind).window()


async def _handed_over(ref: str, seconds: float) -> bool:
    """Wait until the server process holding the host's agent confirms it sent ``ref``."""
    try:
        await asyncio.wait_for(wait_for(Awaited("taken", ref)), seconds)
    except TimeoutError:
        return False
    return True


async def _sent_after_all(host: Host, kind: WorkKind, ref: str) -> bool:
    """For work no agent connection confirmed in time: True if one took it after all
    (then its result is awaited); else it is not delivered.  An agent kind with a queue
    of its own fails it there, atomically, so that it is delivered or failed, never both."""
    settle = delivery.policy_for(host.agent_kind).settle_untaken
    if settle is None:
        return False
    why = "Not delivered: the host's agent did not take it in time"
    return bool(await database_sync_to_async(settle)(kind, ref, why))


async def _undelivered(
    host: Host, kind: WorkKind, ref: str, taken: asyncio.Future[bool]
) -> str | None:
    """Make sure the host's agent got the recorded work ``ref``: None if it did, else
    why not, the work recorded as failed.  ``taken`` waits for the agent's confirmation;
    it was started before the work was recorded, so that no confirmation is missed."""
    why = _offline_reason(host)
    if why is None and not await taken and not await _sent_after_all(host, kind, ref):
        why = f"Host not reachable: its agent did not take the {kind}"
    if why is None:
        return None
    taken.cancel()
    if kind == "command":
        await _fail_command(ref, host, why)
    else:
        await database_sync_to_async(services.package_operation_record_result)(
            operation_id=ref, host_id=host.id, status=OperationStatus.FAILED, message=why, output=""
        )
    return why


async def _hand_over(
    message: ClientMessage, host: Host, kind: WorkKind, ref: str, taken: asyncio.Future[bool]
) -> None:
    """:func:`_undelivered`, raising ``COMMAND_FAILED`` if the work was not delivered."""
    why = await _undelivered(host, kind, ref, taken)
    if why is not None:
        raise _command_failed(message, why, str(host.id), ref)


class NotDelivered(Exception):
    """The host's agent never got the command or package operation ``ref`` (recorded as
    failed)."""

    def __init__(self, why: str, ref: str) -> None:
        super().__init__(why)
        self.why = why
        self.ref = ref


async def command_run_and_wait(
    *,
    host: Host,
    command: str,
    time_limit: int,
    user: Any,
    actor: Actor | None,
    request_id: str = "",
) -> dict[str, Any]:
    """Run ``command`` on ``host`` (its timeout ``time_limit`` seconds) and wait for its
    end: the command's event data as it ended (timed out if the agent never answers).
    Raises :class:`NotDelivered` if the host's agent never got it.  Permission is the
    caller's to check."""
    execution, finished = await _started(
        host,
        "command",
        lambda ref: services.command_create(
            host=host,
            command=command,
            timeout=time_limit,
            user=user,
            request_id=request_id,
            execution_id=ref,
            actor=actor,
        ),
    )
    return await _wait_for_result(finished, execution, host)


async def _started(
    host: Host, what: WorkKind, create: Callable[[str], T]
) -> tuple[T, asyncio.Future[Any]]:
    """Record new work on ``host`` with ``create`` (given its id) and wait until its agent
    took it: the record, and the end to await.  Raises :class:`NotDelivered` if the
    agent never got it."""
    await Node.for_running_loop()  # this process hears the control messages awaited
    ref = str(uuid.uuid4())
    taken = asyncio.ensure_future(_handed_over(ref, _delivery_window(host)))
    finished = wait_for(Awaited("finished", ref))
    record = await database_sync_to_async(create)(ref)
    why = await _undelivered(host, what, ref, taken)
    if why is not None:
        finished.cancel()
        raise NotDelivered(why, ref)
    return record, finished


async def handle_command(context: CommandContext, message: ClientMessage) -> None:
    """Run a shell command on a host (``command`` on ``command_execution``).

    Records the execution, hands it to the agent and answers with the seed's
    ``response`` when the result arrives (or ``timeout`` if it never does).
    """
    request = parse_command(message)
    await _require_permission(context, message, "command", request.host_id)
    host = await _reachable_host(message, request.host_id)
    try:
        data = await command_run_and_wait(
            host=host,
            command=request.command,
            time_limit=request.timeout,
            user=context.user,
            actor=context.actor,
            request_id=str(message.id or ""),
        )
    except NotDelivered as exc:
        raise _command_failed(message, exc.why, str(host.id), exc.ref) from None
    context.reply(
        envelope(MessageType.RESPONSE, "command_execution", _response_data(data), id_=message.id)
    )


async def _fail_command(execution_id: str, host: Host, why: str) -> None:
    await database_sync_to_async(services.command_record_result)(
        execution_id=execution_id,
        host_id=host.id,
        result={"status": "failed", "error": why},
    )


async def _wait_for_result(
    finished: asyncio.Future[None], execution: Any, host: Host
) -> dict[str, Any]:
    """``execution`` as it ended; times it out if the agent never answers."""
    limit = execution.timeout + settings.COMMAND_RESULT_GRACE_SECONDS
    try:
        await asyncio.wait_for(finished, limit)
    except TimeoutError:
        await database_sync_to_async(services.command_record_result)(
            execution_id=execution.id,
            host_id=host.id,
            result={"status": "timeout", "error": "No result from the agent in time"},
        )
    return await database_sync_to_async(selectors.command_event_data)(execution.id)


def _response_data(data: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "execution_id",
        "host_id",
        "hostname",
        "command",
        "status",
        "exit_code",
        "stdout",
        "stderr",
        "stdout_truncated",
        "stderr_truncated",
        "stdout_bytes",
        "stderr_bytes",
        "execution_time",
        "error",
    )
    return {key: data.get(key) for key in keys}


def parse_package_operation(message: ClientMessage) -> tuple[str, str, str]:
    """Validate the data of a package operation request: ``(host_id, operation, package)``."""
    host_id = _host_id(message)
    operation = message.data.get("operation")
    if operation not in PACKAGE_CHANGES:
        raise _invalid(message, "'operation' must be one of " + ", ".join(PACKAGE_CHANGES))
    package = message.data.get("package")
    if not is_package_name(package):
        raise _invalid(message, "'package' must be one package name")
    return host_id, operation, package


async def package_operation_run_and_wait(
    *,
    host: Host,
    operation: str,
    package: str,
    time_limit: int,
    user: Any,
    actor: Actor | None,
) -> dict[str, Any]:
    """Start a package operation on ``host`` and wait up to ``time_limit`` seconds for its
    end: the operation's event data as it is then (still ``in_progress`` if it has not
    ended; it goes on).  Raises :class:`NotDelivered` if the host's agent never got it.
    Permission is the caller's to check."""
    record, finished = await _started(
        host,
        "operation",
        lambda ref: services.package_operation_create(
            host=host,
            operation=operation,
            package=package,
            user=user,
            operation_id=ref,
            actor=actor,
        ),
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(finished, time_limit)
    return await database_sync_to_async(selectors.operation_event_data)(str(record.id))


async def handle_package_operation(context: CommandContext, message: ClientMessage) -> None:
    """Start a package operation (``command`` on ``package_operations``).

    Answers with a ``response`` once the agent has it; progress and the final status
    follow as ``package_operations`` events.
    """
    host_id, operation, package = parse_package_operation(message)
    await _require_permission(context, message, "package", host_id)
    host = await _reachable_host(message, host_id)
    await Node.for_running_loop()  # this process hears the control messages awaited
    operation_id = str(uuid.uuid4())
    taken = asyncio.ensure_future(_handed_over(operation_id, _delivery_window(host)))
    record = await database_sync_to_async(services.package_operation_create)(
        host=host,
        operation=operation,
        package=package,
        user=context.user,
        operation_id=operation_id,
        actor=context.actor,
    )
    await _hand_over(message, host, "operation", operation_id, taken)
    context.reply(
        envelope(
            MessageType.RESPONSE,
            "package_operations",
            {
                "execution_id": str(record.id),
                "host_id": str(host.id),
                "hostname": host.hostname,
                "operation": operation,
                "package": package,
                "status": "pending",
            },
            id_=message.id,
        )
    )
