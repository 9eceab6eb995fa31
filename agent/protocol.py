"""The agent side of the ``/ws/agent`` protocol: envelopes, message types, close codes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

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

# Agent -> server.
HELLO = "hello"
HEARTBEAT = "heartbeat"
METRICS = "metrics"
COMMAND_STARTED = "command_started"
COMMAND_RESULT = "command_result"
PACKAGE_PROGRESS = "package_progress"
PACKAGE_RESULT = "package_result"

# Server -> agent.
WELCOME = "welcome"
RUN_COMMAND = "run_command"
PACKAGE_OPERATION = "package_operation"
ACK = "ack"
ERROR = "error"

#: The result kinds the server acknowledges, and the id field each one carries.
RESULT_ID_FIELDS = {COMMAND_RESULT: "execution_id", PACKAGE_RESULT: "operation_id"}

MessageId = str | int | None


def utc_now_iso() -> str:
    """Return the current time as ISO-8601 UTC with a ``Z`` suffix, to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def envelope(type_: str, data: dict[str, Any], *, id_: MessageId = None) -> dict[str, Any]:
    """Build an agent message; ``id`` is included only when answering a server message."""
    message: dict[str, Any] = {"type": type_, "data": data, "timestamp": utc_now_iso()}
    if id_ is not None:
        message["id"] = id_
    return message


def dumps(message: dict[str, Any]) -> str:
    """Serialize a message compactly (non-ASCII text is kept as UTF-8, not escaped)."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def frame_size(message: dict[str, Any]) -> int:
    """Return the size in bytes of the frame that carries ``message``."""
    return len(dumps(message).encode("utf-8"))


def parse(raw: str | bytes) -> dict[str, Any] | None:
    """Parse a server frame; return ``None`` unless it is an object with ``type`` and ``data``."""
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return None
    if not isinstance(message.get("data"), dict):
        return None
    return message


def request_id(message: dict[str, Any]) -> MessageId:
    """Return the ``id`` of a server message if it can be echoed back, else ``None``."""
    value = message.get("id")
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return value


def ref_of(value: Any) -> str | None:
    """An execution or operation id as a string, if it is a non-empty string or an integer."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)
    return text if text.strip() else None


def fit_frame(
    message: dict[str, Any],
    fields: Sequence[tuple[str, str]],
    budget: int = FRAME_BUDGET_BYTES,
) -> dict[str, Any]:
    """Shorten text fields of ``message`` in place until its frame fits in ``budget`` bytes.

    ``fields`` pairs each text field of ``message["data"]`` with the boolean field that
    records its truncation.  The longest field is halved until the frame fits.
    """
    data = message["data"]
    while frame_size(message) > budget:
        name, flag = max(fields, key=lambda pair: len(data[pair[0]]))
        text = data[name]
        if not text:
            break
        data[name] = text[: len(text) // 2]
        data[flag] = True
    return message
