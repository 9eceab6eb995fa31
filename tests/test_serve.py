"""What the server entry point (``sysmanage.serve``) keeps per WebSocket connection:
Daphne's own code paths, driven through Twisted's in-memory transport, with the lean
inbox, protocol and the release of the upgraded HTTP request."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
import weakref
from typing import Any

import pytest
from autobahn.websocket.protocol import WebSocketProtocol as AutobahnProtocol
from daphne.http_protocol import HTTPFactory, WebRequest
from daphne.server import Server
from daphne.ws_protocol import WebSocketFactory
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from sysmanage import serve
from sysmanage.oversized import KEEP_BYTES, SKIP_OVERSIZED
from sysmanage.serve import (
    HANDSHAKE_ONLY,
    HANDSHAKE_TIMEOUT,
    LISTEN_BACKLOG,
    Inbox,
    LeanWebSocketProtocol,
    OpenedRequest,
    RedactingCommandLineInterface,
    RedactingServer,
)

UPGRADE = (
    b"GET /ws?token=s3cr3t HTTP/1.1\r\nHost: testserver\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


# -- the inbox ---------------------------------------------------------------------------


async def test_inbox_hands_over_in_order_and_waits_when_empty():
    inbox = Inbox()
    inbox.put_nowait({"n": 1})
    inbox.put_nowait({"n": 2})
    assert await inbox.get() == {"n": 1}
    assert await inbox.get() == {"n": 2}
    waiting = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    inbox.put_nowait({"n": 3})
    assert await asyncio.wait_for(waiting, 1) == {"n": 3}


async def test_a_cancelled_get_takes_nothing():
    inbox = Inbox()
    waiting = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait({"n": 1})  # wakes the reader, which is cancelled before it runs
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await asyncio.wait_for(inbox.get(), 1) == {"n": 1}


async def test_a_second_reader_is_refused():
    inbox = Inbox()
    first = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="another reader"):
        await inbox.get()
    inbox.put_nowait({"n": 1})
    assert await asyncio.wait_for(first, 1) == {"n": 1}


async def test_an_empty_inbox_keeps_no_queue():
    inbox = Inbox()
    inbox.put_nowait({"n": 1})
    await inbox.get()
    assert inbox._items is None


# -- a WebSocket upgrade through Daphne ----------------------------------------------------


class Upgraded:
    """One WebSocket handshake served by a Daphne server of ``server_class`` over an
    in-memory transport, to an application that accepts it and waits."""

    def __init__(self, server_class: type[Server]) -> None:
        self.received: list[dict[str, Any]] = []
        #: every HTTP request the server was told of (weakly)
        self.http_requests: list[weakref.ref[Any]] = []
        self.server = server_class(self.application, endpoints=["tcp:port=0"])
        self.server.connections = {}
        connected = self.server.protocol_connected

        def note(protocol: Any) -> None:
            if isinstance(protocol, WebRequest):
                self.http_requests.append(weakref.ref(protocol))
            connected(protocol)

        self.server.protocol_connected = note
        # What Daphne's Server.run makes before it listens.
        self.server.ws_factory = WebSocketFactory(self.server, server="Daphne")
        self.server.ws_factory.setProtocolOptions(autoPingTimeout=7, allowNullOrigin=True)
        self.server.http_factory = HTTPFactory(self.server)
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        self.channel = self.server.http_factory.buildProtocol(peer)
        self.transport = StringTransport(
            peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 8000)
        )
        self.channel.makeConnection(self.transport)

    async def application(self, scope: Any, receive: Any, send: Any) -> None:
        self.received.append(await receive())
        await send({"type": "websocket.accept"})
        await asyncio.Event().wait()

    async def handshake(self) -> None:
        self.channel.dataReceived(UPGRADE)
        for _ in range(100):
            if self.transport.value().startswith(b"HTTP/1.1 101"):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"no handshake answer: {self.transport.value()!r}")

    def requests(self) -> list[Any]:
        """The HTTP requests the connection's HTTP channel still holds."""
        return list(self.channel._channel.requests)

    def stop(self) -> None:
        for details in self.server.connections.values():
            instance = details.get("application_instance")
            if instance is not None:
                instance.cancel()


async def test_the_upgraded_http_request_is_let_go():
    served = Upgraded(RedactingServer)
    try:
        await served.handshake()
        # Daphne hands the request's data to the WebSocket protocol, then is done with it.
        assert served.received == [{"type": "websocket.connect"}]
        assert served.requests() == []
    finally:
        served.stop()


async def test_daphne_alone_keeps_the_upgraded_request():
    """The reference: what the release above saves (the request, its headers and URL,
    token included) for as long as the socket is open."""
    served = Upgraded(Server)
    try:
        await served.handshake()
        kept = served.requests()
        assert len(kept) == 1
        assert b"s3cr3t" in kept[0].uri
    finally:
        served.stop()


@pytest.mark.parametrize(("server_class", "freed"), [(RedactingServer, True), (Server, False)])
async def test_the_released_request_is_freed(server_class, freed):
    served = Upgraded(server_class)
    try:
        await served.handshake()
        # What Daphne's application checker does within a second: forget the answered
        # or upgraded requests.
        served.server.connections = {
            p: d for p, d in served.server.connections.items() if "disconnected" not in d
        }
        gc.collect()
        assert [ref() is None for ref in served.http_requests] == [freed]
    finally:
        served.stop()


async def test_connections_read_autobahns_options_from_the_factory():
    served = Upgraded(RedactingServer)
    try:
        await served.handshake()
        protocol = served.transport.protocol
        assert isinstance(protocol, LeanWebSocketProtocol)
        assert protocol.autoPingTimeout == 7
        for option in AutobahnProtocol.CONFIG_ATTRS_COMMON:
            assert option not in vars(protocol)
            assert getattr(protocol, option) == getattr(served.server.ws_factory, option)
        # ... as plain values of the server's own protocol class, once one connected: no
        # call per read (Autobahn reads several for every frame)
        assert vars(type(protocol))["autoPingTimeout"] == 7
        assert type(protocol) is not LeanWebSocketProtocol
        assert not isinstance(vars(LeanWebSocketProtocol)["autoPingTimeout"], int)
        # a callable option stays the factory's (on the class it would become a method)
        factory = served.server.ws_factory
        assert protocol.perMessageCompressionAccept is factory.perMessageCompressionAccept
        # the queue of chopped writes still works as Autobahn uses it
        protocol.sendData(b"abcdef", chopsize=3)
        assert served.transport.value().endswith(b"abc")
        assert len(protocol.send_queue) == 1
    finally:
        served.stop()


async def test_a_connection_formats_no_debug_line_nobody_logs(monkeypatch):
    import autobahn.websocket.protocol as autobahn_protocol

    formatted: list[object] = []

    def counting(value: object) -> str:
        formatted.append(value)
        return ""

    monkeypatch.setattr(autobahn_protocol, "pformat", counting)
    monkeypatch.setattr(serve, "pformat", counting)  # what the connection puts back
    served = Upgraded(RedactingServer)
    try:
        await served.handshake()
        assert isinstance(served.transport.protocol, LeanWebSocketProtocol)
        assert formatted == []
        assert autobahn_protocol.pformat is counting
    finally:
        served.stop()


# -- reads without Twisted's logging context ------------------------------------------------


def test_the_lean_reactor_reads_a_socket_directly():
    import socket

    from twisted.internet.asyncioreactor import AsyncioSelectorReactor
    from twisted.python import log

    from sysmanage.serve import LeanAsyncioReactor, use_lean_reads

    loop = asyncio.new_event_loop()
    reactor = AsyncioSelectorReactor(loop)
    try:
        assert use_lean_reads(reactor)
        assert isinstance(reactor, LeanAsyncioReactor)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        reads: list[bytes] = []

        class Reader:
            def fileno(self) -> int:
                return ours.fileno()

            def doRead(self) -> None:  # noqa: N802 - Twisted's name
                reads.append(ours.recv(100))

            def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
                return "reader"

        reader = Reader()
        reactor.addReader(reader)
        handle = loop._selector.get_key(ours.fileno()).data[0]
        assert handle._callback is not log.callWithLogger
        theirs.send(b"frame")
        loop.run_until_complete(asyncio.sleep(0.05))
        assert reads == [b"frame"]
        reactor.removeReader(reader)
        ours.close()
        theirs.close()
    finally:
        loop.close()


async def test_an_open_connection_keeps_nothing_of_its_handshake():
    served = Upgraded(RedactingServer)
    try:
        await served.handshake()
        protocol = served.transport.protocol
        assert protocol.state == protocol.STATE_OPEN
        for name in HANDSHAKE_ONLY:
            assert getattr(protocol, name) is None, name
        assert isinstance(protocol.request, OpenedRequest)
        assert protocol.request.path == "/ws"
        # the token in the query string stays only in what the application was given
        kept = [repr(value) for value in vars(protocol).values() if value is not protocol]
        assert [text for text in kept if "s3cr3t" in text] == ["b'token=s3cr3t'"]
        # the connection still works: a frame goes out
        protocol.sendMessage(b"hello")
        assert served.transport.value().endswith(b"hello")
    finally:
        served.stop()


def test_the_server_listens_with_a_backlog_for_a_reconnect_storm():
    """Twisted's default backlog (50) overflowed when thousands of agents reconnected at
    once after a restart: each dropped SYN cost its sender a retransmission (1-3 s)."""
    server = RedactingServer(None, endpoints=["tcp:port=0:interface=127.0.0.1", "unix:/x"])
    assert server.endpoints == [
        f"tcp:port=0:interface=127.0.0.1:backlog={LISTEN_BACKLOG}",
        "unix:/x",
    ]
    explicit = RedactingServer(None, endpoints=["tcp:port=0:backlog=10"])
    assert explicit.endpoints == ["tcp:port=0:backlog=10"]


def test_a_handshake_may_wait_for_its_authentication_in_a_storm():
    """Daphne refuses a handshake not accepted within 5 s: in a reconnect storm that
    dropped thousands of sockets whose authentication was queued."""
    args = RedactingCommandLineInterface().parser.parse_args(["sysmanage.asgi:application"])
    assert args.websocket_connect_timeout == HANDSHAKE_TIMEOUT >= 30
    chosen = RedactingCommandLineInterface().parser.parse_args(
        ["--websocket_connect_timeout", "7", "sysmanage.asgi:application"]
    )
    assert chosen.websocket_connect_timeout == 7


# -- messages over the limit -----------------------------------------------------------------


def client_frame(payload: bytes, *, opcode: int = 1, fin: bool = True) -> bytes:
    """One masked frame, as a client sends it."""
    mask = b"\x01\x02\x03\x04"
    head = bytes([(0x80 if fin else 0) | opcode])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    elif len(payload) < 65536:
        head += bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + len(payload).to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Skipping(Upgraded):
    """A connection whose application may ask for oversized messages to be skipped, and
    records every message it receives; Daphne's limit is ``LIMIT`` bytes."""

    LIMIT = 1000

    def __init__(self, server_class: type[Server], *, skip: bool) -> None:
        self.skip = skip
        super().__init__(server_class)
        self.server.ws_factory.setProtocolOptions(
            maxMessagePayloadSize=self.LIMIT, maxFramePayloadSize=self.LIMIT
        )

    async def application(self, scope: Any, receive: Any, send: Any) -> None:
        self.received.append(await receive())
        await send({"type": "websocket.accept", SKIP_OVERSIZED: self.skip})
        while True:
            self.received.append(await receive())

    async def send(self, *frames: bytes) -> None:
        protocol = self.transport.protocol
        for frame in frames:
            protocol.dataReceived(frame)
        await asyncio.sleep(0.01)


async def test_an_oversized_message_is_skipped_and_reported_when_asked_for():
    served = Skipping(RedactingServer, skip=True)
    try:
        await served.handshake()
        big = b"{" + b"a" * (KEEP_BYTES - 1) + b"b" * 50_000 + b"c" * (KEEP_BYTES - 1) + b"}"
        await served.send(client_frame(big), client_frame(b'{"small": 1}'))
        _, skipped, small = served.received
        assert skipped == {
            "type": "websocket.receive_oversized",
            "size": len(big),
            "limit": Skipping.LIMIT,
            "binary": False,
            "head": big[:KEEP_BYTES],
            "tail": big[-KEEP_BYTES:],
        }
        # the connection goes on: the next message arrives as usual
        assert small == {"type": "websocket.receive", "text": '{"small": 1}'}
        assert served.transport.protocol.skipping is None
    finally:
        served.stop()


async def test_a_fragmented_message_is_skipped_from_the_frame_that_outgrows_the_limit():
    served = Skipping(RedactingServer, skip=True)
    try:
        await served.handshake()
        first, second = b"x" * 600, b"y" * 600
        await served.send(
            client_frame(first, fin=False),
            client_frame(second, opcode=0),
            client_frame(b"\x00\x01", opcode=2),
        )
        _, skipped, binary = served.received
        assert (skipped["size"], skipped["head"]) == (1200, first + second)
        assert binary == {"type": "websocket.receive", "bytes": b"\x00\x01"}
    finally:
        served.stop()


async def test_without_asking_an_oversized_message_fails_the_connection():
    """The reference: Daphne's (Autobahn's) own behaviour, the connection failed (1009,
    or dropped) and nothing for the application but the disconnect that follows."""
    served = Skipping(RedactingServer, skip=False)
    try:
        await served.handshake()
        await served.send(client_frame(b"z" * 5000))
        assert [m["type"] for m in served.received] == ["websocket.connect"]
        protocol = served.transport.protocol
        assert protocol.failedByMe
        assert protocol.wasMaxFramePayloadSizeExceeded or protocol.wasMaxMessagePayloadSizeExceeded
    finally:
        served.stop()


async def test_a_skipped_message_is_never_held_in_memory():
    """32 MiB read past in 64 KiB pieces: what the process allocates meanwhile stays
    within a few pieces and the kept start and end, whatever the message's size."""
    served = Skipping(RedactingServer, skip=True)
    try:
        await served.handshake()
        protocol = served.transport.protocol
        size = 32 * 1024 * 1024
        header = bytes([0x81, 0x80 | 127]) + size.to_bytes(8, "big") + b"\x00" * 4  # mask 0
        piece = b"x" * 65536
        protocol.dataReceived(header)
        tracemalloc.start()
        try:
            for _ in range(size // len(piece)):
                protocol.dataReceived(piece)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        await asyncio.sleep(0.01)
        assert peak < 1024 * 1024, peak
        assert served.received[-1]["size"] == size
        assert len(served.received[-1]["head"]) == len(served.received[-1]["tail"]) == KEEP_BYTES
    finally:
        served.stop()


def test_the_collector_is_settled_before_serving(monkeypatch):
    """The server settles the collector (sysmanage.gcwatch) once the application is
    imported, just before Daphne starts serving."""
    from sysmanage import gcwatch

    calls: list[str] = []
    monkeypatch.setattr(gcwatch, "settle", lambda: calls.append("settle"))
    monkeypatch.setattr(Server, "run", lambda self: calls.append("run"))
    RedactingServer(application=None, endpoints=["tcp:port=0:interface=127.0.0.1"]).run()
    assert calls == ["settle", "run"]
