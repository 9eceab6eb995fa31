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
  of an ``asyncio.Queue`` (three deques and an event, about 3 KB while empty);
- Autobahn copies its 29 protocol options from the factory onto every connection, which
  doubles the size of the connection's attribute dictionary; :class:`LeanWebSocketProtocol`
  reads them from the factory instead (Daphne sets them once, at start), and queues its
  rare chopped writes in a list rather than a deque;
- the HTTP request a WebSocket was upgraded from (its headers, URL and query string,
  about 3 KB) is let go once the WebSocket protocol has it, instead of staying in the
  HTTP channel's list of requests until the connection ends.
"""

from __future__ import annotations

import asyncio
import collections
import sys
from functools import partial
from typing import Any

from daphne.cli import CommandLineInterface
from daphne.http_protocol import WebRequest
from daphne.server import Server
from daphne.ws_protocol import WebSocketProtocol

from sysmanage.logfilters import redact


class Inbox:
    """The messages a server hands one connection's application, in arrival order.

    What Daphne uses an ``asyncio.Queue`` for (``put_nowait`` by the protocol, ``get`` as
    the application's ``receive``), for a single reader: an ASGI application awaits its
    ``receive`` in one place at a time, and a second concurrent ``get`` is refused
    rather than left waiting forever.  An empty inbox holds nothing but two empty slots.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[dict[str, Any]] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: dict[str, Any]) -> None:
        """Add ``item``, waking the reader if it waits."""
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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


class LeanWebSocketProtocol(WebSocketProtocol):  # type: ignore[misc]  # no types in daphne
    """Daphne's WebSocket protocol, with Autobahn's options read from the factory and a
    smaller queue of pending writes.

    Autobahn copies each option (``CONFIG_ATTRS``) onto a new connection unless the
    connection already has it; as class attributes reading the factory's value they are
    found, so not copied, and stay the factory's (which nothing changes after start).
    """

    def _connectionMade(self) -> None:  # noqa: N802 - Autobahn's name
        super()._connectionMade()
        self.send_queue = _SendQueue()


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
        factory.protocol = LeanWebSocketProtocol
        self._ws_factory = factory

    def protocol_disconnected(self, protocol: Any) -> None:
        """Called by Daphne when a protocol is done with the server: an HTTP request
        answered or upgraded, a WebSocket closed.

        An upgraded request (its transport handed to the WebSocket protocol, unanswered)
        stays in its HTTP channel's queue of requests, where nothing reads it again: the
        channel stays the transport's producer, but while a request is being handled its
        pausing and resuming never look at the queue.  Taken out, it is freed.
        """
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

    def log_action(self, protocol: str, action: str, details: dict[str, Any]) -> None:
        """Called by Daphne for each access-log entry (HTTP request, WebSocket event)."""
        if details.get("path") is not None:
            details = {**details, "path": redact(str(details["path"]))}
        super().log_action(protocol, action, details)


class RedactingCommandLineInterface(CommandLineInterface):  # type: ignore[misc]  # as above
    """Daphne's command line, serving with :class:`RedactingServer`, and giving a
    connecting socket :data:`HANDSHAKE_TIMEOUT` seconds rather than 5 by default."""

    server_class = RedactingServer

    def __init__(self) -> None:
        super().__init__()
        self.parser.set_defaults(websocket_connect_timeout=HANDSHAKE_TIMEOUT)


def main(argv: list[str] | None = None) -> None:
    """Run Daphne with ``argv`` (default: this process's arguments)."""
    RedactingCommandLineInterface().run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
