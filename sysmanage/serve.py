"""
``python -m sysmanage.serve [daphne options] sysmanage.asgi:application``: Daphne, with
an access log that never carries a credential.

Daphne writes its access log itself (``daphne.access.AccessLogGenerator``, to stdout at
the default verbosity or to ``--access-log``), not through :mod:`logging`, so the
redacting filter of the settings never sees it; and its HTTP lines hold the whole
request URI, query string included: ``GET /ws?token=…`` sent as plain HTTP, or
``/api/agent/connect?token=…``.  This entry point takes Daphne's command line unchanged
and passes every access-log entry's path through :func:`sysmanage.logfilters.redact`
before Daphne writes it, whatever the verbosity or destination.  ``scripts/serve`` and
the documented production command run the server through it.

It also trims what Daphne keeps per WebSocket connection, since one process holds
thousands of idle ones (docs/benchmarks.md, "Memory per idle socket"), without changing
what Daphne does with them:

- the messages waiting for a connection's application go into an :class:`Inbox` instead
  of an ``asyncio.Queue`` (three deques and an event, about 3 KB while empty); an
  application that is waiting may take a message as it arrives instead of being woken
  for it (agents' metrics and heartbeats: ``Connection.receive_at_once``);
- Autobahn copies its 29 protocol options from the factory onto every connection, which
  doubles the size of the connection's attribute dictionary; :class:`LeanWebSocketProtocol`
  reads them from the factory instead (Daphne sets them once, at start), and queues its
  rare chopped writes in a list rather than a deque; nor does it pretty-print them for
  a debug line nobody logs;
- the HTTP request a WebSocket was upgraded from (its headers, URL and query string,
  about 3 KB) is let go once the WebSocket protocol has it, instead of staying in the
  HTTP channel's list of requests until the connection ends;
- what Autobahn and Daphne keep of the opening handshake once the WebSocket is open
  (the raw request, its parsed headers and query string, the response; about 2.5 KB)
  is let go too.

And it reads a complete single-frame message (masked, final, text or binary, within
the limits: nearly every message an agent sends) in one step, where Autobahn spends
about 14 µs of Python per frame on a header object, a masker, a UTF-8 validator and seven
callbacks; what the application gets, the statistics and every close code stay
Autobahn's, which still reads every other frame (``SYSMANAGE_FAST_FRAMES=0``: all).

And it lets a connection's application ask for messages over Daphne's
``--websocket-max-message-size`` to be skipped rather than end the connection
(:mod:`sysmanage.oversized`; the agents' endpoints ask).

And it drains the process before it stops (:mod:`sysmanage.drain`).  Twisted turns
SIGTERM and SIGINT into ``reactor.stop()``, which first runs the "before shutdown"
triggers and waits for the Deferreds they return; Daphne's is ``kill_all_applications``,
which cancels every connection's handler.  :class:`RedactingServer` runs the drain there
first, while the reactor still serves: new WebSocket handshakes get HTTP 503, open
sockets are closed with 1012 over ``DRAIN_SECONDS`` (at once on SIGINT, a person at a
terminal), and only what is left after it is cancelled.  Then the process exits 0.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import errno
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from pprint import pformat
from typing import Any

from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.types import ConnectionDeny
from daphne.cli import CommandLineInterface
from daphne.http_protocol import WebRequest
from daphne.server import Server
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import defer, reactor
from twisted.internet.asyncioreactor import AsyncioSelectorReactor

from sysmanage import drain, gcwatch, preflight
from sysmanage.logfilters import redact
from sysmanage.oversized import KEEP_BYTES, RECEIVE_OVERSIZED, SKIP_OVERSIZED

logger = logging.getLogger(__name__)


class Inbox:
    """The messages a server hands one connection's application, in arrival order.

    What Daphne uses an ``asyncio.Queue`` for (``put_nowait`` by the protocol, ``get`` as
    the application's ``receive``), for a single reader: an ASGI application awaits its
    ``receive`` in one place at a time, and a second concurrent ``get`` is refused
    rather than left waiting forever.  An empty inbox holds nothing but two empty slots.
    """

    __slots__ = ("_items", "_waiter", "at_once", "peer_gone")

    def __init__(self) -> None:
        self._items: collections.deque[dict[str, Any]] | None = None
        self._waiter: asyncio.Future[None] | None = None
        #: set by an application that can take some messages as they arrive
        #: (:meth:`sysmanage.connection.Connection.receive_at_once`)
        self.at_once: Callable[[dict[str, Any]], bool] | None = None
        #: whether the socket has closed (its ``websocket.disconnect`` is queued or taken),
        #: which the application may want to know before it reaches that message
        self.peer_gone = False

    def put_nowait(self, item: dict[str, Any]) -> None:
        """Add ``item``, waking the reader if it waits.

        When the reader waits with nothing queued and takes messages at once, ``item`` is
        offered to it first: taken, it never queues, and the reader is not woken for it,
        which saves a future, a task step and the application's dispatch per frame.  The
        order holds: nothing is queued ahead of it, and the reader is idle.
        """
        waiter = self._waiter
        if (
            self.at_once is not None
            and self._items is None
            and waiter is not None
            and not waiter.done()
            and self._offer(item)
        ):
            return
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        if item.get("type") == "websocket.disconnect":
            self.peer_gone = True
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _offer(self, item: dict[str, Any]) -> bool:
        assert self.at_once is not None
        try:
            return self.at_once(item)
        except Exception:
            # The reader's own faults are its to report; this one got away.  The message
            # is dropped rather than handled twice.
            logger.exception("a connection failed to take a message at once")
            return True

    async def get(self) -> dict[str, Any]:
        """The next item, once there is one.  Cancelled, it takes nothing."""
        if self._waiter is not None:
            raise RuntimeError("another reader already waits on this connection's messages")
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if not self._items:
            self._items = None  # an idle connection keeps no deque
        return item


class _FactoryOption:
    """A protocol option that a connection reads from its factory when it needs it."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, protocol: Any, owner: type | None = None) -> Any:
        if protocol is None:
            return self
        return getattr(protocol.factory, self.name)


class _SendQueue(list[tuple[bytes, bool]]):
    """Autobahn's queue of chopped or synchronous writes, which it rarely uses, as a list
    (the ``deque`` it makes takes 760 bytes while empty, a list 56)."""

    __slots__ = ()

    def popleft(self) -> tuple[bytes, bool]:
        """Take the oldest write."""
        return self.pop(0)


class OpenedRequest:
    """What Daphne still reads of a WebSocket's opening request once it is open: the path
    (for its access log).  Autobahn's ``ConnectionRequest`` also holds every header and
    the parsed query string, token included."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


#: What Autobahn keeps of the opening handshake on a server connection and reads only
#: while handling it: the raw request, its status line, URI, headers and parsed query
#: string, and the response sent (kept "for the test suite").
HANDSHAKE_ONLY = (
    "http_request_data",
    "http_status_line",
    "http_request_uri",
    "http_headers",
    "http_request_params",
    "http_response_data",
)


class SkippedMessage:
    """A message over the limit that is being read past: its size so far, its first and
    its last :data:`~sysmanage.oversized.KEEP_BYTES`."""

    __slots__ = ("head", "limit", "size", "tail")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.head = bytearray()
        self.tail = bytearray()

    def feed(self, data: bytes) -> None:
        """Count ``data``, keeping what belongs to the start or, for now, to the end."""
        self.size += len(data)
        room = KEEP_BYTES - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            del self.tail[:-KEEP_BYTES]

    def event(self, binary: bool) -> dict[str, Any]:
        """The event that tells the application of the skipped message."""
        return {
            "type": RECEIVE_OVERSIZED,
            "size": self.size,
            "limit": self.limit,
            "binary": binary,
            "head": bytes(self.head),
            "tail": bytes(self.tail),
        }


#: Autobahn's state of an open connection
_STATE_OPEN = WebSocketProtocol.STATE_OPEN

#: whether connections read complete single-frame messages themselves
#: (:meth:`LeanWebSocketProtocol.processData`); ``SYSMANAGE_FAST_FRAMES=0`` leaves every
#: frame to Autobahn
FAST_FRAMES = os.environ.get("SYSMANAGE_FAST_FRAMES", "1").strip() != "0"


class LeanWebSocketProtocol(WebSocketProtocol):  # type: ignore[misc]  # no types in daphne
    """Daphne's WebSocket protocol, with Autobahn's options read from the factory, a
    smaller queue of pending writes, and nothing of the opening handshake kept once the
    connection is open; on request, it skips oversized messages.

    Autobahn copies each option (``CONFIG_ATTRS``) onto a new connection unless the
    connection already has it; as class attributes reading the factory's value they are
    found, so not copied, and stay the factory's (which nothing changes after start).
    Each server has a subclass of its own (:meth:`for_factory`), whose first connection
    turns those attributes into the factory's values, so that Autobahn's reads of them
    for every frame are plain attribute reads.
    """

    #: Autobahn's ``ConnectionRequest`` (set by Daphne's ``onConnect``), then an
    #: :class:`OpenedRequest`
    request: Any
    #: whether the application asked for messages over the limit to be skipped
    skips_oversized = False
    #: the message over the limit being read past, if any
    skipping: SkippedMessage | None = None
    #: Autobahn's: the complete frames of the message being received
    message_data: list[bytes] | None
    #: Autobahn's: the bytes received and not yet read, whether the message being
    #: received is binary, and whether it is compressed
    data: bytes
    message_is_binary: bool
    _isMessageCompressed: bool  # noqa: N815 - Autobahn's name
    #: whether this class holds its factory's options as plain values
    options_fixed = False
    #: whether complete single-frame messages are read by :meth:`processData` itself
    #: rather than by Autobahn (``SYSMANAGE_FAST_FRAMES=0`` turns it off)
    fast_frames = FAST_FRAMES

    @classmethod
    def for_factory(cls) -> type[LeanWebSocketProtocol]:
        """A subclass for the connections of one factory."""
        return type(cls.__name__, (cls,), {"__module__": cls.__module__})

    def _connectionMade(self) -> None:  # noqa: N802 - Autobahn's name
        # Autobahn formats its 29 options for a debug line on every connection, logged
        # or not (pprint: a tenth of the event loop's time in a reconnect storm); when
        # nothing logs it, it gets nothing to format.  The event loop runs one
        # connection's setup at a time, so no other code sees the stand-in.
        quiet = getattr(self.log.debug, "__name__", "") == "_no_op"  # txaio's, below debug
        if quiet:
            autobahn_protocol.pformat = _not_formatted  # type: ignore[assignment]  # no options
        try:
            super()._connectionMade()
        finally:
            autobahn_protocol.pformat = pformat
        self.send_queue = _SendQueue()
        cls = type(self)
        if not cls.options_fixed and cls is not LeanWebSocketProtocol:
            # The server has set its options by the time anyone connects.  A callable
            # option (perMessageCompressionAccept) stays read from the factory: on the
            # class it would become a method of the connection.
            for option in WebSocketProtocol.CONFIG_ATTRS:
                value = getattr(self.factory, option)
                if not callable(value):
                    setattr(cls, option, value)
            cls.options_fixed = True

    def onOpen(self) -> None:  # noqa: N802 - Autobahn's name
        """Called by Autobahn once the handshake's answer is sent: Daphne logs the
        connection, then the request's headers, URI and query string (about 3 KB) are
        let go.  The application has its own copy of what it needs, in its scope."""
        super().onOpen()
        for name in HANDSHAKE_ONLY:
            setattr(self, name, None)
        self.request = OpenedRequest(self.request.path)

    def handle_reply(self, message: dict[str, Any]) -> None:
        """Called with each message of the application; an accept may ask for skipping."""
        if message.get("type") == "websocket.accept" and message.get(SKIP_OVERSIZED):
            self.skips_oversized = True
        super().handle_reply(message)

    def _max_message_size_exceeded(self, msg_size: int, max_msg_size: int, reason: str) -> None:
        """Called by Autobahn when a message (or frame) outgrows the limit, which fails
        the connection (1009); a connection that asked for it reads past the message
        instead.  Compressed messages are never skipped (Daphne does not negotiate
        compression, and a skipped one would leave the decompressor behind)."""
        if not self.skips_oversized or self._isMessageCompressed or self.websocket_version == 0:
            super()._max_message_size_exceeded(msg_size, max_msg_size, reason)
            return
        if self.skipping is None:
            self.skipping = SkippedMessage(self.maxMessagePayloadSize or max_msg_size)
            for chunk in self.message_data or ():  # the frames of the message already complete
                self.skipping.feed(chunk)
            self.message_data = []

    def onMessageFrameData(self, payload: bytes) -> None:  # noqa: N802 - Autobahn's name
        """Called by Autobahn for each piece of a message's frame."""
        if self.skipping is not None:
            self.skipping.feed(payload)
            return
        super().onMessageFrameData(payload)

    def onMessageFrameEnd(self) -> None:  # noqa: N802 - Autobahn's name
        """Called by Autobahn at the end of each frame of a message."""
        if self.skipping is not None:
            self.frame_data = None
            return
        super().onMessageFrameEnd()

    def onMessageEnd(self) -> None:  # noqa: N802 - Autobahn's name
        """Called by Autobahn at the end of a message: a skipped one is reported."""
        skipped = self.skipping
        if skipped is None:
            super().onMessageEnd()
            return
        self.skipping = None
        self.message_data = None
        if not self.muted:
            self.last_ping = time.time()  # as Daphne does for every message
            self.application_queue.put_nowait(skipped.event(self.message_is_binary))

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        """Called by Twisted with each read: Autobahn's own, whose first act is to
        format three values for a debug line (about 2 µs a read), skipped here when
        nothing logs it, as for :meth:`_connectionMade`."""
        if self.fast_frames and getattr(self.log.debug, "__name__", "") == "_no_op":
            self._dataReceived(data)
        else:
            super().dataReceived(data)

    def processData(self) -> bool:  # noqa: N802 - Autobahn's name
        """Called by Autobahn while bytes are buffered on an open or closing connection:
        read one frame (or part of one); True to be called again.

        The messages agents send are, nearly all, one complete frame each (FIN set,
        masked, text, well under the limits), and Autobahn's reading of one costs about
        14 µs of Python (``bench/frames.py``): a header object, a masker, a UTF-8
        validator, seven callbacks.
        Such a frame at the start of the buffer is read here in one step, with the same
        result: the same message to ``onMessage``, the same statistics, the same
        auto-ping bookkeeping.  Anything else (control frames, fragments, partial or
        unmasked frames, reserved bits, non-minimal lengths, frames over a limit,
        invalid UTF-8, compression, a message under way) is left to Autobahn, unchanged,
        which fails the connection as it always has.
        """
        if self.fast_frames and self.current_frame is None and self.state == _STATE_OPEN:
            taken = self._take_whole_message()
            if taken is not None:
                return taken
        return bool(super().processData())

    def _take_whole_message(self) -> bool | None:
        """Read a complete single-frame data message at the start of the buffer, as
        Autobahn would; None (nothing done) if the buffer starts with anything else.

        One difference: should ``onMessage`` raise, Autobahn would leave the message
        half-open (its next frame a protocol violation); here it is over.  Daphne's
        ``onMessage`` does not raise (the text is valid UTF-8 by then)."""
        data = self.data
        buffered = len(data)
        if buffered < 6:
            return None
        first = data[0]
        second = data[1]
        if (first != 0x81 and first != 0x82) or second < 0x80:  # FIN, no RSV, text/binary; masked
            return None
        length = second & 0x7F
        if length < 126:
            start = 6
        elif length == 126:
            length = (data[2] << 8) | data[3] if buffered >= 8 else 0
            if length < 126:  # not yet complete, or not minimally encoded
                return None
            start = 8
        else:
            length = int.from_bytes(data[2:10], "big") if buffered >= 14 else 0
            if not 65536 <= length <= 0x7FFFFFFFFFFFFFFF:
                return None
            start = 14
        end = start + length
        if (
            end > buffered
            or self.inside_message
            or self.failedByMe
            or self._perMessageCompress is not None
            or 0 < self.maxMessagePayloadSize < length
            or 0 < self.maxFramePayloadSize < length
            or not self.utf8validateIncoming
            or not self.applyMask
            or self.logFrames
            or self.trackedTimings
            or self._listeners is not None
        ):
            return None
        payload = data[start:end]
        if length:
            mask = data[start - 4 : start]
            payload = (
                int.from_bytes(payload, "big")
                ^ int.from_bytes((mask * ((length >> 2) + 1))[:length], "big")
            ).to_bytes(length, "big")
        text = first == 0x81
        if text:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return None  # Autobahn fails the connection (1007), with the octet's index
        # What Autobahn's onFrameBegin ... onFrameEnd leave behind for such a frame.
        self.data = data[end:]
        stats = self.trafficStats
        stats.incomingOctetsWebSocketLevel += length
        stats.incomingOctetsAppLevel += length
        stats.incomingWebSocketFrames += 1
        self._isMessageCompressed = False
        self.utf8validateIncomingCurrentMessage = text
        self.message_is_binary = not text
        self.message_data_total_length = self.frame_length = length
        self.frame_data = None
        if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
            self._cancelAutoPingTimeoutCall()
        stats.incomingWebSocketMessages += 1
        self.message_data = None
        self._onMessage(payload, not text)
        return len(self.data) > 0

    def onConnect(self, request: Any) -> Any:  # noqa: N802 - Autobahn's name
        """Called with a handshake; refused with 503 while the process drains, before
        any application sees it, so that a proxy tries another process."""
        if drain.draining():
            raise ConnectionDeny(503, "Service Unavailable")  # type: ignore[no-untyped-call]
        return super().onConnect(request)

    def sendHttpErrorResponse(  # noqa: N802 - Autobahn's name
        self,
        code: int,
        reason: str,
        responseHeaders: Any = None,  # noqa: N803
    ) -> None:
        """Answer a refused handshake; a 503 says when to try again, and that it ends."""
        if code == 503:
            responseHeaders = [  # noqa: N806
                *(responseHeaders or ()),
                ("Retry-After", "1"),
                ("Content-Length", "0"),
                ("Connection", "close"),
            ]
        super().sendHttpErrorResponse(code, reason, responseHeaders)

    def serverClose(self, code: int | None = None) -> None:  # noqa: N802 - Daphne's name
        """Close the socket with ``code``; Autobahn lets an application use only 1000
        and 3000-4999, so 1012 (a drain's "service restart") is sent as a frame here."""
        if code == drain.SERVICE_RESTART:
            self.sendCloseFrame(code=code, reasonUtf8=drain.SERVICE_RESTART_REASON.encode())
            return
        super().serverClose(code=code)


def _not_formatted(value: object, *args: Any, **kwargs: Any) -> str:
    """What Autobahn's unlogged debug line of a connection's options formats."""
    return ""


for _option in WebSocketProtocol.CONFIG_ATTRS:
    setattr(LeanWebSocketProtocol, _option, _FactoryOption(_option))


#: Seconds a WebSocket handshake may wait for the application to accept it
#: (``--websocket_connect_timeout``).  Daphne's default, 5 s, refused (403) every socket
#: whose authentication queued longer in a reconnect storm; each client then retried
#: after a longer back-off, and the storm lasted minutes instead of seconds.
HANDSHAKE_TIMEOUT = 60

#: Connections the kernel may hold for the server before it accepts them (capped by the
#: system's ``net.core.somaxconn``).
LISTEN_BACKLOG = 4096

access_log = logging.getLogger("sysmanage.access")
logger = logging.getLogger(__name__)


async def _settle_node() -> None:
    """Return once what this process published has left for the channel layer."""
    from sysmanage.node import Node  # imported late: it needs Django set up

    node = Node.current()
    if node is not None:
        await node.settle()


def _json_logs() -> bool:
    from django.conf import settings

    return bool(settings.LOG_FORMAT == "json")


class RedactingServer(Server):  # type: ignore[misc]  # daphne ships no type information
    """Daphne's server, redacting the path of each access-log entry, with lean
    WebSocket connections (:class:`Inbox`, :class:`LeanWebSocketProtocol`)."""

    endpoints: list[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Twisted listens with a backlog of 50: thousands of agents reconnecting at once
        # after a restart overflowed it, and each dropped SYN cost its sender 1-3 s.
        self.endpoints = [
            f"{e}:backlog={LISTEN_BACKLOG}" if e.startswith("tcp:") and "backlog=" not in e else e
            for e in self.endpoints
        ]

    @property
    def ws_factory(self) -> Any:
        """The factory of WebSocket protocols, which Daphne makes in ``run``."""
        return self._ws_factory

    @ws_factory.setter
    def ws_factory(self, factory: Any) -> None:
        factory.protocol = LeanWebSocketProtocol.for_factory()
        self._ws_factory = factory

    def protocol_disconnected(self, protocol: Any) -> None:
        """Called by Daphne when a protocol is done with the server: an HTTP request
        answered or upgraded, a WebSocket closed (or refused while draining, before
        Daphne knew of it).

        An upgraded request (its transport handed to the WebSocket protocol, unanswered)
        stays in its HTTP channel's queue of requests, where nothing reads it again: the
        channel stays the transport's producer, but while a request is being handled its
        pausing and resuming never look at the queue.  Taken out, it is freed.
        """
        if protocol not in self.connections:
            return
        super().protocol_disconnected(protocol)
        channel = getattr(protocol, "channel", None)
        if (
            isinstance(protocol, WebRequest)
            and protocol.transport is None
            and not protocol.finished
            and channel is not None
            and protocol in channel.requests
        ):
            channel.requests.remove(protocol)

    def create_application(self, protocol: Any, scope: dict[str, Any]) -> Any:
        """Start the application of a new connection; return where its messages go.

        Daphne's own, with an :class:`Inbox` instead of an ``asyncio.Queue`` for
        WebSocket connections (HTTP requests, short-lived, keep Daphne's queue).
        """
        if not isinstance(protocol, WebSocketProtocol):
            return super().create_application(protocol, scope)
        assert "application_instance" not in self.connections[protocol]
        inbox = Inbox()
        scope.setdefault("asgi", {"version": "3.0"})
        instance = self.application(
            scope=scope, receive=inbox.get, send=partial(self.handle_reply, protocol)
        )
        if protocol not in self.connections:
            return None
        self.connections[protocol]["application_instance"] = asyncio.ensure_future(instance)
        return inbox

    def run(self) -> None:
        """Serve until stopped, once the collector is settled (:mod:`sysmanage.gcwatch`):
        the application is imported by now."""
        gcwatch.settle()
        super().run()

    def kill_all_applications(self) -> Any:
        """Called by Twisted as shutdown begins (SIGTERM, SIGINT): drain the process,
        then cancel what is left, as Daphne does; Twisted waits for the Deferred."""
        # A fresh context: the drain belongs to no request or connection (log lines).
        task = asyncio.get_event_loop().create_task(self._drain(), context=contextvars.Context())
        drained = defer.Deferred.fromFuture(task)
        drained.addCallback(lambda _: Server.kill_all_applications(self))
        return drained

    async def _drain(self) -> None:
        from django.conf import settings  # Django is set up by the application module

        interrupted = getattr(reactor, "_exitSignal", None) == signal.SIGINT
        window = 0.0 if interrupted else settings.DRAIN_SECONDS
        try:
            await drain.drain(window, busy=self._busy, settle=_settle_node)
        except Exception:
            logger.exception("draining failed; stopping at once")

    def _busy(self) -> int:
        """How many connections' handlers (WebSocket or HTTP request) are still running."""
        return sum(
            1
            for details in self.connections.values()
            if (instance := details.get("application_instance")) is not None and not instance.done()
        )

    def log_action(self, protocol: str, action: str, details: dict[str, Any]) -> None:
        """Called by Daphne for each access-log entry (HTTP request, WebSocket event)."""
        if details.get("path") is not None:
            details = {**details, "path": redact(str(details["path"]))}
        if self.action_logger is not None and _json_logs():
            # With LOG_FORMAT=json the access log is JSON lines too, through logging.
            client = details.get("client")
            access_log.info(
                "%s %s",
                details.get("method") or f"{protocol}.{action}",
                details.get("path"),
                extra={
                    "kind": f"{protocol}.{action}",
                    "client": client if isinstance(client, str) else str(client or ""),
                    "path": details.get("path"),
                    "status": details.get("status"),
                    "size": details.get("size"),
                },
            )
            return
        super().log_action(protocol, action, details)


class LeanAsyncioReactor(AsyncioSelectorReactor):
    """Twisted's asyncio reactor, calling a socket's reader directly when it is readable.

    Twisted's own wraps every read in ``log.callWithLogger``, which asks the socket for
    its log prefix and pushes it on Twisted's context stack around the call, so that
    legacy log messages of the read carry it: four Python calls and a dictionary for
    each frame an agent sends, about a tenth of the server's CPU per report
    (docs/benchmarks.md, "Agent ingest").  Daphne sends Twisted's log nowhere unless
    verbose, and a failed read is still logged (by Twisted's reactor, or asyncio's).
    """

    def addReader(self, reader: Any) -> None:  # noqa: N802 - Twisted's name
        """Called by Twisted to watch ``reader``: Twisted's own, without the wrapper."""
        if reader in self._readers or reader in self._continuousPolling._readers:
            return
        fd = reader.fileno()
        try:
            self._asyncioEventloop.add_reader(fd, self._readOrWrite, reader, True)
            self._readers[reader] = fd
        except OSError as exc:
            self._unregisterFDInAsyncio(fd)  # type: ignore[no-untyped-call]  # Twisted's
            if exc.errno != errno.EPERM:
                raise
            # epoll cannot watch it (a file): poll it, as Twisted does
            self._continuousPolling.addReader(reader)  # type: ignore[no-untyped-call]


def use_lean_reads(installed: Any) -> bool:
    """Make the installed asyncio reactor a :class:`LeanAsyncioReactor` (same object,
    same state, sockets watched from now on are read directly); False if another kind
    of reactor is installed."""
    if type(installed) is AsyncioSelectorReactor:
        installed.__class__ = LeanAsyncioReactor
    return isinstance(installed, LeanAsyncioReactor)


class RedactingCommandLineInterface(CommandLineInterface):  # type: ignore[misc]  # as above
    """Daphne's command line, serving with :class:`RedactingServer`, and giving a
    connecting socket :data:`HANDSHAKE_TIMEOUT` seconds rather than 5 by default."""

    server_class = RedactingServer

    def __init__(self) -> None:
        super().__init__()
        self.parser.set_defaults(websocket_connect_timeout=HANDSHAKE_TIMEOUT)


def main(argv: list[str] | None = None) -> None:
    """Check the configuration, then run Daphne with ``argv`` (default: this process's
    arguments)."""
    from twisted.internet import reactor  # installed by daphne.server, imported above

    argv = sys.argv[1:] if argv is None else argv
    preflight.exit_on_problems(preflight.bound_host(argv))
    use_lean_reads(reactor)
    RedactingCommandLineInterface().run(argv)


if __name__ == "__main__":
    main()
