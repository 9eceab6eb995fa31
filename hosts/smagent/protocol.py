"""
The SysManage agent's messages, checked and translated (see ``docs/sysmanage-agent.md``).

Agent → server: ``{message_type, message_id, timestamp, data}``; ``command_acknowledgment``
carries no ``data`` and ``script_execution_result`` is flat.  Server → agent: the same
envelope; commands add ``queue_message_id``; errors are ``{message_type: "error",
error_type, message, data}``.  Nothing here touches the database.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Literal, TypedDict

from hosts.agent_protocol import (
    CommandOutcome,
    CommandStatus,
    HostFacts,
    PackageOutcome,
    PackageStatus,
    TextFact,
    command_outputs,
    keep_output,
    package_outputs,
    without_nul,
)
from hosts.metrics import Metrics, MetricsError, clean_metrics

#: Frames to the agent stay below its WebSocket client's 1 MiB limit.
MAX_FRAME_TO_AGENT = 1024 * 1024 - 1024
MESSAGE_ID = re.compile(r"^[A-Za-z0-9-]{20,100}$")
MESSAGE_TYPE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
CLOCK_SKEW = timedelta(minutes=30)
ENVELOPE_KEYS = ("message_type", "message_id", "timestamp", "data")
MAX_MOUNTS = 16

#: A message as decoded, before its envelope is checked.
RawMessage = Mapping[str, object]
#: The ``data`` of a message whose envelope is checked; its fields are still unchecked.
MessageData = Mapping[str, object]

#: The ``error_type`` of the errors the server sends.
ErrorType = Literal[
    "invalid_message",
    "rate_limited",
    "message_too_large",
    "server_error",
    "server_busy",
    "host_not_registered",
    "host_not_approved",
    "identification_pending",
    "identification_required",
    "too_many_connections",
    "invalid_token",
    "replaced",
    "slow_consumer",
    "disconnected",
]
#: The commands the server sends.
CommandType = Literal[
    "execute_shell",
    "install_packages",
    "uninstall_packages",
    "sync_custom_metrics",
    "check_updates",
    "apply_updates",
    "reboot_system",
    "check_reboot_status",
]


class ErrorMessage(TypedDict):
    """``error``: a message refused (``data`` names it) or a connection being closed."""

    message_type: Literal["error"]
    message_id: str
    error_type: ErrorType
    message: str
    timestamp: str
    data: dict[str, object]


class AckData(TypedDict):
    """What an ``ack`` acknowledges."""

    status: str
    acked_message_id: str


class AckMessage(TypedDict):
    """``ack``: an agent message handled."""

    message_type: Literal["ack"]
    message_id: str
    timestamp: str
    data: AckData


class PingData(TypedDict):
    """A ``ping`` carries nothing."""


class PingMessage(TypedDict):
    """``ping``: asks for a ``pong`` with the agent's identity."""

    message_type: Literal["ping"]
    message_id: str
    timestamp: str
    data: PingData


class ShellParameters(TypedDict):
    """``execute_shell``'s parameters."""

    command: str
    timeout: int


class PackageSpec(TypedDict):
    """One package of ``install_packages``/``uninstall_packages``."""

    package_name: str
    package_manager: str


class PackageParameters(TypedDict):
    """``install_packages``/``uninstall_packages``'s parameters."""

    request_id: str
    requested_by: str
    packages: list[PackageSpec]


class UpdateParameters(TypedDict):
    """``apply_updates``'s parameters: the pending updates to apply, each named with the
    package manager its report named (the agent has no "every update" form: it refuses
    an empty list, and a name without a manager it knows).  It reads only ``packages``;
    the rest says what was asked, for its logs."""

    request_id: str
    requested_by: str
    packages: list[PackageSpec]
    security_only: bool


class MetricDefinition(TypedDict):
    """One custom metric script of ``sync_custom_metrics``."""

    id: str
    name: str
    script: str
    interpreter: str
    cadence_seconds: int


class MetricsParameters(TypedDict):
    """``sync_custom_metrics``'s parameters."""

    metrics: list[MetricDefinition]


class NoParameters(TypedDict):
    """The parameters of a command that takes none (``check_updates``,
    ``check_reboot_status``, ``reboot_system``)."""


CommandParameters = (
    ShellParameters | PackageParameters | UpdateParameters | MetricsParameters | NoParameters
)

#: Seconds the agent has for ``check_updates`` (it refreshes its package lists).
CHECK_UPDATES_TIMEOUT = 600


class CommandData(TypedDict):
    """What a ``command`` asks for."""

    command_type: CommandType
    parameters: CommandParameters
    timeout: int


class CommandMessage(TypedDict):
    """``command``: work for the agent; its ids are its delivery's."""

    message_type: Literal["command"]
    message_id: str
    queue_message_id: str
    timestamp: str
    data: CommandData


#: Everything the server sends the agent.
ServerMessage = ErrorMessage | AckMessage | PingMessage | CommandMessage


class PolledMessage(TypedDict):
    """A server message as a poll reply carries it."""

    message_type: str
    message_id: str
    data: dict[str, object]


class AgentProtocolError(Exception):
    """A message the server refuses, with the agent's ``error_type``."""

    def __init__(self, error_type: ErrorType, message: str, **data: object) -> None:
        super().__init__(message)
        self.error_type: ErrorType = error_type
        self.message = message
        self.data = data

    def to_message(self) -> ErrorMessage:
        """The error as the agent reads it."""
        return error_message(self.error_type, self.message, **self.data)


def now_iso() -> str:
    """The current time as the agent's timestamps are written."""
    return datetime.now(UTC).isoformat()


def error_message(error_type: ErrorType, message: str, **data: object) -> ErrorMessage:
    """``{message_type: "error", error_type, message, data, timestamp}``."""
    return {
        "message_type": "error",
        "message_id": str(uuid.uuid4()),
        "error_type": error_type,
        "message": message,
        "timestamp": now_iso(),
        "data": data,
    }


def ack_message(acked_id: str, status: str = "received") -> AckMessage:
    """The acknowledgement of one agent message."""
    return {
        "message_type": "ack",
        "message_id": str(uuid.uuid4()),
        "timestamp": now_iso(),
        "data": {"status": status, "acked_message_id": acked_id},
    }


def ping_message() -> PingMessage:
    """A ``ping``: the agent answers with a ``pong`` that carries its ``host_id`` and
    ``host_token``, the quickest proof of identity a connection (or a poll) can give."""
    return {
        "message_type": "ping",
        "message_id": str(uuid.uuid4()),
        "timestamp": now_iso(),
        "data": {},
    }


def command_message(
    delivery_id: str, command_type: CommandType, parameters: CommandParameters, timeout: int
) -> CommandMessage:
    """A command for the agent; its ids are the delivery's."""
    return {
        "message_type": "command",
        "message_id": delivery_id,
        "queue_message_id": delivery_id,
        "timestamp": now_iso(),
        "data": {"command_type": command_type, "parameters": parameters, "timeout": timeout},
    }


def for_polling(message: ServerMessage) -> PolledMessage:
    """A server message as a poll reply carries it: the agent merges ``data`` into the
    top level, so everything but the type and id goes inside ``data``."""
    rest = {k: v for k, v in message.items() if k not in ("message_type", "message_id")}
    return {
        "message_type": message["message_type"],
        "message_id": message["message_id"],
        "data": rest,
    }


def encode(message: Mapping[str, object]) -> str:
    """One frame for the agent; refuses what its client would drop."""
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode("utf-8")) > MAX_FRAME_TO_AGENT:
        raise ValueError(f"{message.get('message_type')} frame exceeds the agent's 1 MiB limit")
    return text


# -- reading agent messages ----------------------------------------------------------


def decode(text: str) -> RawMessage:
    """A frame as a JSON object."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raise AgentProtocolError("invalid_message", "The frame is not valid JSON") from None
    if not isinstance(raw, dict):
        raise AgentProtocolError("invalid_message", "A message must be a JSON object")
    return raw


def unwrap_polled(raw: RawMessage) -> RawMessage:
    """A polled message as the agent queued it.

    The unchanged agent polls with each message as its local queue keeps it: ``data``
    is the whole message (envelope and all) as a JSON string, and ``message_id`` is the
    queue entry's own.  The inner message is the one that counts.
    """
    data = raw.get("data")
    if not isinstance(data, str):
        return raw
    try:
        inner = json.loads(data)
    except (ValueError, RecursionError):
        raise AgentProtocolError(
            "invalid_message",
            "'data' must be an object or a message encoded as JSON",
            message_type=raw.get("message_type"),
            message_id=raw.get("message_id"),
        ) from None
    if isinstance(inner, dict) and "message_type" in inner:
        return inner
    return {**raw, "data": inner}


def check_envelope(raw: RawMessage, *, polled: bool = False) -> tuple[str, str, MessageData]:
    """``(message_type, message_id, data)`` of a well-formed message.

    ``message_id`` must be 20-100 letters, digits or dashes; on the socket the timestamp
    must be within 30 minutes of the server's clock (polled messages may have waited in
    the agent's queue longer, and need none).  A message without ``data``
    (acknowledgements, flat results) has its other fields as data.
    """
    if polled:
        raw = unwrap_polled(raw)
    message_type = raw.get("message_type")
    if not isinstance(message_type, str) or not MESSAGE_TYPE.match(message_type):
        raise AgentProtocolError("invalid_message", "'message_type' must be a lower-case name")
    message_id = raw.get("message_id")
    if not isinstance(message_id, str) or not MESSAGE_ID.match(message_id):
        raise AgentProtocolError(
            "invalid_message",
            "'message_id' must be 20 to 100 letters, digits or dashes",
            message_type=message_type,
        )
    if not polled:
        _check_timestamp(raw.get("timestamp"), message_type, message_id)
    data = raw.get("data")
    if data is None:
        data = {k: v for k, v in raw.items() if k not in ENVELOPE_KEYS}
    if not isinstance(data, dict):
        raise AgentProtocolError(
            "invalid_message",
            "'data' must be an object",
            message_type=message_type,
            message_id=message_id,
        )
    return message_type, message_id, data


def _check_timestamp(value: object, message_type: str, message_id: str) -> None:
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise AgentProtocolError(
            "invalid_message",
            "'timestamp' must be an ISO-8601 time",
            message_type=message_type,
            message_id=message_id,
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if abs(datetime.now(UTC) - when) > CLOCK_SKEW:
        raise AgentProtocolError(
            "invalid_message",
            "'timestamp' is more than 30 minutes from the server's clock",
            message_type=message_type,
            message_id=message_id,
        )


def _text(value: object, limit: int) -> str | None:
    if value is None:
        return None
    return without_nul(str(value)[:limit])


def _addresses(*values: object) -> list[str]:
    found: list[str] = []
    for value in values:
        for item in (value if isinstance(value, list) else [value])[:32]:
            try:
                address = str(ipaddress.ip_address(str(item).split("%")[0]))
            except ValueError:
                continue
            if address not in found:
                found.append(address)
    return found


def facts_from_system_info(data: MessageData) -> HostFacts:
    """Host facts from ``system_info`` (and the parts of ``heartbeat`` it shares)."""
    facts: HostFacts = {}
    os_info = _object(data.get("os_info"))
    pairs: dict[TextFact, tuple[object, int]] = {
        "fqdn": (data.get("fqdn"), 255),
        "os_name": (os_info.get("distribution") or data.get("platform"), 100),
        "os_version": (os_info.get("distribution_version") or data.get("platform_release"), 100),
        # The agent has no kernel-release field; platform.version() is the kernel's build
        # string ("#1 SMP PREEMPT_DYNAMIC Debian 6.1.115-1 ...").
        "kernel": (data.get("platform_version"), 200),
        "architecture": (data.get("machine_architecture") or data.get("architecture"), 50),
        "agent_version": (data.get("agent_version"), 50),
    }
    for field, (value, limit) in pairs.items():
        text = _text(value, limit)
        if text:
            facts[field] = text
    addresses = _addresses(data.get("ipv4"), data.get("ipv6"))
    if addresses:
        facts["ip_addresses"] = addresses
    return facts


def facts_from_hardware(data: MessageData) -> HostFacts:
    """Host facts (CPUs, memory) from ``hardware_update``."""
    facts: HostFacts = {}
    cpus = data.get("cpu_threads") or data.get("cpu_cores")
    if isinstance(cpus, int) and not isinstance(cpus, bool) and 0 < cpus < 100000:
        facts["cpu_count"] = cpus
    memory = data.get("memory_total_mb")
    if isinstance(memory, int | float) and not isinstance(memory, bool) and 0 < memory < 2**40:
        facts["memory_total"] = int(memory * 1024 * 1024)
    return facts


def mounts_from_hardware(data: MessageData) -> list[str]:
    """The mount points of ``hardware_update``'s storage devices (at most 16)."""
    mounts: list[str] = []
    devices = data.get("storage_devices")
    for device in devices if isinstance(devices, list) else []:
        mount = device.get("mount_point") if isinstance(device, dict) else None
        if (
            isinstance(mount, str)
            and mount.startswith("/")
            and len(mount) <= 255
            and mount.isprintable()
            and mount not in mounts
            and not mount.startswith(("/proc", "/sys", "/dev", "/run", "/snap", "/boot/efi"))
        ):
            mounts.append(mount)
    return mounts[:MAX_MOUNTS]


def storable(value: object, depth: int = 0) -> object:
    """``value`` with NUL characters replaced in every string and key, for a JSON column
    (PostgreSQL's jsonb cannot hold ``\u0000``); nesting deeper than 32 is cut off."""
    if isinstance(value, str):
        return without_nul(value)
    if depth >= 32:
        return None
    if isinstance(value, dict):
        return {without_nul(str(k)): storable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v, depth + 1) for v in value]
    return value


def storable_object(value: Mapping[str, object]) -> dict[str, object]:
    """A JSON object as :func:`storable` keeps it."""
    return {without_nul(str(k)): storable(v, 1) for k, v in value.items()}


def digest(value: object) -> str:
    """A SHA-256 of ``value`` as canonical JSON: equal reports, equal digests."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def inventory_items(kind: str, data: MessageData) -> int | None:
    """How many items an inventory report lists (packages, updates), if it lists any."""
    key = {"software": "software_packages", "updates": "available_updates"}.get(kind)
    items = data.get(key) if key else None
    return len(items) if isinstance(items, list) else None


# -- results ---------------------------------------------------------------------------


def _object(value: object) -> Mapping[str, object]:
    """``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def shell_result(data: MessageData, execution_time: float | None) -> CommandOutcome:
    """An ``execute_shell`` ``command_result`` as :func:`hosts.services.command_finish`
    takes it.  The output sits in ``result.result`` (nested twice)."""
    outer = _object(data.get("result"))
    nested = outer.get("result")
    inner = nested if isinstance(nested, dict) else outer
    exit_code = _int_or_none(data.get("exit_code"))
    if exit_code is None:
        exit_code = _int_or_none(inner.get("exit_code"))
    stdout = keep_output(_whole_text(inner.get("stdout")))
    stderr = keep_output(_whole_text(inner.get("stderr")))
    error = _text(data.get("error"), 2000) or ""
    success = data.get("success") is True and exit_code in (0, None)
    status: CommandStatus
    if exit_code == -1 and "timed out" in error.lower():
        status = "timeout"
    else:
        status = "completed" if success else "failed"
    return {
        "status": status,
        "exit_code": exit_code,
        "stdout": stdout.text,
        "stderr": stderr.text,
        "execution_time": execution_time,
        "error": error,
        **command_outputs(stdout, stderr),
    }


def _whole_text(value: object) -> str:
    """An output as it came (the agent cuts none), as text."""
    return "" if value is None else str(value)


def apply_started(data: MessageData) -> bool:
    """Whether an ``apply_updates`` ``command_result`` only says the agent began applying
    them in the background (``{"result": "Updates started in background", "packages":
    [...]}``): the outcome comes in its ``update_apply_result``."""
    result = _object(data.get("result"))
    return (
        data.get("success") is True
        and "updated_packages" not in result
        and "failed_packages" not in result
    )


def _package_names(entries: object, *, limit: int = 1000) -> list[dict[str, str]]:
    """``[{package_name, ...}]`` entries of an ``update_apply_result``, as short texts."""
    if not isinstance(entries, list):
        return []
    return [
        {k: _text(v, 1000) or "" for k, v in entry.items() if isinstance(k, str)}
        for entry in entries[:limit]
        if isinstance(entry, dict) and entry.get("package_name")
    ]


def apply_result(data: MessageData) -> tuple[set[str], PackageOutcome]:
    """The package names an ``update_apply_result`` is about, and the outcome it gives
    the ``upgrade`` operation: completed if no package failed, with a line per package
    (``name: old -> new``, or ``name: FAILED: error``) as its output."""
    updated = _package_names(data.get("updated_packages"))
    failed = _package_names(data.get("failed_packages"))
    lines = [
        f"{u['package_name']}: {u.get('old_version') or '?'} -> {u.get('new_version') or '?'}"
        for u in updated
    ] + [f"{f['package_name']}: FAILED: {f.get('error') or 'no reason given'}" for f in failed]
    if failed:
        names = ", ".join(f["package_name"] for f in failed[:10])
        message = f"{len(failed)} of {len(updated) + len(failed)} updates failed: {names}"
    else:
        message = f"Applied {len(updated)} update{'' if len(updated) == 1 else 's'}"
    status: PackageStatus = "failed" if failed else "completed"
    outcome: PackageOutcome = {
        "status": status,
        "message": message,
        **package_outputs(keep_output("\n".join(lines))),
    }
    return {u["package_name"] for u in updated + failed}, outcome


def package_result(data: MessageData) -> PackageOutcome:
    """The outcome of an ``install_packages``/``uninstall_packages`` ``command_result``."""
    result = _object(data.get("result"))
    output = result.get("installation_log") or result.get("uninstall_log") or ""
    if isinstance(output, list):
        output = "\n".join(map(str, output))
    failed = result.get("failed_packages")
    ok = data.get("success") is True and not failed
    message = _text(result.get("summary") or data.get("error") or "", 1000) or ""
    if not ok and not message:
        message = "The agent reported a failure"
    status: PackageStatus = "completed" if ok else "failed"
    return {"status": status, "message": message, **package_outputs(keep_output(str(output)))}


# -- live metrics through custom metric scripts -----------------------------------------

_CPU = """import time
def sample():
    with open('/proc/stat') as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[3] + (v[4] if len(v) > 4 else 0), sum(v)
i1, t1 = sample(); time.sleep(1); i2, t2 = sample()
print(round(100.0 * (1 - (i2 - i1) / max(t2 - t1, 1)), 2))
"""
_MEMORY = """m = {}
with open('/proc/meminfo') as f:
    for line in f:
        k, v = line.split(':', 1)
        m[k] = int(v.split()[0])
free = m.get('MemAvailable', m.get('MemFree', 0) + m.get('Buffers', 0) + m.get('Cached', 0))
print(round(100.0 * (1 - free / m['MemTotal']), 2))
"""
_LOAD = "import os\nprint(os.getloadavg()[{index}])\n"
_DISK = """import os
s = os.statvfs({mount})
used = (s.f_blocks - s.f_bfree) * s.f_frsize
free = s.f_bavail * s.f_frsize
print(round(100.0 * used / max(used + free, 1), 2))
"""
METRIC_PREFIX = "sysmanage-server."


def metric_definitions(mounts: list[str], cadence: int) -> list[MetricDefinition]:
    """The ``sync_custom_metrics`` set: CPU, memory, load and disk use per mount."""

    def metric(key: str, name: str, script: str) -> MetricDefinition:
        return {
            "id": METRIC_PREFIX + key,
            "name": name,
            "script": script,
            "interpreter": "python3",
            "cadence_seconds": cadence,
        }

    metrics = [
        metric("cpu_usage", "CPU usage (%)", _CPU),
        metric("memory_usage", "Memory usage (%)", _MEMORY),
    ]
    metrics += [
        metric(f"load_{n}", f"Load average ({n} min)", _LOAD.format(index=i))
        for i, n in enumerate((1, 5, 15))
    ]
    metrics += [
        metric(f"disk:{mount}", f"Disk usage of {mount} (%)", _DISK.format(mount=json.dumps(mount)))
        for mount in (mounts or ["/"])[:MAX_MOUNTS]
    ]
    return metrics


def metrics_from_samples(samples: object) -> Metrics | None:
    """The seed's ``host_metrics`` figures from ``custom_metric_samples``; None when no
    sample of ours has a value.  Samples of other metrics are ignored."""
    if not isinstance(samples, list):
        raise AgentProtocolError("invalid_message", "'samples' must be a list")
    raw: dict[str, object] = {}
    disks: dict[str, float] = {}
    load: dict[int, float] = {}
    for sample in samples[:256]:
        if not isinstance(sample, dict) or sample.get("status") != "ok":
            continue
        key, value = str(sample.get("metric_id") or ""), sample.get("value")
        if (
            not key.startswith(METRIC_PREFIX)
            or isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            continue
        key = key[len(METRIC_PREFIX) :]
        if key in ("cpu_usage", "memory_usage"):
            raw[key] = min(100.0, max(0.0, float(value)))
        elif key.startswith("load_") and key[5:] in ("1", "5", "15"):
            load[int(key[5:])] = max(0.0, float(value))
        elif key.startswith("disk:"):
            disks[key[5:]] = min(100.0, max(0.0, float(value)))
    if disks:
        raw["disk_usage"] = disks
    if len(load) == 3:
        raw["load_average"] = [load[1], load[5], load[15]]
    if not raw:
        return None
    try:
        return clean_metrics(raw)
    except MetricsError as exc:
        raise AgentProtocolError("invalid_message", str(exc)) from None
