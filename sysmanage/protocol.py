"""
The WebSocket envelope: building the messages the server sends, parsing the ones it gets.

Every server message is ``{type, channel, data, timestamp}`` plus the ``id`` of the
request it answers.  Error codes and close codes are listed here and nowhere else;
``docs/websocket-protocol.md`` documents each of them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any, NotRequired, TypedDict, overload


class MessageType(StrEnum):
    """Message types of the seed protocol, plus the application-level ping/pong and the
    in-band token ``refresh``."""

    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    COMMAND = "command"
    STATUS = "status"
    EVENT = "event"
    RESPONSE = "response"
    ERROR = "error"
    PING = "ping"
    PONG = "pong"
    #: a client hands its open socket a new access token
    REFRESH = "refresh"


#: Types a client may send; the rest are sent by the server only.
CLIENT_TYPES = frozenset(
    {
        MessageType.SUBSCRIBE,
        MessageType.UNSUBSCRIBE,
        MessageType.COMMAND,
        MessageType.PING,
        MessageType.REFRESH,
    }
)
SERVER_ONLY_TYPES = frozenset(
    {
        MessageType.STATUS,
        MessageType.EVENT,
        MessageType.RESPONSE,
        MessageType.ERROR,
        MessageType.PONG,
    }
)


class ErrorCode(StrEnum):
    """Codes carried in ``data.code`` of an ``error`` message."""

    AUTH_FAILED = "AUTH_FAILED"
    SUBSCRIPTION_FAILED = "SUBSCRIPTION_FAILED"
    SUBSCRIPTION_REVOKED = "SUBSCRIPTION_REVOKED"
    COMMAND_FAILED = "COMMAND_FAILED"
    INVALID_JSON = "INVALID_JSON"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    UNSUPPORTED_TYPE = "UNSUPPORTED_TYPE"
    UNKNOWN_CHANNEL = "UNKNOWN_CHANNEL"
    INVALID_FILTERS = "INVALID_FILTERS"
    INVALID_COMMAND = "INVALID_COMMAND"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    RATE_LIMITED = "RATE_LIMITED"
    SLOW_CONSUMER = "SLOW_CONSUMER"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    REPLACED = "REPLACED"
    TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"
    TOO_MANY_AUTH_FAILURES = "TOO_MANY_AUTH_FAILURES"
    #: the socket's access token expired; in the grace period only ``refresh`` helps
    TOKEN_EXPIRED = "TOKEN_EXPIRED"  # noqa: S105 - an error code, not a secret


class CloseCode(IntEnum):
    """WebSocket close codes the server uses.

    Daphne lets an application close only with 1000 or 3000-4999, so the server's own
    reasons are 4xxx codes, named after the nearest HTTP status where there is one.
    """

    AUTH_FAILED = 4001
    SLOW_CONSUMER = 4008
    REPLACED = 4009
    MESSAGE_TOO_BIG = 4013
    RATE_LIMITED = 4029
    #: too many failed authentications from this address: wait ``retry_after`` (403)
    AUTH_BLOCKED = 4403
    #: the user holds WS_MAX_SOCKETS_PER_USER sockets of this process already (429; 4029
    #: is taken by the message rate limit)
    TOO_MANY_CONNECTIONS = 4429
    TRY_AGAIN_LATER = 4503


#: Largest ``id`` a client may attach; longer ones are refused, not echoed.
MAX_ID_LENGTH = 128
#: Largest integer ``id``: what a JavaScript number holds exactly.
MAX_INT_ID = 2**53 - 1
#: Longest access token a ``refresh`` may carry (the server's own are a few hundred
#: characters long).
MAX_TOKEN_LENGTH = 4096
#: The ``host_id`` filter value that asks for every host at once (``host_metrics``: one
#: coalesced summary a second instead of an event per report).
ALL_HOSTS = "*"


#: A JSON object: a message's ``data`` or ``filters`` (each handler checks its fields).
JSONObject = dict[str, Any]


class ServerMessage(TypedDict):
    """A message the server sends: ``{type, channel, data, timestamp}``, and the ``id``
    of the request it answers."""

    type: str
    channel: str
    data: JSONObject
    timestamp: str
    id: NotRequired[str | int]
    #: (``event`` messages) the event's position on its channel's stream
    offset: NotRequired[int]
    epoch: NotRequired[str]


#: The last whole second formatted (seconds since the epoch, its text): every message
#: carries a timestamp, and a busy process sends thousands within the same second.
_last_second: tuple[int, str] = (-1, "")


def utc_now_iso() -> str:
    """Return the current time as ISO-8601 UTC with a ``Z`` suffix, to the millisecond."""
    return iso_of_epoch(time.time())


def iso_of_epoch(seconds: float) -> str:
    """Format seconds since the epoch as ISO-8601 UTC with a ``Z`` suffix, to the
    millisecond (each second is formatted once)."""
    global _last_second
    whole = int(seconds)
    last = _last_second
    if last[0] != whole:  # a tuple, replaced whole: safe from any thread
        last = _last_second = (
            whole,
            datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        )
    return f"{last[1]}.{int((seconds - whole) * 1000):03d}Z"


@overload
def iso(value: datetime) -> str: ...
@overload
def iso(value: None) -> None: ...
@overload
def iso(value: datetime | None) -> str | None: ...
def iso(value: datetime | None) -> str | None:
    """Format an aware datetime as ISO-8601 UTC with a ``Z`` suffix."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(timespec="milliseconds")[:-6] + "Z"  # without "+00:00"


def envelope(
    type_: str,
    channel: str,
    data: JSONObject,
    *,
    id_: str | int | None = None,
    timestamp: str | None = None,
    position: StreamPosition | None = None,
) -> ServerMessage:
    """Build a server message; ``id`` is present only when answering a request, and an
    event's ``offset`` and ``epoch`` only when it has a place on its channel's stream."""
    message: ServerMessage = {
        "type": str(type_),
        "channel": channel,
        "data": data,
        "timestamp": timestamp or utc_now_iso(),
    }
    if id_ is not None:
        message["id"] = id_
    if position is not None:
        message["offset"] = position.offset
        message["epoch"] = position.epoch
    return message


def error_envelope(
    code: ErrorCode,
    message: str,
    *,
    channel: str = "system",
    id_: str | int | None = None,
    **extra: Any,
) -> ServerMessage:
    """Build an ``error`` message with a code, a human message and any extra fields."""
    return envelope(
        MessageType.ERROR, channel, {"code": str(code), "message": message, **extra}, id_=id_
    )


def auth_failed_envelope(
    message: str = "Invalid or expired JWT token", *, id_: str | int | None = None
) -> ServerMessage:
    """The seed's ``AUTH_FAILED`` error, sent before closing with ``CloseCode.AUTH_FAILED``
    (with the ``id`` of the message refused, when it answers one)."""
    return error_envelope(
        ErrorCode.AUTH_FAILED, message, id_=id_, action="reconnect_with_valid_token"
    )


def dumps(message: Mapping[str, Any]) -> str:
    """Serialize a message compactly."""
    return json.dumps(message, separators=(",", ":"), default=str)


class ProtocolError(Exception):
    """A client message the server cannot act on; becomes an ``error`` envelope."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        channel: str = "system",
        id_: str | int | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.channel = channel
        self.id = id_
        self.extra = extra

    def to_envelope(self) -> ServerMessage:
        """Render this error as the protocol's ``error`` message."""
        return error_envelope(
            self.code, self.message, channel=self.channel, id_=self.id, **self.extra
        )


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """A place on a channel's stream: the ``offset`` of an event in history ``epoch``.

    Offsets grow by one with every event published on the channel, cluster-wide; the
    epoch names one unbroken history, and changes when the history was lost.
    """

    epoch: str
    offset: int

    def to_json(self) -> JSONObject:
        """The position as sent to clients (``{"epoch": …, "offset": …}``)."""
        return {"epoch": self.epoch, "offset": self.offset}


#: Longest ``since.epoch`` a client may send (the server's epochs are much shorter).
MAX_EPOCH_LENGTH = 64


@dataclass(frozen=True, slots=True)
class ClientMessage:
    """A parsed, shape-checked message from a client."""

    type: str
    channel: str | None
    data: JSONObject
    filters: JSONObject | None
    id: str | int | None
    #: (``subscribe``) the last position the client saw on the channel, to resume from
    since: StreamPosition | None = None


def load_object(
    text: str, loads: Callable[[str], Any] = json.loads
) -> tuple[JSONObject, str | int | None]:
    """Decode a frame that must be a JSON object; return it with its checked ``id``
    (``loads`` decodes; it raises ``ValueError`` on what is not JSON)."""
    try:
        raw = loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.INVALID_JSON, "Message is not valid JSON") from None
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "Message must be a JSON object")
    return raw, _extract_id(raw)


def _extract_id(raw: JSONObject) -> str | int | None:
    """Return the request ``id`` if it is one the server can echo back safely."""
    value = raw.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'id' must be a string or an integer")
    if isinstance(value, str) and len(value) > MAX_ID_LENGTH:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, f"'id' must be at most {MAX_ID_LENGTH} characters"
        )
    if isinstance(value, int) and not -MAX_INT_ID <= value <= MAX_INT_ID:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, "an integer 'id' must fit in 53 bits (as in JavaScript)"
        )
    return value


def parse_client_message(text: str) -> ClientMessage:
    """Parse one text frame into a :class:`ClientMessage` or raise :class:`ProtocolError`."""
    raw, id_ = load_object(text)
    type_ = raw.get("type")
    if type_ is None:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "Message has no 'type'", id_=id_)
    if not isinstance(type_, str) or type_ not in MessageType.__members__.values():
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"Unknown message type {str(type_)[:64]!r}",
            id_=id_,
            allowed_types=sorted(str(t) for t in CLIENT_TYPES),
        )
    if type_ in SERVER_ONLY_TYPES:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_TYPE,
            f"Messages of type {type_!r} are sent by the server only",
            id_=id_,
            allowed_types=sorted(str(t) for t in CLIENT_TYPES),
        )
    channel = raw.get("channel")
    if channel is not None and not isinstance(channel, str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'channel' must be a string", id_=id_)
    data = raw.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'data' must be an object", id_=id_)
    filters = raw.get("filters")
    if filters is not None and not isinstance(filters, dict):
        raise ProtocolError(
            ErrorCode.INVALID_FILTERS,
            "'filters' must be an object",
            channel="subscription",
            id_=id_,
            requested_channel=channel,
        )
    since = _parse_since(raw.get("since"), id_, channel) if "since" in raw else None
    return ClientMessage(
        type=type_, channel=channel, data=data, filters=filters, id=id_, since=since
    )


def _parse_since(value: Any, id_: str | int | None, channel: str | None) -> StreamPosition | None:
    """Check a subscribe's ``since``: null, or ``{"epoch": str, "offset": int >= 0}``."""
    if value is None:
        return None
    problem = None
    if not isinstance(value, dict) or set(value) != {"epoch", "offset"}:
        problem = "'since' must be an object with exactly 'epoch' and 'offset'"
    elif not isinstance(value["epoch"], str) or not 0 < len(value["epoch"]) <= MAX_EPOCH_LENGTH:
        problem = f"'since.epoch' must be a string of 1 to {MAX_EPOCH_LENGTH} characters"
    elif (
        isinstance(value["offset"], bool)
        or not isinstance(value["offset"], int)
        or not 0 <= value["offset"] <= MAX_INT_ID
    ):
        problem = "'since.offset' must be an integer from 0 to 2**53-1"
    if problem is not None:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            problem,
            channel="subscription",
            id_=id_,
            requested_channel=channel,
        )
    return StreamPosition(epoch=value["epoch"], offset=value["offset"])


def refresh_token_of(message: ClientMessage) -> str:
    """The access token a ``refresh`` message carries in ``data.token`` (raises
    :class:`ProtocolError` ``INVALID_MESSAGE`` when it carries none that could be one)."""
    token = message.data.get("token")
    if not isinstance(token, str) or not token.strip():
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            "'refresh' needs the new access token as a string in 'data.token'",
            id_=message.id,
        )
    if len(token) > MAX_TOKEN_LENGTH:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"'data.token' must be at most {MAX_TOKEN_LENGTH} characters",
            id_=message.id,
        )
    return token


def request_id_of(text: str) -> str | int | None:
    """The ``id`` of a frame if it is a JSON object with a usable one (else None)."""
    try:
        raw = json.loads(text)
        return _extract_id(raw) if isinstance(raw, dict) else None
    except (ValueError, RecursionError, ProtocolError):
        return None
