"""CPU per received WebSocket frame in Autobahn's receive path, in process (no network).

An agent's metrics report (about 600 bytes of JSON in one masked text frame) is fed to
an open server connection, wired as the server runs it (:class:`RedactingServer`, its
:class:`LeanWebSocketProtocol`, Daphne's factory options, a handshake through Daphne's
HTTP channel), with ``onMessage`` replaced by a counter: what is measured is everything
from ``dataReceived`` to the application's ``onMessage``, not Twisted's socket read.

Frames arrive one per ``dataReceived`` call and ten per call; each figure is the median
of ``--repeat`` runs of ``--frames`` frames (``time.process_time``).  Both ways of
reading a frame are measured in the same run, interleaved: Autobahn's own
(``processData``) and the server's fast path for complete single-frame messages
(:attr:`LeanWebSocketProtocol.fast_frames`), when the code has one.

    .venv/bin/python bench/frames.py [--frames 50000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sysmanage.settings")

from daphne.http_protocol import HTTPFactory
from daphne.ws_protocol import WebSocketFactory
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from sysmanage.serve import LeanWebSocketProtocol, RedactingServer

UPGRADE = (
    b"GET /ws/agent HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
#: What ``scripts/serve`` passes as ``--websocket-max-message-size`` and frame size.
WS_LIMIT = 4259840


def metrics_report(rng: random.Random, seq: int) -> bytes:
    """An agent's metrics report (``agent.protocol.envelope("metrics", ...)``), about
    600 bytes of JSON."""
    mounts = ["/", "/boot", "/boot/efi", "/home", "/var", "/var/log", "/var/lib/docker"]
    mounts += ["/srv", "/opt", "/data", "/backup", "/scratch"]
    message = {
        "type": "metrics",
        "id": f"{rng.getrandbits(128):032x}",
        "timestamp": f"2026-12-05T19:{seq % 60:02d}:{rng.randrange(60):02d}.{seq % 1000:03d}Z",
        "data": {
            "timestamp": f"2026-12-05T19:{seq % 60:02d}:{rng.randrange(60):02d}.000000Z",
            "metrics": {
                "cpu_usage": round(rng.uniform(1, 60), 1),
                "memory_usage": round(rng.uniform(20, 80), 1),
                "disk_usage": {m: round(rng.uniform(5, 90), 1) for m in mounts},
                "load_average": [round(rng.uniform(0, 2), 2) for _ in range(3)],
                "uptime_seconds": rng.randrange(10**7),
                "processes": rng.randrange(100, 600),
                "swap_usage": round(rng.uniform(0, 10), 1),
                "network": {"rx_bytes": rng.randrange(10**12), "tx_bytes": rng.randrange(10**12)},
            },
        },
    }
    return json.dumps(message).encode()


def client_frame(payload: bytes, mask: bytes) -> bytes:
    """One masked, final text frame, as a client sends it."""
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 65536:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    repeated = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")
    return head + mask + masked


async def _accept(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "websocket.accept"})
    await asyncio.Event().wait()


async def open_connection() -> tuple[Any, RedactingServer]:
    """An open server connection, as ``python -m sysmanage.serve`` makes one."""
    server = RedactingServer(_accept, endpoints=["tcp:port=0"])
    server.connections = {}
    # What Daphne's Server.run makes before it listens, with the production limits.
    server.ws_factory = WebSocketFactory(server, server="Daphne")
    server.ws_factory.setProtocolOptions(
        autoPingTimeout=server.ping_timeout,
        allowNullOrigin=True,
        openHandshakeTimeout=server.websocket_handshake_timeout,
        maxMessagePayloadSize=WS_LIMIT,
        maxFramePayloadSize=WS_LIMIT,
    )
    server.http_factory = HTTPFactory(server)
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    channel = server.http_factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 8000))
    channel.makeConnection(transport)
    channel.dataReceived(UPGRADE)
    for _ in range(200):
        if transport.value().startswith(b"HTTP/1.1 101"):
            break
        await asyncio.sleep(0.005)
    else:
        raise RuntimeError(f"no handshake answer: {transport.value()[:200]!r}")
    protocol = transport.protocol  # type: ignore[attr-defined]  # set by Daphne
    assert isinstance(protocol, LeanWebSocketProtocol)
    assert protocol.state == protocol.STATE_OPEN
    transport.clear()
    return protocol, server


def run(protocol: Any, chunks: list[bytes], frames_per_chunk: int, rounds: int) -> float:
    """µs of CPU per frame to feed ``chunks`` ``rounds`` times."""
    received = 0

    def count(payload: bytes, is_binary: bool) -> None:
        nonlocal received
        received += 1

    protocol.onMessage = count
    feed = protocol.dataReceived
    started = time.process_time()
    for _ in range(rounds):
        for chunk in chunks:
            feed(chunk)
    spent = time.process_time() - started
    frames = rounds * len(chunks) * frames_per_chunk
    if received != frames or protocol.data or protocol.state != protocol.STATE_OPEN:
        raise RuntimeError(f"{received} messages of {frames}; state {protocol.state}")
    return 1e6 * spent / frames


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=50_000, help="frames per measurement")
    parser.add_argument("--repeat", type=int, default=5, help="measurements per figure")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    frames = [client_frame(metrics_report(rng, i), rng.randbytes(4)) for i in range(100)]
    sizes = [len(f) for f in frames]
    singles = frames
    tens = [b"".join(frames[i : i + 10]) for i in range(0, len(frames), 10)]
    rounds = max(1, args.frames // len(frames))

    protocol, server = await open_connection()
    has_fast = hasattr(type(protocol), "fast_frames")
    modes = {"autobahn": False, "fast path": True} if has_fast else {"autobahn": None}
    cases = {"1 frame per read": (singles, 1), "10 frames per read": (tens, 10)}
    results: dict[tuple[str, str], list[float]] = {}

    machine = None
    try:
        from _common import MachineWindow

        machine = MachineWindow()
    except ImportError:  # psutil missing
        pass
    for chunks, per in cases.values():
        run(protocol, chunks, per, 1)  # warm up
    for _ in range(args.repeat):
        for name, (chunks, per) in cases.items():
            for mode, fast in modes.items():
                if fast is not None:
                    protocol.fast_frames = fast
                results.setdefault((name, mode), []).append(run(protocol, chunks, per, rounds))

    frames_each = rounds * len(frames)
    print(
        f"payload {min(sizes)}-{max(sizes)} bytes per frame; {frames_each} frames per "
        f"measurement, median of {args.repeat}; Python {sys.version.split()[0]}"
    )
    for name in cases:
        for mode in modes:
            values = results[(name, mode)]
            print(
                f"{name:20s} {mode:10s} {statistics.median(values):6.2f} µs/frame"
                f"  (min {min(values):.2f}, max {max(values):.2f})"
            )
        if has_fast:
            gain = statistics.median(results[(name, "autobahn")]) - statistics.median(
                results[(name, "fast path")]
            )
            print(f"{name:20s} {'saved':10s} {gain:6.2f} µs/frame")
    if machine is not None:
        print(machine.report())
    for details in server.connections.values():
        instance = details.get("application_instance")
        if instance is not None:
            instance.cancel()


if __name__ == "__main__":
    asyncio.run(main())
