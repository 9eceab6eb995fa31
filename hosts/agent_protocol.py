"""
Checking what agents send on ``/ws/agent`` (see ``docs/agent-protocol.md``).

Each function returns clean values or raises :class:`~sysmanage.protocol.ProtocolError`
with a code the agent can log; nothing an agent sends reaches a service unchecked.
"""

from __future__ import annotations

import ipaddress
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NotRequired, Required, TypedDict, TypeGuard, get_args

import orjson

from sysmanage.oversized import Oversized, mib
from sysmanage.protocol import ErrorCode, ProtocolError, load_object

#: What agents send.
AgentMessageType = Literal[
    "hello",
    "heartbeat",
    "metrics",
    "command_started",
    "command_result",
    "package_progress",
    "package_result",
    "patch_status",
]
#: What the server sends agents (errors are the seed protocol's error envelopes).
ServerMessageType = Literal["welcome", "ack", "run_command", "package_operation", "check_updates"]
#: The results the server acknowledges (``ack``'s ``kind``).
ResultKind = Literal["command_result", "package_result"]
#: How a command ends (``ExecutionStatus``'s final values).
CommandStatus = Literal["completed", "failed", "timeout"]
#: How a package operation ends (``OperationStatus``'s final values).
PackageStatus = Literal["completed", "failed"]
#: The ``id`` of a message: echoed back as it came.
MessageId = str | int | None
#: A message's ``data`` once it is known to be an object; its fields are still unchecked.
AgentData = Mapping[str, object]

AGENT_MESSAGE_TYPES: frozenset[AgentMessageType] = frozenset(get_args(AgentMessageType))
COMMAND_STATUSES: tuple[CommandStatus, ...] = get_args(CommandStatus)
PACKAGE_STATUSES: tuple[PackageStatus, ...] = get_args(PackageStatus)
#: The most characters of each output (stdout, stderr, a package manager's) stored.
MAX_OUTPUT_CHARS = 512 * 1024
#: The text facts a host reports, and the longest each may be.
TextFact = Literal["fqdn", "os_name", "os_version", "kernel", "architecture", "agent_version"]
TEXT_FACT_LIMITS: dict[TextFact, int] = {
    "fqdn": 255,
    "os_name": 100,
    "os_version": 100,
    "kernel": 200,
    "architecture": 50,
    "agent_version": 50,
}
HOSTNAME_LIMIT = 255
COUNT_FACTS: tuple[Literal["cpu_count", "memory_total"], ...] = ("cpu_count", "memory_total")


class HostFacts(TypedDict, total=False):
    """Facts about a host, checked, as :func:`hosts.services.host_agent_hello` and
    :func:`hosts.services.host_update_facts` store them (the enrolled name is not one)."""

    fqdn: str
    os_name: str
    os_version: str
    kernel: str
    architecture: str
    agent_version: str
    ip_addresses: list[str]
    cpu_count: int
    memory_total: int


class CommandOutputs(TypedDict, total=False):
    """Whether a command's ``stdout`` and ``stderr`` hold less than it wrote, and the
    size in bytes of what it wrote, when known."""

    stdout_truncated: bool
    stderr_truncated: bool
    stdout_bytes: int | None
    stderr_bytes: int | None


class CommandOutcome(CommandOutputs, total=False):
    """How a command ended, as :func:`hosts.services.command_finish` takes it (what an
    agent did not report, when the server ends a command itself, is left out)."""

    status: Required[CommandStatus]
    exit_code: int | None
    stdout: str
    stderr: str
    execution_time: float | None
    error: str


class PackageOutputs(TypedDict):
    """A package operation's output, whether it holds less than was written, and the
    size in bytes of what was written, when known."""

    output: str
    output_truncated: bool
    output_bytes: int | None


class PackageOutcome(PackageOutputs):
    """How a package operation ended, as
    :func:`hosts.services.package_operation_record_result` takes it."""

    status: PackageStatus
    message: str


@dataclass(frozen=True)
class KeptOutput:
    """An output as the server stores it: its text, whether that is less than was
    written, and the size in bytes of everything written, when known."""

    text: str
    truncated: bool
    size: int | None


def keep_output(value: str, *, truncated: bool = False, size: object = None) -> KeptOutput:
    """``value`` cut to :data:`MAX_OUTPUT_CHARS` characters (NUL replaced).

    ``truncated`` says that the agent already cut it, ``size`` is the whole output's
    size in bytes as the agent reported it.  Without a reported size, an output that
    arrived whole is measured; one the agent cut has no known size.
    """
    known = size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None
    if known is None and not truncated:
        known = len(value.encode("utf-8", "surrogatepass"))
    return KeptOutput(
        without_nul(value[:MAX_OUTPUT_CHARS]), truncated or len(value) > MAX_OUTPUT_CHARS, known
    )


class WelcomeData(TypedDict):
    """``welcome``: the answer to ``hello``."""

    host_id: str
    heartbeat_interval: int
    metrics_interval: int
    server_time: str


class AckData(TypedDict):
    """``ack``: a result is stored."""

    kind: ResultKind
    ref: str


class RunCommandData(TypedDict):
    """``run_command``: a command to run."""

    execution_id: str
    command: str
    timeout: int


class PackageOperationData(TypedDict):
    """``package_operation``: a package to install, update or remove."""

    operation_id: str
    operation: str
    package: str


class CheckUpdatesData(TypedDict):
    """``check_updates``: look at pending updates now and send ``patch_status``."""


ServerData = WelcomeData | AckData | RunCommandData | PackageOperationData | CheckUpdatesData


class ServerMessage(TypedDict):
    """A message the server sends an agent."""

    type: ServerMessageType
    data: ServerData
    timestamp: str
    id: NotRequired[str | int]


def _is_agent_type(value: object) -> TypeGuard[AgentMessageType]:
    return value in AGENT_MESSAGE_TYPES


def is_command_status(value: object) -> TypeGuard[CommandStatus]:
    """Whether ``value`` is a final status of a command."""
    return value in COMMAND_STATUSES


def is_package_status(value: object) -> TypeGuard[PackageStatus]:
    """Whether ``value`` is a final status of a package operation."""
    return value in PACKAGE_STATUSES


def parse_agent_message(text: str) -> tuple[AgentMessageType, AgentData, MessageId]:
    """Parse one agent frame into ``(type, data, id)``.

    Decoded by orjson: a fleet's reports are most of the frames the server parses, and
    it takes a fifth of the time of :func:`json.loads` for one (it refuses ``NaN`` and
    integers beyond 64 bits, which no agent message carries, as not JSON).
    """
    raw, id_ = load_object(text, orjson.loads)
    type_ = raw.get("type")
    if not _is_agent_type(type_):
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"Unknown agent message type {str(type_)[:64]!r}",
            id_=id_,
            allowed_types=sorted(AGENT_MESSAGE_TYPES),
        )
    data = raw.get("data") if raw.get("data") is not None else {}
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'data' must be an object", id_=id_)
    return type_, data, id_


def _invalid(why: str, id_: MessageId) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_MESSAGE, why, id_=id_)


def _fact_text(data: AgentData, key: str, limit: int, id_: MessageId) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(f"'{key}' must be a string", id_)
    return without_nul(value[:limit])


def clean_facts(data: AgentData, id_: MessageId) -> HostFacts:
    """The host facts of a ``hello``, trimmed and typed; unknown keys are ignored."""
    # The enrolled name stays; the reported one is informative (checked, not kept).
    _fact_text(data, "hostname", HOSTNAME_LIMIT, id_)
    facts: HostFacts = {}
    for key, limit in TEXT_FACT_LIMITS.items():
        value = _fact_text(data, key, limit, id_)
        if value is not None:
            facts[key] = value
    addresses = data.get("ip_addresses", [])
    if not isinstance(addresses, list):
        raise _invalid("'ip_addresses' must be a list", id_)
    cleaned = []
    for address in addresses[:64]:
        try:
            cleaned.append(str(ipaddress.ip_address(str(address).split("%")[0])))
        except ValueError:
            raise _invalid(f"{str(address)[:64]!r} is not an IP address", id_) from None
    facts["ip_addresses"] = cleaned
    for count in COUNT_FACTS:
        number = data.get(count)
        if number is not None:
            if isinstance(number, bool) or not isinstance(number, int) or number < 0:
                raise _invalid(f"'{count}' must be a non-negative integer", id_)
            facts[count] = number
    return facts


def reference(data: AgentData, key: str, id_: MessageId) -> str:
    """A UUID field (``execution_id`` / ``operation_id``) in canonical form."""
    try:
        return str(uuid.UUID(str(data.get(key))))
    except ValueError:
        raise _invalid(f"'{key}' must be a UUID", id_) from None


def _raw_text(data: AgentData, key: str, id_: MessageId) -> str:
    value = data.get(key) or ""
    if not isinstance(value, str):
        raise _invalid(f"'{key}' must be a string", id_)
    return value


def _text(data: AgentData, key: str, id_: MessageId) -> str:
    return without_nul(_raw_text(data, key, id_)[:MAX_OUTPUT_CHARS])


def _output(data: AgentData, key: str, id_: MessageId) -> KeptOutput:
    """Output ``key`` with its ``<key>_truncated`` and ``<key>_bytes`` fields."""
    return keep_output(
        _raw_text(data, key, id_),
        truncated=bool(data.get(f"{key}_truncated")),
        size=data.get(f"{key}_bytes"),
    )


def without_nul(text: str) -> str:
    """``text`` with NUL characters replaced (PostgreSQL text columns cannot hold them)."""
    return text.replace("\x00", "\ufffd")


def clean_command_result(data: AgentData, id_: MessageId) -> CommandOutcome:
    """The fields of a ``command_result`` as :func:`hosts.services.command_finish` takes them."""
    status = data.get("status")
    if not is_command_status(status):
        raise _invalid("'status' must be completed, failed or timeout", id_)
    exit_code = data.get("exit_code")
    if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int)):
        raise _invalid("'exit_code' must be an integer or null", id_)
    elapsed = data.get("execution_time")
    if elapsed is not None and (
        isinstance(elapsed, bool) or not isinstance(elapsed, int | float) or elapsed < 0
    ):
        raise _invalid("'execution_time' must be a non-negative number", id_)
    stdout, stderr = _output(data, "stdout", id_), _output(data, "stderr", id_)
    notes = [
        f"{name} truncated by the agent"
        for name in ("stdout", "stderr")
        if data.get(f"{name}_truncated")
    ]
    error = "; ".join(filter(None, [_text(data, "error", id_), *notes]))
    return {
        "status": status,
        "exit_code": exit_code,
        "stdout": stdout.text,
        "stderr": stderr.text,
        "execution_time": round(float(elapsed), 3) if elapsed is not None else None,
        "error": error,
        **command_outputs(stdout, stderr),
    }


def command_outputs(stdout: KeptOutput, stderr: KeptOutput) -> CommandOutputs:
    """The truncation fields of a command's outcome."""
    return {
        "stdout_truncated": stdout.truncated,
        "stderr_truncated": stderr.truncated,
        "stdout_bytes": stdout.size,
        "stderr_bytes": stderr.size,
    }


def clean_progress(data: AgentData, id_: MessageId) -> tuple[int, str]:
    """``(progress, message)`` of a ``package_progress``."""
    progress = data.get("progress", 0)
    if isinstance(progress, bool) or not isinstance(progress, int | float):
        raise _invalid("'progress' must be a number from 0 to 100", id_)
    return max(0, min(100, int(progress))), _text(data, "message", id_)[:1000]


def clean_package_result(data: AgentData, id_: MessageId) -> PackageOutcome:
    """The fields of a ``package_result``."""
    status = data.get("status")
    if not is_package_status(status):
        raise _invalid("'status' must be completed or failed", id_)
    output = keep_output(
        str(data.get("output") or ""),
        truncated=bool(data.get("output_truncated")),
        size=data.get("output_bytes"),
    )
    message = without_nul(str(data.get("message") or "")[:1000])
    return {"status": status, "message": message, **package_outputs(output)}


def package_outputs(output: KeptOutput) -> PackageOutputs:
    """The output fields of a package operation's outcome."""
    return {
        "output": output.text,
        "output_truncated": output.truncated,
        "output_bytes": output.size,
    }


def result_too_large(message: Oversized, setting: str, what: str = "result") -> str:
    """Why ``message`` (a ``result``, or another ``what``) was not taken, and what to do
    about it (``setting`` names the server's limit of the endpoint)."""
    return (
        f"The {what} was larger than the server accepts ({mib(message.limit)}): "
        f"{mib(message.size)} were sent, and not read; raise {setting} (and Daphne's "
        "--websocket-max-message-size above it) or reduce the output"
    )


def log_oversized(
    logger: logging.Logger, hostname: str, message: Oversized, ended: Sequence[tuple[str, str]]
) -> None:
    """One line for a message over the limit: host, size, limit, and the work it ended
    (``(kind, ref)`` pairs)."""
    names = {"command_result": "command", "package_result": "package operation"}
    what = ", ".join(f"{names.get(kind, kind)} {ref}" for kind, ref in ended)
    logger.warning(
        "agent of %s sent a message of %d bytes, over the limit of %d bytes; not read, failed: %s",
        hostname,
        message.size,
        message.limit,
        what,
    )
