"""The agent side of the ``/ws/agent`` protocol: envelopes, message types, close codes."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Generic, Literal, NotRequired, TypedDict, TypeVar, cast

#: Largest frame either side accepts (1 MiB).
MAX_FRAME_BYTES = 1 << 20
#: Results are trimmed so that their frame stays below this many bytes.
FRAME_BUDGET_BYTES = 1_000_000

#: Close code for a missing, unknown, rotated or revoked token.
CLOSE_AUTH_FAILED = 4001
#: Close code for a connection replaced by a newer one with the same token.
CLOSE_REPLACED = 4009
#: Close code the agent uses when it shuts down.
CLOSE_GOING_AWAY = 1001
#: Close code of a server process that drains before a restart: reconnect soon.
CLOSE_SERVICE_RESTART = 1012

# Agent -> server.
HELLO: Final = "hello"
HEARTBEAT: Final = "heartbeat"
METRICS: Final = "metrics"
COMMAND_STARTED: Final = "command_started"
COMMAND_RESULT: Final = "command_result"
PACKAGE_PROGRESS: Final = "package_progress"
PACKAGE_RESULT: Final = "package_result"
PATCH_STATUS: Final = "patch_status"

# Server -> agent.
WELCOME: Final = "welcome"
RUN_COMMAND: Final = "run_command"
PACKAGE_OPERATION: Final = "package_operation"
CHECK_UPDATES: Final = "check_updates"
ACK: Final = "ack"
ERROR: Final = "error"

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
#: The messages whose delivery the server acknowledges (``ack``'s ``kind``).
ResultKind = Literal["command_result", "package_result"]

#: The result kinds the server acknowledges, and the id field each one carries.
RESULT_ID_FIELDS: dict[ResultKind, str] = {
    COMMAND_RESULT: "execution_id",
    PACKAGE_RESULT: "operation_id",
}

MessageId = str | int | None
#: An ``execution_id`` or ``operation_id`` as the server sent it.
JobId = str | int

_Data = TypeVar("_Data")


class Envelope(TypedDict, Generic[_Data]):
    """Every agent message: its type, its data, when it was sent, and the ``id`` of the
    server message it answers (if any)."""

    type: AgentMessageType
    data: _Data
    timestamp: str
    id: NotRequired[str | int]


class HelloData(TypedDict):
    """``hello``: who this host is and what the agent can do."""

    hostname: str
    fqdn: str
    ip_addresses: list[str]
    os_name: str
    os_version: str
    kernel: str
    architecture: str
    cpu_count: int
    memory_total: int
    agent_version: str
    capabilities: list[str]


class HeartbeatData(TypedDict):
    """``heartbeat``: nothing but the envelope's timestamp."""


class Readings(TypedDict):
    """The figures of a ``metrics`` message, in percent (load: the 1, 5 and 15 minute
    averages)."""

    cpu_usage: float
    memory_usage: float
    disk_usage: dict[str, float]
    load_average: list[float]


class MetricsData(TypedDict):
    """``metrics``: the readings and when they were taken."""

    timestamp: str
    metrics: Readings


class CommandStartedData(TypedDict):
    """``command_started``: the command's process is running."""

    execution_id: JobId


CommandStatus = Literal["completed", "timeout", "failed"]


class CommandResultData(TypedDict):
    """``command_result``: how a command ended and what it printed."""

    execution_id: JobId
    status: CommandStatus
    exit_code: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    #: every byte the command wrote, kept or not
    stdout_bytes: int
    stderr_bytes: int
    execution_time: float
    error: str


class PackageProgressData(TypedDict):
    """``package_progress``: how far a package operation got, in percent."""

    operation_id: JobId
    progress: int
    message: str


PackageStatus = Literal["completed", "failed"]


class PackageResultData(TypedDict):
    """``package_result``: how a package operation ended and what it printed."""

    operation_id: JobId
    status: PackageStatus
    exit_code: int | None
    output: str
    output_truncated: bool
    #: every byte the package manager wrote, kept or not
    output_bytes: int
    message: str


class PendingUpdate(TypedDict):
    """One package with a newer version available."""

    name: str
    current: str
    available: str
    security: bool


class PatchStatusData(TypedDict):
    """``patch_status``: pending updates (None: the agent cannot list them), security
    updates first, and whether the host needs a reboot."""

    updates: list[PendingUpdate] | None
    update_count: int | None
    security_count: int | None
    reboot_required: bool | None


CommandResult = Envelope[CommandResultData]
PackageResult = Envelope[PackageResultData]
#: What the agent stores until the server acknowledges it.
ResultMessage = CommandResult | PackageResult
#: Everything the agent sends.
AgentMessage = (
    Envelope[HelloData]
    | Envelope[HeartbeatData]
    | Envelope[MetricsData]
    | Envelope[CommandStartedData]
    | Envelope[PackageProgressData]
    | Envelope[PatchStatusData]
    | ResultMessage
)


class ServerMessage(TypedDict):
    """A message from the server, as :func:`parse` lets it through: an object with a
    string ``type`` and an object ``data``, whose fields each handler checks itself."""

    type: str
    data: dict[str, object]
    id: NotRequired[object]


def utc_now_iso() -> str:
    """Return the current time as ISO-8601 UTC with a ``Z`` suffix, to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def envelope(type_: AgentMessageType, data: _Data, *, id_: MessageId = None) -> Envelope[_Data]:
    """Build an agent message; ``id`` is included only when answering a server message."""
    message: Envelope[_Data] = {"type": type_, "data": data, "timestamp": utc_now_iso()}
    if id_ is not None:
        message["id"] = id_
    return message


def dumps(message: Mapping[str, object]) -> str:
    """Serialize a message compactly (non-ASCII text is kept as UTF-8, not escaped)."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def frame_size(message: Mapping[str, object]) -> int:
    """Return the size in bytes of the frame that carries ``message``."""
    return len(dumps(message).encode("utf-8"))


def parse(raw: str | bytes) -> ServerMessage | None:
    """Parse a server frame; return ``None`` unless it is an object with ``type`` and ``data``."""
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return None
    if not isinstance(message.get("data"), dict):
        return None
    return cast("ServerMessage", message)


def request_id(message: ServerMessage) -> MessageId:
    """Return the ``id`` of a server message if it can be echoed back, else ``None``."""
    value = message.get("id")
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return value


def job_id(value: object) -> JobId | None:
    """``value`` if it can be an execution or operation id: a non-empty string or an
    integer."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return value if str(value).strip() else None


def ref_of(value: object) -> str | None:
    """An execution or operation id as a string, if it is a non-empty string or an integer."""
    valid = job_id(value)
    return None if valid is None else str(valid)


def fit_frame(
    message: Envelope[_Data],
    fields: Sequence[tuple[str, str]],
    budget: int = FRAME_BUDGET_BYTES,
) -> Envelope[_Data]:
    """Shorten text fields of ``message`` in place until its frame fits in ``budget`` bytes.

    ``fields`` pairs each text field of ``message["data"]`` with the boolean field that
    records its truncation.  The longest field is halved until the frame fits.
    """
    # The fields are named at run time; a TypedDict takes literal keys only.
    data = cast("dict[str, Any]", message["data"])
    while frame_size(message) > budget:
        name, flag = max(fields, key=lambda pair: len(data[pair[0]]))
        text = data[name]
        if not text:
            break
        data[name] = text[: len(text) // 2]
        data[flag] = True
    return message
