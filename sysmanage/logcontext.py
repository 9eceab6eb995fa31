"""
Which request or connection a log line is about, and how lines are written.

:class:`Identified` wraps the ASGI application: each HTTP request gets a request id (the
client's ``X-Request-ID`` when it is a plain token, else a new one, sent back in the
response's ``X-Request-ID``), each WebSocket connection a connection id.  Both live in
context variables of the task Daphne runs the connection in, so every line logged while
serving it, in the event loop or in a database thread, carries them
(:class:`ContextFilter`), without the consumers passing anything around.

``LOG_FORMAT=json`` writes one JSON object per line (:class:`JsonFormatter`), Daphne's
access log included (``sysmanage/serve.py``); otherwise lines are readable
(:class:`ReadableFormatter`).  Either way every line has been through the redacting filter
first (``sysmanage.logfilters``).
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

from sysmanage.logfilters import redact

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: Any ASGI application (typed loosely: Channels' routers declare narrower scope types).
App = Callable[..., Awaitable[None]]

#: The id of the HTTP request being served, or "".
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
#: The id of the WebSocket connection being served, or "".
connection_id: contextvars.ContextVar[str] = contextvars.ContextVar("connection_id", default="")

#: A request id a client may choose: short, and nothing a log reader could misread.
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
#: Ids this process hands out: its pid, then a counter (short, unique per process).
_counter = itertools.count(1)


def new_id(kind: str) -> str:
    """A new id, unique among this process's: ``r-<pid>-<n>`` for requests, ``c-…`` for
    connections."""
    return f"{kind}-{os.getpid():x}-{next(_counter):x}"


class Identified:
    """ASGI middleware: a request id per HTTP request (echoed in ``X-Request-ID``), a
    connection id per WebSocket, set for the whole task serving it."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Called by Daphne once per request or connection, in its own task."""
        kind = scope["type"]
        if kind == "websocket":
            connection_id.set(new_id("c"))
            await self.app(scope, receive, send)
            return
        if kind != "http":
            await self.app(scope, receive, send)
            return
        chosen = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        rid = chosen.decode() if _CLIENT_ID.fullmatch(chosen) else new_id("r")
        request_id.set(rid)
        header = (b"x-request-id", rid.encode())

        async def identified_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *(h for h in message.get("headers", ()) if h[0].lower() != b"x-request-id"),
                    header,
                ]
            await send(message)

        await self.app(scope, receive, identified_send)


class ContextFilter(logging.Filter):
    """Add ``request_id`` and ``connection_id`` (possibly empty) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Called for each record."""
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        if not hasattr(record, "connection_id"):
            record.connection_id = connection_id.get()
        return True


class ReadableFormatter(logging.Formatter):
    """``time LEVEL logger: message [request=… connection=…]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The line, with the ids it has."""
        text = super().format(record)
        ids = [
            f"{name}={value}"
            for name, value in (
                ("request", getattr(record, "request_id", "")),
                ("connection", getattr(record, "connection_id", "")),
            )
            if value
        ]
        if not ids:
            return text
        first, newline, rest = text.partition("\n")
        return f"{first} [{' '.join(ids)}]{newline}{rest}"


#: Attributes every record has; anything else was passed as ``extra`` and is kept.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, the ids when set, ``exception`` (its text) when there is one, and any
    ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The line."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry and value not in ("", None):
                # numbers as they are; anything else as redacted text (a request's
                # repr holds its URL, query string included)
                entry[key] = value if isinstance(value, int | float) else redact(str(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)
