"""
Checking what agents send on ``/ws/agent`` (see ``docs/agent-protocol.md``).

Each function returns clean values or raises :class:`~sysmanage.protocol.ProtocolError`
with a code the agent can log; nothing an agent sends reaches a service unchecked.
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any

from hosts.models import ExecutionStatus
from sysmanage.protocol import ErrorCode, ProtocolError, load_object

AGENT_MESSAGE_TYPES = frozenset(
    {
        "hello",
        "heartbeat",
        "metrics",
        "command_started",
        "command_result",
        "package_progress",
        "package_result",
    }
)
MAX_OUTPUT_CHARS = 512 * 1024
FACT_LIMITS = {
    "hostname": 255,
    "fqdn": 255,
    "os_name": 100,
    "os_version": 100,
    "kernel": 200,
    "architecture": 50,
    "agent_version": 50,
}


def parse_agent_message(text: str) -> tuple[str, dict[str, Any], str | int | None]:
    """Parse one agent frame into ``(type, data, id)``."""
    raw, id_ = load_object(text)
    type_ = raw.get("type")
    if type_ not in AGENT_MESSAGE_TYPES:
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


def _invalid(why: str, id_: str | int | None) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_MESSAGE, why, id_=id_)


def clean_facts(data: dict[str, Any], id_: str | int | None) -> dict[str, Any]:
    """The host facts of a ``hello``, trimmed and typed; unknown keys are ignored."""
    facts: dict[str, Any] = {}
    for key, limit in FACT_LIMITS.items():
        value = data.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise _invalid(f"'{key}' must be a string", id_)
            facts[key] = without_nul(value[:limit])
    facts.pop("hostname", None)  # the enrolled name stays; the reported one is informative
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
    for key in ("cpu_count", "memory_total"):
        value = data.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _invalid(f"'{key}' must be a non-negative integer", id_)
            facts[key] = value
    return facts


def reference(data: dict[str, Any], key: str, id_: str | int | None) -> str:
    """A UUID field (``execution_id`` / ``operation_id``) in canonical form."""
    try:
        return str(uuid.UUID(str(data.get(key))))
    except ValueError:
        raise _invalid(f"'{key}' must be a UUID", id_) from None


def _text(data: dict[str, Any], key: str, id_: str | int | None) -> str:
    value = data.get(key) or ""
    if not isinstance(value, str):
        raise _invalid(f"'{key}' must be a string", id_)
    return without_nul(value[:MAX_OUTPUT_CHARS])


def without_nul(text: str) -> str:
    """``text`` with NUL characters replaced (PostgreSQL text columns cannot hold them)."""
    return text.replace("\x00", "\ufffd")


def clean_command_result(data: dict[str, Any], id_: str | int | None) -> dict[str, Any]:
    """The fields of a ``command_result`` as :func:`hosts.services.command_finish` takes them."""
    status = data.get("status")
    if status not in (ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.TIMEOUT):
        raise _invalid("'status' must be completed, failed or timeout", id_)
    exit_code = data.get("exit_code")
    if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int)):
        raise _invalid("'exit_code' must be an integer or null", id_)
    elapsed = data.get("execution_time")
    if elapsed is not None and (
        isinstance(elapsed, bool) or not isinstance(elapsed, int | float) or elapsed < 0
    ):
        raise _invalid("'execution_time' must be a non-negative number", id_)
    stdout, stderr = _text(data, "stdout", id_), _text(data, "stderr", id_)
    notes = [
        f"{name} truncated by the agent"
        for name in ("stdout", "stderr")
        if data.get(f"{name}_truncated")
    ]
    error = "; ".join(filter(None, [_text(data, "error", id_), *notes]))
    return {
        "status": status,
        "exit_code": exit_code,
        "stdout": stdout,
        "stderr": stderr,
        "execution_time": round(float(elapsed), 3) if elapsed is not None else None,
        "error": error,
    }


def clean_progress(data: dict[str, Any], id_: str | int | None) -> tuple[int, str]:
    """``(progress, message)`` of a ``package_progress``."""
    progress = data.get("progress", 0)
    if isinstance(progress, bool) or not isinstance(progress, int | float):
        raise _invalid("'progress' must be a number from 0 to 100", id_)
    return max(0, min(100, int(progress))), _text(data, "message", id_)[:1000]
