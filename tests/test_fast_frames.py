"""The fast path of :class:`sysmanage.serve.LeanWebSocketProtocol` for complete
single-frame messages against Autobahn's own reading: the same byte streams (valid
frames, split anywhere, mixed with control frames, fragments and every kind of bad
frame) fed to a connection with it and to one without must give the same messages, the
same bytes sent back (pongs, close frames), the same close codes and the same state."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from daphne.http_protocol import HTTPFactory
from daphne.ws_protocol import WebSocketFactory
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from sysmanage.oversized import SKIP_OVERSIZED
from sysmanage.serve import LeanWebSocketProtocol, RedactingServer
from tests.test_serve import UPGRADE

#: the message limit of the servers below (Daphne's ``--websocket-max-message-size``)
LIMIT = 70_000


def frame(
    payload: bytes,
    *,
    opcode: int = 1,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = b"\x11\x22\x33\x44",
    length: int | None = None,
    encoding: int | None = None,
) -> bytes:
    """One frame; ``length`` declares another payload length than the payload's,
    ``encoding`` forces the 7-bit (0), 16-bit (126) or 64-bit (127) length form."""
    n = len(payload) if length is None else length
    if encoding is None:
        encoding = 0 if n < 126 else 126 if n < 65536 else 127
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask is not None else 0
    if encoding == 0:
        head += bytes([bit | n])
    elif encoding == 126:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Recorder:
    """Stands in for a connection's application queue."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events

    def put_nowait(self, item: dict[str, Any]) -> None:
        self.events.append(("queued", item))


class Servers:
    """One server per set of Autobahn options; open connections on demand."""

    def __init__(self) -> None:
        self.servers: dict[tuple[bool, bool], RedactingServer] = {}

    async def application(self, scope: Any, receive: Any, send: Any) -> None:
        await receive()
        skip = scope["path"].endswith("/skip")
        await send({"type": "websocket.accept", SKIP_OVERSIZED: skip})
        await asyncio.Event().wait()

    def server(self, fail_by_drop: bool, tiny_frames: bool) -> RedactingServer:
        key = (fail_by_drop, tiny_frames)
        if key not in self.servers:
            server = RedactingServer(self.application, endpoints=["tcp:port=0"])
            server.connections = {}
            server.ws_factory = WebSocketFactory(server, server="Daphne")
            server.ws_factory.setProtocolOptions(
                autoPingTimeout=30,
                allowNullOrigin=True,
                maxMessagePayloadSize=LIMIT,
                maxFramePayloadSize=300 if tiny_frames else LIMIT,
                failByDrop=fail_by_drop,
            )
            server.http_factory = HTTPFactory(server)
            self.servers[key] = server
        return self.servers[key]

    async def open(
        self, *, fast: bool, skip: bool, fail_by_drop: bool, tiny_frames: bool
    ) -> tuple[LeanWebSocketProtocol, StringTransport, list[Any]]:
        server = self.server(fail_by_drop, tiny_frames)
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        channel = server.http_factory.buildProtocol(peer)
        transport = StringTransport(
            peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 8000)
        )
        channel.makeConnection(transport)
        path = b"/ws/skip" if skip else b"/ws/keep"
        channel.dataReceived(UPGRADE.replace(b"/ws?token=s3cr3t", path))
        for _ in range(200):
            if transport.value().startswith(b"HTTP/1.1 101"):
                break
            await asyncio.sleep(0)
        else:
            raise AssertionError(f"no handshake answer: {transport.value()!r}")
        protocol = transport.protocol
        assert isinstance(protocol, LeanWebSocketProtocol)
        assert protocol.skips_oversized is skip
        transport.clear()
        events: list[Any] = []
        protocol.fast_frames = fast
        protocol.onMessage = lambda payload, binary: events.append(("message", payload, binary))
        protocol.application_queue = Recorder(events)
        return protocol, transport, events

    def stop(self) -> None:
        for server in self.servers.values():
            for details in server.connections.values():
                instance = details.get("application_instance")
                if instance is not None:
                    instance.cancel()


@pytest.fixture
async def servers():
    made = Servers()
    yield made
    made.stop()


def outcome(protocol: LeanWebSocketProtocol, transport: StringTransport, events: list[Any]) -> Any:
    stats = protocol.trafficStats
    return {
        "events": events,
        "sent": transport.value(),
        "disconnecting": transport.disconnecting,
        "state": protocol.state,
        "buffered": protocol.data,
        "localCloseCode": protocol.localCloseCode,
        "localCloseReason": protocol.localCloseReason,
        "remoteCloseCode": protocol.remoteCloseCode,
        "failedByMe": protocol.failedByMe,
        "droppedByMe": protocol.droppedByMe,
        "wasClean": protocol.wasClean,
        "inside_message": protocol.inside_message,
        "message_is_binary": getattr(protocol, "message_is_binary", None),
        "message_length": getattr(protocol, "message_data_total_length", None),
        "frame_length": getattr(protocol, "frame_length", None),
        "message_data": getattr(protocol, "message_data", None),
        "frame_data": getattr(protocol, "frame_data", None),
        "auto_ping_pending": protocol.autoPingPending,
        "auto_ping_timeout": protocol.autoPingTimeoutCall is not None,
        "frame_too_big": protocol.wasMaxFramePayloadSizeExceeded,
        "message_too_big": protocol.wasMaxMessagePayloadSizeExceeded,
        "skipping": protocol.skipping is not None,
        "stats": {
            name: getattr(stats, name)
            for name in (
                "incomingOctetsWireLevel",
                "incomingOctetsWebSocketLevel",
                "incomingOctetsAppLevel",
                "incomingWebSocketFrames",
                "incomingWebSocketMessages",
                "outgoingOctetsWireLevel",
                "outgoingWebSocketFrames",
            )
        },
    }


async def compare(
    servers: Servers,
    chunks: list[bytes],
    *,
    skip: bool = False,
    fail_by_drop: bool = True,
    tiny_frames: bool = False,
    prepare: Any = None,
) -> Any:
    """Feed ``chunks`` to a connection with the fast path and one without; both must
    end the same.  Returns the outcome."""
    results = []
    for fast in (True, False):
        protocol, transport, events = await servers.open(
            fast=fast, skip=skip, fail_by_drop=fail_by_drop, tiny_frames=tiny_frames
        )
        if prepare is not None:
            prepare(protocol, events)
        for chunk in chunks:
            if protocol.state == protocol.STATE_CLOSED:
                break  # Twisted reads nothing more from a dropped connection
            protocol.dataReceived(chunk)
        results.append(outcome(protocol, transport, events))
    with_fast, without = results
    assert with_fast == without, chunks
    return with_fast


# -- the pieces of the byte streams ---------------------------------------------------------

INVALID_UTF8 = [
    b"\xff",
    b"\xc0\xaf",  # overlong
    b"\xed\xa0\x80",  # surrogate
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xe2\x82",  # truncated at the end
    b"\x80abc",  # continuation byte first
]


def random_text(rng: random.Random, size: int) -> bytes:
    alphabet = 'abc {}":,0123456789éü€𝄞\U0010ffff\ufffe'
    text = "".join(rng.choice(alphabet) for _ in range(size))
    return text.encode()


def random_piece(rng: random.Random) -> bytes:
    """One frame, or a short run of frames, good or bad."""
    mask = rng.choice([rng.randbytes(4), b"\x00\x00\x00\x00"])
    size = rng.choice([0, 1, 5, 125, 126, 127, 300, 600, 2000, 65535, 65536, 70001])
    kind = rng.randrange(24)
    if kind < 8:
        return frame(random_text(rng, size)[:size] if size < 2000 else b"a" * size, mask=mask)
    if kind < 10:
        return frame(rng.randbytes(size), opcode=2, mask=mask)
    if kind == 10:
        bad = rng.choice(INVALID_UTF8)
        at = rng.randrange(size + 1)
        return frame(b"x" * at + bad + b"y" * (size - at), mask=mask)
    if kind == 11:
        return frame(rng.randbytes(rng.randrange(126)), opcode=rng.choice([9, 10]), mask=mask)
    if kind == 12:  # close, with a code and maybe a reason, or odd ones
        body = rng.choice(
            [
                b"",
                b"\x03\xe8",
                b"\x03\xe8bye",
                b"\x03",  # length 1
                b"\x03\xec",  # 1004, reserved
                b"\x03\xe8\xff",  # invalid UTF-8 reason
            ]
        )
        return frame(body, opcode=8, mask=mask)
    if kind == 13:  # a fragmented message, maybe with a control frame inside
        opcode = rng.choice([1, 2])
        parts = [random_text(rng, rng.randrange(0, 200)) for _ in range(rng.randrange(1, 4))]
        if opcode == 1 and rng.random() < 0.3:
            joined = "€".encode()
            parts = [joined[:1], joined[1:]]  # a character split over frames
        out = frame(parts[0], opcode=opcode, fin=len(parts) == 1, mask=mask)
        for i, part in enumerate(parts[1:], 2):
            if rng.random() < 0.3:
                out += frame(b"ping", opcode=9, mask=mask)
            out += frame(part, opcode=0, fin=i == len(parts), mask=mask)
        return out
    if kind == 14:
        return frame(b"hello", rsv=rng.choice([1, 2, 4, 7]), mask=mask)
    if kind == 15:
        return frame(b"hello", mask=None)  # unmasked
    if kind == 16:
        return frame(b"hello", opcode=rng.choice([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]), mask=mask)
    if kind == 17:  # continuation outside a message
        return frame(b"more", opcode=0, mask=mask)
    if kind == 18:  # a new message while one is under way
        return frame(b"start", fin=False, mask=mask) + frame(b"again", mask=mask)
    if kind == 19:  # lengths not minimally encoded
        payload = random_text(rng, rng.randrange(0, 126))[:125]
        return frame(payload, mask=mask, encoding=rng.choice([126, 127]))
    if kind == 20:  # 64-bit length with its high bit set, or huge
        declared = rng.choice([2**63, 2**64 - 1, 2**63 - 1, LIMIT + 1, 2**40])
        return frame(b"", length=declared, encoding=127, mask=mask)[: rng.choice([10, 14])]
    if kind == 21:  # a control frame too long, or fragmented
        if rng.random() < 0.5:
            return frame(b"p" * 126, opcode=9, mask=mask)
        return frame(b"p", opcode=9, fin=False, mask=mask)
    if kind == 22:  # over the limit, as one frame or in fragments
        if rng.random() < 0.5:
            return frame(b"z" * (LIMIT + 1), mask=mask)
        return frame(b"z" * 40_000, fin=False, mask=mask) + frame(
            b"z" * 40_000, opcode=0, mask=mask
        )
    return frame(random_text(rng, 50), mask=mask) * rng.randrange(2, 6)  # a burst


def random_chunks(rng: random.Random, stream: bytes) -> list[bytes]:
    """``stream`` cut as reads might cut it."""
    how = rng.randrange(4)
    if how == 0 or len(stream) < 2:
        return [stream]
    if how == 1 and len(stream) < 3000:
        return [stream[i : i + 1] for i in range(len(stream))]
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randrange(1, 8))))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


# -- the tests -----------------------------------------------------------------------------


async def test_a_typical_message_takes_the_fast_path(servers, monkeypatch):
    taken = []
    original = LeanWebSocketProtocol._take_whole_message

    def spy(self: Any) -> Any:
        result = original(self)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(LeanWebSocketProtocol, "_take_whole_message", spy)
    report = b'{"type": "metrics", "data": {"cpu_usage": 12.5}}'
    done = await compare(servers, [frame(report) * 2 + frame(b"\x00\x01", opcode=2)])
    assert [e[1:] for e in done["events"]] == [
        (report, False),
        (report, False),
        (b"\x00\x01", True),
    ]
    assert taken[:3] == [True, True, True]  # with the fast path; the run without never asks


def test_the_fast_path_can_be_turned_off():
    """``SYSMANAGE_FAST_FRAMES=0`` leaves every frame to Autobahn (in a fresh process:
    the switch is read once, at import)."""
    import os
    import subprocess
    import sys

    code = "from sysmanage.serve import LeanWebSocketProtocol as P; print(P.fast_frames)"
    seen = {}
    for value in ("0", "1", None):
        env = {k: v for k, v in os.environ.items() if k != "SYSMANAGE_FAST_FRAMES"}
        if value is not None:
            env["SYSMANAGE_FAST_FRAMES"] = value
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        seen[value] = done.stdout.strip()
    assert seen == {"0": "False", "1": "True", None: "True"}


@pytest.mark.parametrize(
    "payload",
    [b"", b"a" * 125, b"a" * 126, b"a" * 127, b"a" * 65535, b"a" * 65536, *INVALID_UTF8],
)
async def test_lengths_and_bad_text_alone(servers, payload):
    for opcode in (1, 2):
        done = await compare(servers, [frame(payload, opcode=opcode)])
        if opcode == 2 or payload not in INVALID_UTF8:
            assert done["events"] == [("message", payload, opcode == 2)]
        else:
            assert done["events"] == []
            assert done["failedByMe"]


async def test_invalid_text_is_failed_with_1007(servers):
    done = await compare(servers, [frame(b"ok" + b"\xff")], fail_by_drop=False)
    assert done["localCloseCode"] == 1007
    assert done["sent"].startswith(b"\x88")  # the close frame


async def test_every_split_of_a_short_stream(servers):
    stream = (
        frame(b'{"a": 1}')
        + frame(b"ping", opcode=9)
        + frame(b"\xe2\x82\xac", opcode=1)
        + frame(b"", opcode=2)
        + frame(b"x" * 130)
        + frame(b"\x03\xe8bye", opcode=8)
    )
    for at in range(len(stream) + 1):
        done = await compare(servers, [stream[:at], stream[at:]])
        assert len(done["events"]) == 4
        assert done["remoteCloseCode"] == 1000


@pytest.fixture
def fast_taken(monkeypatch):
    """How often the fast path read a message, and how often it left the buffer alone."""
    taken = {True: 0, False: 0}
    original = LeanWebSocketProtocol._take_whole_message

    def spy(self: Any) -> Any:
        result = original(self)
        taken[result is not None] += 1
        return result

    monkeypatch.setattr(LeanWebSocketProtocol, "_take_whole_message", spy)
    return taken


async def test_a_message_counts_as_traffic_for_a_pending_auto_ping(servers):
    """Autobahn cancels the timeout of a pending auto-ping on a data frame (and, with
    an interval, schedules the next ping); so does the fast path."""

    class Call:
        def cancel(self) -> None:
            events.append(("cancelled",))

    def pending(protocol: Any, seen: list[Any]) -> None:
        nonlocal events
        events = seen
        protocol.autoPingPending = b"12345678abcd"
        protocol.autoPingTimeoutCall = Call()

    events: list[Any] = []
    done = await compare(servers, [frame(b'{"a": 1}')], prepare=pending)
    assert done["events"] == [("cancelled",), ("message", b'{"a": 1}', False)]
    assert done["auto_ping_pending"] is None
    assert not done["auto_ping_timeout"]


async def test_random_streams(servers, fast_taken):
    rng = random.Random(20261205)
    for _ in range(800):
        stream = b"".join(random_piece(rng) for _ in range(rng.randrange(1, 7)))
        await compare(
            servers,
            random_chunks(rng, stream),
            skip=rng.random() < 0.5,
            fail_by_drop=rng.random() < 0.5,
            tiny_frames=rng.random() < 0.2,
        )
    assert fast_taken[True] > 300, fast_taken  # messages read by the fast path
    assert fast_taken[False] > 300, fast_taken  # buffers left to Autobahn


async def test_oversized_messages_keep_their_close_codes_and_skips(servers):
    big = frame(b"z" * (LIMIT + 1))
    small = frame(b'{"small": 1}')
    failed = await compare(servers, [big + small], fail_by_drop=False)
    assert failed["localCloseCode"] == 1009
    assert failed["events"] == []
    skipped = await compare(servers, [big + small], skip=True)
    assert [e[1].get("type") if e[0] == "queued" else e[0] for e in skipped["events"]] == [
        "websocket.receive_oversized",
        "message",
    ]
    tiny = await compare(servers, [frame(b"t" * 301) + small], tiny_frames=True, skip=True)
    assert len(tiny["events"]) == 2
