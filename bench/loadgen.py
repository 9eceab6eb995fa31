"""
The fan-out benchmark's load generator, used unchanged against both servers.

It runs as two processes, each a separate process from the server under test:

``subscribe``
    N WebSocket subscribers in one asyncio process.  On the real server (``--mode
    real``) each sends a ``subscribe`` to ``host_metrics`` filtered on the benchmark's
    host and waits for the ``response``; on the bare server (``--mode bare``) each
    waits for the server's greeting.  Then every receiver counts its deliveries and
    computes each one's latency from the send time the event carries.
``publish``
    Sends E events at R events/s on a fixed schedule (open loop: a late event is sent
    at once, the rate does not adapt to the server).  ``real`` sends
    ``HostMetricsReported`` to the hubs' layer group through Redis, as any other server
    process would; ``bare`` sends over a WebSocket the very envelope the real server
    delivers, and the bare server relays it unchanged.

Every event carries its sequence number and send time (``time.time()``, the same
clock in both processes) inside ``metrics``.

Two subscriber implementations are available (``--client``):

``lean`` (default)
    websockets' own protocol implementation (``websockets.client.ClientProtocol``,
    the Sans-I/O core that its asyncio client is built on) driven by a plain
    ``asyncio.Protocol``; events are recognised by their leading bytes and their two
    benchmark fields read with a regular expression.  About twice as many messages a
    second per core as ``standard``, so that the servers, not the client, saturate.
``standard``
    ``websockets.asyncio.client.connect`` and ``json.loads`` of every message, as an
    ordinary application would.

Both talk to ``bench/fanout.py`` over stdio with one-line messages ``TAG {json}``:
the subscriber process prints ``READY``, waits for ``PUBLISHED`` on stdin, waits for
the deliveries (or the drain timeout), prints ``DRAINED``, closes and prints
``RESULT``; the publisher prints ``READY``, waits for ``GO``, publishes and prints
``DONE``.
"""

from __future__ import annotations

import argparse
import asyncio
import builtins
import contextlib
import json
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

#: Path of the bare server's publisher endpoint (see bench/bare_server.py).
PUBLISH_PATH = "/publish"
CHANNEL = "host_metrics"
MAX_MESSAGE = 2**20
#: Every event message (both servers) starts with these bytes.
EVENT_PREFIX = b'{"type":"event"'
#: The two benchmark fields, last in ``metrics`` and in this order on both servers.
STAMP = re.compile(rb'"bench_seq":(\d+),"bench_sent_at":([-+.\deE]+)')


def iso_now() -> str:
    """The current time as the server formats it (ISO-8601 UTC, milliseconds, ``Z``)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dumps(message: dict[str, Any]) -> str:
    """Compact JSON, as the server serializes its messages."""
    return json.dumps(message, separators=(",", ":"))


def emit(tag: str, payload: dict[str, Any]) -> None:
    """Write one protocol line for the orchestrator."""
    sys.stdout.write(f"{tag} {json.dumps(payload)}\n")
    sys.stdout.flush()


async def read_line() -> str:
    """One line from stdin, without blocking the event loop ('' at end of input)."""
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def expect_line(tag: str) -> dict[str, Any]:
    """Wait for the orchestrator's ``tag`` line on stdin and return its JSON payload."""
    line = await read_line()
    head, _, payload = line.strip().partition(" ")
    if head != tag:
        raise SystemExit(f"expected {tag} from the orchestrator, got {line!r}")
    return dict(json.loads(payload or "{}"))


# -- events -------------------------------------------------------------------------------


def sample_metrics(rng: random.Random) -> dict[str, Any]:
    """A realistic agent metrics report (an event envelope of about 700 bytes)."""
    return {
        "cpu_usage": round(rng.uniform(0, 100), 1),
        "memory_usage": round(rng.uniform(0, 100), 1),
        "disk_usage": round(rng.uniform(0, 100), 1),
        "load_average": [round(rng.uniform(0, 4), 2) for _ in range(3)],
        "memory_total_mb": 16384,
        "memory_used_mb": rng.randint(1000, 16000),
        "swap_used_mb": rng.randint(0, 2048),
        "cpu_count": 8,
        "process_count": rng.randint(150, 400),
        "uptime_seconds": rng.randint(10_000, 9_000_000),
        "network": {
            "eth0": {
                "rx_bytes": rng.randint(10**6, 10**12),
                "tx_bytes": rng.randint(10**6, 10**12),
                "rx_errors": 0,
                "tx_errors": 0,
            },
        },
        "disks": [
            {
                "mount": "/",
                "device": "/dev/sda1",
                "used_percent": round(rng.uniform(0, 100), 1),
                "free_gb": round(rng.uniform(1, 400), 1),
            },
            {
                "mount": "/var",
                "device": "/dev/sda2",
                "used_percent": round(rng.uniform(0, 100), 1),
                "free_gb": round(rng.uniform(1, 400), 1),
            },
        ],
    }


def event_data(
    host_id: str, hostname: str, seq: int, sent_at: float, rng: random.Random
) -> dict[str, Any]:
    """The ``data`` of one host_metrics event, stamped with ``seq`` and ``sent_at``."""
    metrics = sample_metrics(rng)
    metrics["bench_seq"] = seq
    metrics["bench_sent_at"] = sent_at
    return {"host_id": host_id, "hostname": hostname, "timestamp": iso_now(), "metrics": metrics}


def read_stamp(raw: bytes) -> tuple[int, float] | None:
    """``(seq, sent_at)`` of an event message, or None if ``raw`` is something else."""
    if raw.startswith(EVENT_PREFIX):
        found = STAMP.search(raw)
        if found is not None:
            return int(found.group(1)), float(found.group(2))
    message = json.loads(raw)
    if message.get("type") != "event":
        return None
    metrics = message["data"]["metrics"]
    return int(metrics["bench_seq"]), float(metrics["bench_sent_at"])


# -- publishers ---------------------------------------------------------------------------


class Publisher(Protocol):
    """Sends one benchmark event to the server under test."""

    async def start(self) -> None:
        """Open whatever the publisher needs."""

    async def publish(self, data: dict[str, Any]) -> None:
        """Publish one event whose payload is ``data``."""

    async def close(self) -> None:
        """Release what ``start`` opened."""


class BarePublisher:
    """Sends the envelope the real server would deliver over a WebSocket to the bare server."""

    def __init__(self, base_url: str) -> None:
        self.url = base_url.rstrip("/") + PUBLISH_PATH
        self.conn: ClientConnection | None = None

    async def start(self) -> None:
        """Connect to the bare server's publisher endpoint."""
        self.conn = await connect(
            self.url, compression=None, proxy=None, ping_interval=None, close_timeout=2
        )

    async def publish(self, data: dict[str, Any]) -> None:
        """Send one event envelope; the bare server relays it as it is."""
        assert self.conn is not None
        await self.conn.send(
            dumps({"type": "event", "channel": CHANNEL, "data": data, "timestamp": iso_now()})
        )

    async def close(self) -> None:
        """Close the publisher connection."""
        if self.conn is not None:
            await self.conn.close()


class LayerPublisher:
    """Publishes ``HostMetricsReported`` to the servers' channel streams in Redis, as a
    server process without the agent path would (:mod:`sysmanage.streams`).

    Needs ``DJANGO_SETTINGS_MODULE``, ``REDIS_URL`` and ``SYSMANAGE_REDIS_PREFIX`` as
    the server has them, and the project on ``sys.path``.
    """

    def __init__(self) -> None:
        self.streams: Any = None
        self.event_type: Any = None

    async def start(self) -> None:
        """Set Django up and open the streams."""
        import django

        django.setup()
        from django.conf import settings

        from hosts.events import HostMetricsReported
        from sysmanage.streams import RedisStreams

        if not settings.REDIS_URL:
            raise SystemExit("real mode needs REDIS_URL: the in-memory layer is per process")
        self.streams = RedisStreams(settings.REDIS_URL)
        self.event_type = HostMetricsReported

    async def publish(self, data: dict[str, Any]) -> None:
        """Number and store one event; every server process reads it from its stream."""
        event = self.event_type(
            host_id=data["host_id"],
            hostname=data["hostname"],
            timestamp=data["timestamp"],
            metrics=data["metrics"],
        )
        message = event.to_message()
        await self.streams.publish(
            [(message["channel"], message["event"], message["data"], message["timestamp"])]
        )

    async def close(self) -> None:
        """Close the Redis connections."""
        if self.streams is not None:
            await self.streams.close()


async def publish_main(args: argparse.Namespace) -> None:
    """The publisher process: READY, wait for GO, publish on schedule, DONE."""
    publisher: Publisher = LayerPublisher() if args.mode == "real" else BarePublisher(args.url)
    await publisher.start()
    emit("READY", {})
    await expect_line("GO")
    rng = random.Random(42)
    loop = asyncio.get_running_loop()
    first_publish = time.time()
    start = loop.time()
    for seq in range(args.events):
        delay = start + seq / args.rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await publisher.publish(event_data(args.host_id, args.hostname, seq, time.time(), rng))
    publish_seconds = loop.time() - start
    await publisher.close()
    emit(
        "DONE",
        {
            "first_publish": first_publish,
            "publish_seconds": round(publish_seconds, 3),
            "published_rate": round(args.events / publish_seconds, 1)
            if publish_seconds > 0
            else float(args.events),
        },
    )


# -- subscribers --------------------------------------------------------------------------


@dataclass
class Tally:
    """What every receiver adds to, and the signal that all deliveries arrived."""

    events: int
    expected: int
    received: int = 0
    duplicates: int = 0
    other: int = 0
    bytes: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    last_at: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    # builtins.bytes: inside this class, ``bytes`` names the field above.
    def record(self, seen: bytearray, raw: builtins.bytes, now: float) -> None:
        """Account for one message ``raw`` received at ``now`` by a receiver that saw ``seen``."""
        stamp = read_stamp(raw)
        if stamp is None:
            self.other += 1
            return
        seq, sent_at = stamp
        if seen[seq]:
            self.duplicates += 1
            return
        seen[seq] = 1
        self.received += 1
        self.bytes += len(raw)
        self.latencies_ms.append((now - sent_at) * 1000.0)
        self.last_at = now
        if self.received >= self.expected:
            self.done.set()


def subscribe_request(mode: str, host_id: str, request_id: str) -> str | None:
    """What a subscriber sends once connected (nothing on the bare server)."""
    if mode == "bare":
        return None
    return dumps(
        {"type": "subscribe", "channel": CHANNEL, "filters": {"host_id": host_id}, "id": request_id}
    )


def is_ready_reply(mode: str, raw: bytes | str, request_id: str) -> bool:
    """Whether ``raw`` tells a subscriber it now gets every event; raise on refusal."""
    reply = json.loads(raw)
    if reply.get("type") == "error":
        raise RuntimeError(f"subscriber {request_id} refused: {reply.get('data')}")
    return bool(
        reply.get("type") == "response" and (mode == "bare" or reply.get("id") == request_id)
    )


class Subscriber(Protocol):
    """One connected, subscribed receiver."""

    async def close(self) -> None:
        """Close the connection (bounded by the caller)."""

    def abort(self) -> None:
        """Drop the connection at once."""

    @property
    def closed_early(self) -> bool:
        """Whether the server closed the connection before the end of the run."""


class LeanSubscriber(asyncio.Protocol):
    """A subscriber on websockets' Sans-I/O protocol, without per-message tasks or queues."""

    def __init__(self, url: str, mode: str, host_id: str, request_id: str, tally: Tally) -> None:
        self.ws = ClientProtocol(parse_uri(url), max_size=MAX_MESSAGE)
        self.mode = mode
        self.host_id = host_id
        self.request_id = request_id
        self.tally = tally
        self.seen = bytearray(tally.events)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.fragments: list[bytes] = []
        self.lost_connection = False

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the opening handshake."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.ws.send_request(self.ws.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        """Parse what arrived and handle each frame."""
        now = time.time()
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Frame):
                self._frame(event, now)
            elif isinstance(event, Response):
                self._handshake_done()
        self._flush()

    def eof_received(self) -> bool | None:
        """Let the protocol handle the end of the stream."""
        self.ws.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Note an unexpected loss; fail a subscriber that was not ready yet."""
        self.lost_connection = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost: {exc}"))

    # internals

    def _flush(self) -> None:
        assert self.transport is not None
        for data in self.ws.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    def _handshake_done(self) -> None:
        if self.ws.handshake_exc is not None:
            self.ready.set_exception(self.ws.handshake_exc)
            return
        text = subscribe_request(self.mode, self.host_id, self.request_id)
        if text is not None:
            self.ws.send_text(text.encode())

    def _frame(self, frame: Frame, now: float) -> None:
        if frame.opcode is Opcode.TEXT or frame.opcode is Opcode.CONT:
            if not frame.fin:
                self.fragments.append(bytes(frame.data))
                return
            raw = bytes(frame.data)
            if self.fragments:
                raw = b"".join([*self.fragments, raw])
                self.fragments.clear()
            if self.ready.done():
                self.tally.record(self.seen, raw, now)
                return
            try:
                if is_ready_reply(self.mode, raw, self.request_id):
                    self.ready.set_result(None)
            except (RuntimeError, ValueError) as exc:
                self.ready.set_exception(exc)

    # Subscriber interface

    async def close(self) -> None:
        """Send a close frame and drop the connection (no need to wait for the reply)."""
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(InvalidState):
                self.ws.send_close()
                self._flush()
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once."""
        if self.transport is not None:
            self.transport.abort()

    @property
    def closed_early(self) -> bool:
        """Whether the connection was lost before this process closed it."""
        return self.lost_connection


async def open_lean(
    url: str, mode: str, host_id: str, index: int, tally: Tally, timeout: float
) -> LeanSubscriber:
    """Connect and subscribe one :class:`LeanSubscriber`."""
    uri = parse_uri(url)
    loop = asyncio.get_running_loop()

    async with asyncio.timeout(timeout):
        _, protocol = await loop.create_connection(
            lambda: LeanSubscriber(url, mode, host_id, f"s{index}", tally), uri.host, uri.port
        )
        await protocol.ready
    return protocol


class StandardSubscriber:
    """A subscriber on ``websockets.asyncio.client``, decoding every message as JSON."""

    def __init__(self, conn: ClientConnection, tally: Tally) -> None:
        self.conn = conn
        self.task = asyncio.create_task(self._receive(tally))

    async def _receive(self, tally: Tally) -> None:
        seen = bytearray(tally.events)
        try:
            async for raw in self.conn:
                now = time.time()
                data = raw.encode() if isinstance(raw, str) else bytes(raw)
                message = json.loads(data)  # what an application does with every message
                if message.get("type") == "event":
                    tally.record(seen, data, now)
                else:
                    tally.other += 1
        except ConnectionClosed:
            pass

    async def close(self) -> None:
        """Stop receiving and close the connection."""
        self.task.cancel()
        await self.conn.close()

    def abort(self) -> None:
        """Drop the connection at once."""
        self.conn.transport.abort()

    @property
    def closed_early(self) -> bool:
        """Whether the server closed the connection before the end of the run."""
        return self.task.done() and not self.task.cancelled()


async def open_standard(
    url: str, mode: str, host_id: str, index: int, tally: Tally, timeout: float
) -> StandardSubscriber:
    """Connect and subscribe one :class:`StandardSubscriber`."""
    conn = await connect(
        url,
        compression=None,
        proxy=None,
        open_timeout=timeout,
        ping_interval=None,
        close_timeout=2,
        max_size=MAX_MESSAGE,
    )
    request_id = f"s{index}"
    text = subscribe_request(mode, host_id, request_id)
    if text is not None:
        await conn.send(text)
    async with asyncio.timeout(timeout):
        while not is_ready_reply(mode, await conn.recv(), request_id):
            pass
    return StandardSubscriber(conn, tally)


Opener = Callable[[str, str, str, int, Tally, float], Awaitable[Subscriber]]
OPENERS: dict[str, Opener] = {"lean": open_lean, "standard": open_standard}


@dataclass
class Result:
    """One run's figures, printed as JSON for the orchestrator."""

    mode: str
    client: str
    subscribers: int
    events: int
    expected: int
    received: int
    lost: int
    duplicates: int
    other_messages: int
    connect_seconds: float
    wall_seconds: float
    deliveries_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    mean_bytes: float | None
    closed_early: int


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """The ``fraction`` quantile of ``sorted_values`` (nearest rank), None if empty."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return round(sorted_values[rank], 2)


async def wait_for_deliveries(tally: Tally, drain_timeout: float) -> None:
    """Return when every delivery arrived or none arrived for ``drain_timeout`` seconds."""
    last_count, last_change = -1, time.monotonic()
    while not tally.done.is_set():
        if tally.received != last_count:
            last_count, last_change = tally.received, time.monotonic()
        elif time.monotonic() - last_change > drain_timeout:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.done.wait(), 0.2)


async def subscribe_main(args: argparse.Namespace) -> None:
    """The subscriber process: connect all, READY, receive until done, DRAINED, RESULT."""
    url = args.url if args.mode == "bare" else f"{args.url.rstrip('/')}/ws?token={args.token}"
    tally = Tally(events=args.events, expected=args.subscribers * args.events)
    opener = OPENERS[args.client]
    gate = asyncio.Semaphore(args.connect_concurrency)

    async def open_one(index: int) -> Subscriber:
        async with gate:
            return await opener(url, args.mode, args.host_id, index, tally, args.connect_timeout)

    started = time.monotonic()
    subs = await asyncio.gather(*(open_one(i) for i in range(args.subscribers)))
    connect_seconds = time.monotonic() - started
    emit("READY", {"subscribers": len(subs), "connect_seconds": round(connect_seconds, 3)})

    published = await expect_line("PUBLISHED")
    await wait_for_deliveries(tally, args.drain_timeout)
    emit("DRAINED", {"received": tally.received})
    closed_early = sum(1 for s in subs if s.closed_early)
    wall = tally.last_at - float(published["first_publish"]) if tally.received else 0.0
    try:
        async with asyncio.timeout(5):
            await asyncio.gather(*(s.close() for s in subs), return_exceptions=True)
    except TimeoutError:
        for s in subs:
            s.abort()

    latencies = sorted(tally.latencies_ms)
    emit(
        "RESULT",
        asdict(
            Result(
                mode=args.mode,
                client=args.client,
                subscribers=args.subscribers,
                events=args.events,
                expected=tally.expected,
                received=tally.received,
                lost=tally.expected - tally.received,
                duplicates=tally.duplicates,
                other_messages=tally.other,
                connect_seconds=round(connect_seconds, 3),
                wall_seconds=round(wall, 3),
                deliveries_per_s=round(tally.received / wall, 1) if wall > 0 else 0.0,
                p50_ms=percentile(latencies, 0.50),
                p99_ms=percentile(latencies, 0.99),
                max_ms=percentile(latencies, 1.0),
                mean_bytes=round(tally.bytes / tally.received, 1) if tally.received else None,
                closed_early=closed_early,
            )
        ),
    )


# -- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (set by bench/fanout.py)."""
    parser = argparse.ArgumentParser(description="Fan-out benchmark load generator.")
    parser.add_argument("role", choices=("subscribe", "publish"))
    parser.add_argument("--mode", choices=("bare", "real"), required=True)
    parser.add_argument("--url", required=True, help="ws://127.0.0.1:PORT of the server")
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--host-id", default="00000000-0000-0000-0000-000000000000")
    parser.add_argument("--hostname", default="bench-host")
    parser.add_argument(
        "--deadline",
        type=float,
        default=600.0,
        help="give up on the whole run after this many seconds",
    )
    sub = parser.add_argument_group("subscribe")
    sub.add_argument("--subscribers", type=int, default=1)
    sub.add_argument("--client", choices=sorted(OPENERS), default="lean")
    sub.add_argument("--token", default="", help="access JWT (real mode)")
    sub.add_argument("--connect-concurrency", type=int, default=50)
    sub.add_argument("--connect-timeout", type=float, default=60.0)
    sub.add_argument(
        "--drain-timeout",
        type=float,
        default=5.0,
        help="stop waiting after this long without a delivery",
    )
    pub = parser.add_argument_group("publish")
    pub.add_argument("--rate", type=float, default=100.0, help="events per second")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    """Run one role within the overall deadline."""
    async with asyncio.timeout(args.deadline):
        if args.role == "subscribe":
            await subscribe_main(args)
        else:
            await publish_main(args)


if __name__ == "__main__":
    asyncio.run(amain(parse_args()))
