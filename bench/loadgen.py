"""
The fan-out benchmark's load generator, used unchanged against every server.

It runs as separate processes from the server under test:

``subscribe``
    N WebSocket subscribers in one asyncio process, spread over the benchmark's hosts
    (subscriber i watches host i mod H).  Each sends a ``subscribe`` to
    ``host_metrics`` filtered on its host and waits for the ``response``, on the real
    server and on the bare one alike; then it counts its deliveries and computes each
    one's latency from the send time the event carries.
``agents``
    The path a user's events take: one simulated agent per host on ``/ws/agent``
    (``docs/agent-protocol.md``: ``Authorization: Bearer`` host token, ``hello``,
    ``welcome``), which together send E ``metrics`` reports at R/s, host after host, on
    a fixed schedule (open loop: a late report is sent at once).
``publish``
    The shortcut, kept to tell the two costs apart: E events at R/s injected straight
    into the channel streams in Redis (``--mode real``, as another server process would
    publish them) or sent over ``/publish`` (``--mode bare``), without the agent path.

Every event carries its host's sequence number and its send time (``time.time()`` in
milliseconds, the same clock in every process) as the 5- and 15-minute load averages,
``load_average: [load, seq, sent_ms]``: numbers the server passes on as they are (it
judges the first alone), so that a report creates no state of its own in the server (a
new mount point per report would).  Both paths give the subscribers the same bytes.

Two subscriber implementations (``--client``):

``raw`` (default)
    :mod:`wsraw`: a plain ``asyncio.Protocol`` with minimal framing; each message is
    found in the receive buffer and its stamp read with one regular expression search,
    without copying it.  It takes well over 100,000 deliveries/s on one core, so that
    the servers, not the client, saturate (the calibration row of bench/fanout.py).
``standard``
    ``websockets.asyncio.client.connect`` and ``json.loads`` of every message, as an
    ordinary application would.

All talk to ``bench/fanout.py`` over stdio with one-line messages ``TAG {json}``: the
subscriber process prints ``READY``, waits for ``PUBLISHED`` on stdin, waits for the
deliveries (or the drain timeout), prints ``DRAINED``, closes and prints ``RESULT``; a
publisher (``agents`` or ``publish``) prints ``READY``, waits for ``GO``, sends and
prints ``DONE``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from wsraw import RawSocket, open_raw  # bench/ is on sys.path when run

#: Path of the bare server's publisher endpoint (see bench/bare_server.py).
PUBLISH_PATH = "/publish"
AGENT_PATH = "/ws/agent"
CHANNEL = "host_metrics"
MAX_MESSAGE = 2**20
#: An event's stamp: the last two load averages of its report, ``[load, seq, sent_ms]``.
STAMP = re.compile(rb'"load_average":\[[\d.]+,(\d+)\.0,(\d+)\.0\]')
#: The number of CPUs a simulated host reports in its ``hello``.
CPU_COUNT = 4


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


@dataclass(frozen=True)
class BenchHost:
    """One of the benchmark's hosts: its id, name and agent token (on the bare server
    the token is the host id)."""

    host_id: str
    hostname: str
    token: str


def load_hosts(args: argparse.Namespace) -> list[BenchHost]:
    """The hosts of ``--hosts-file`` (JSON: a list of objects with the three fields), or
    the one of ``--host-id`` and ``--hostname``."""
    if args.hosts_file is None:
        return [BenchHost(args.host_id, args.hostname, args.host_id)]
    return [BenchHost(**item) for item in json.loads(args.hosts_file.read_text())]


# -- events -------------------------------------------------------------------------------


def report_metrics(rng: random.Random, seq: int, sent_at: float) -> dict[str, Any]:
    """An agent's metrics report, under every default alert threshold, stamped with
    ``seq`` and ``sent_at`` (seconds); already in the shape the server keeps (known keys
    only, floats of at most two decimals), so that both servers pass it on byte for byte."""
    return {
        "cpu_usage": round(rng.uniform(1, 60), 1),
        "memory_usage": round(rng.uniform(20, 80), 1),
        "disk_usage": {"/": round(rng.uniform(20, 70), 1), "/var": round(rng.uniform(20, 70), 1)},
        "load_average": [round(rng.uniform(0, 1.5), 2), float(seq), float(round(sent_at * 1000))],
    }


def sample_metrics(rng: random.Random) -> dict[str, Any]:
    """A richer metrics report than agents send (an event envelope of about 700 bytes),
    for benchmarks that publish events without the agent path (bench/resume.py)."""
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


def report_bytes(metrics: dict[str, Any]) -> bytes:
    """An agent's ``metrics`` message carrying ``metrics``, as sent."""
    return dumps({"type": "metrics", "data": {"metrics": metrics}}).encode()


def read_stamp(
    raw: bytes | bytearray, start: int = 0, end: int | None = None
) -> tuple[int, float] | None:
    """``(seq, sent_at)`` of an event message, or None if it carries no stamp."""
    found = STAMP.search(raw, start, len(raw) if end is None else end)
    if found is None:
        return None
    return int(found.group(1)), int(found.group(2)) / 1000.0


def schedule(hosts: int, events: int) -> list[tuple[int, int]]:
    """``(host index, sequence number)`` of each event in sending order: host after
    host, each host's events numbered from 0."""
    return [(k % hosts, k // hosts) for k in range(events)]


async def send_on_schedule(
    rate: float, plan: list[tuple[int, int]], send: Callable[[int, int, float], Awaitable[None]]
) -> dict[str, Any]:
    """Call ``send(host, seq, sent_at)`` for each planned event at ``rate`` per second;
    return the figures of ``DONE``."""
    loop = asyncio.get_running_loop()
    first_publish = time.time()
    start = loop.time()
    for k, (host, seq) in enumerate(plan):
        delay = start + k / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(host, seq, time.time())
    seconds = loop.time() - start
    return {
        "first_publish": first_publish,
        "publish_seconds": round(seconds, 3),
        "published_rate": round(len(plan) / seconds, 1) if seconds > 0 else float(len(plan)),
    }


# -- agents (the user's path) ---------------------------------------------------------------


class RawAgent(RawSocket):
    """A simulated agent: ``hello`` once connected, then reports when told; counts the
    server's ``error`` replies (a refused report is a lost event)."""

    def __init__(self, url: str, host: BenchHost) -> None:
        super().__init__(url, {"Authorization": f"Bearer {host.token}"})
        self.host = host
        self.welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.errors: list[str] = []

    def on_open(self) -> None:
        """Introduce the host."""
        super().on_open()
        hello = {
            "hostname": self.host.hostname,
            "cpu_count": CPU_COUNT,
            "ip_addresses": [],
            "os_name": "Debian GNU/Linux",
            "os_version": "12",
            "agent_version": "bench",
        }
        self.send(dumps({"type": "hello", "data": hello}).encode())

    def on_message(self, buf: bytearray, start: int, end: int) -> None:
        """Note the welcome; keep errors."""
        message = json.loads(bytes(buf[start:end]))
        if message.get("type") == "welcome" and not self.welcomed.done():
            self.welcomed.set_result(None)
        elif message.get("type") == "error":
            self.errors.append(str(message.get("data", {}).get("code")))
            if not self.welcomed.done():
                self.welcomed.set_exception(RuntimeError(f"agent refused: {message}"))


async def agents_main(args: argparse.Namespace) -> None:
    """The agents process: connect one agent per host, READY, wait for GO, report on
    schedule, DONE (with the errors the server answered)."""
    hosts = load_hosts(args)
    url = args.url.rstrip("/") + AGENT_PATH
    agents = []
    for host in hosts:
        agent = await open_raw(RawAgent(url, host), url, args.connect_timeout)
        await asyncio.wait_for(agent.welcomed, args.connect_timeout)
        agents.append(agent)
    emit("READY", {"agents": len(agents)})
    await expect_line("GO")
    rng = random.Random(42)
    # Each host's report but for its stamp, made once: at 20,000 reports a second
    # building each from scratch would cost the agents' process a core.
    reports = [report_bytes(report_metrics(rng, 0, 0.0)).rsplit(b"0.0,0.0]", 1) for _ in agents]

    async def send(host: int, seq: int, sent_at: float) -> None:
        head, tail = reports[host]
        agents[host].send(b"%s%d.0,%d.0]%s" % (head, seq, round(sent_at * 1000), tail))

    done = await send_on_schedule(args.rate, schedule(len(hosts), args.events), send)
    emit("DONE", done)
    await expect_line("REPORT")  # after the deliveries: errors come back after reports
    emit(
        "ERRORS",
        {
            "errors": sum(len(a.errors) for a in agents),
            "error_codes": sorted({code for a in agents for code in a.errors}),
            "closed": sum(int(a.closed) for a in agents),
        },
    )
    for agent in agents:
        agent.close()


# -- the shortcut: events injected without the agent path -----------------------------------


class Publisher(Protocol):
    """Sends one benchmark event to the server under test."""

    async def start(self) -> None:
        """Open whatever the publisher needs."""

    async def publish(self, data: dict[str, Any]) -> None:
        """Publish one event whose payload is ``data``."""

    async def close(self) -> None:
        """Release what ``start`` opened."""


class BarePublisher:
    """Sends the bare server an event's payload over ``/publish``; it forwards the
    envelope to the host's subscribers."""

    def __init__(self, base_url: str) -> None:
        self.url = base_url.rstrip("/") + PUBLISH_PATH
        self.conn: ClientConnection | None = None

    async def start(self) -> None:
        """Connect to the bare server's publisher endpoint."""
        self.conn = await connect(
            self.url, compression=None, proxy=None, ping_interval=None, close_timeout=2
        )

    async def publish(self, data: dict[str, Any]) -> None:
        """Send one event's payload."""
        assert self.conn is not None
        await self.conn.send(dumps(data))

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
        message = self.event_type(**data).to_message()
        await self.streams.publish(
            [(message["channel"], message["event"], message["data"], message["timestamp"])]
        )

    async def close(self) -> None:
        """Close the Redis connections."""
        if self.streams is not None:
            await self.streams.close()


async def publish_main(args: argparse.Namespace) -> None:
    """The injecting publisher: READY, wait for GO, publish on schedule, DONE."""
    hosts = load_hosts(args)
    publisher: Publisher = LayerPublisher() if args.mode == "real" else BarePublisher(args.url)
    await publisher.start()
    emit("READY", {})
    await expect_line("GO")
    rng = random.Random(42)

    async def send(host: int, seq: int, sent_at: float) -> None:
        await publisher.publish(
            {
                "host_id": hosts[host].host_id,
                "hostname": hosts[host].hostname,
                "timestamp": iso_now(),
                "metrics": report_metrics(rng, seq, sent_at),
                "cpu_count": CPU_COUNT,
            }
        )

    done = await send_on_schedule(args.rate, schedule(len(hosts), args.events), send)
    await publisher.close()
    emit("DONE", done)


# -- subscribers --------------------------------------------------------------------------


@dataclass
class Tally:
    """What every receiver adds to, and the signal that all deliveries arrived."""

    #: events each subscriber should get (its host's)
    events: int
    expected: int
    received: int = 0
    duplicates: int = 0
    other: int = 0
    octets: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    last_at: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def record(
        self, seen: bytearray, stamp: tuple[int, float] | None, size: int, now: float
    ) -> None:
        """Account for one message of ``size`` bytes received at ``now`` by a receiver
        that saw ``seen``."""
        if stamp is None:
            self.other += 1
            return
        seq, sent_at = stamp
        if seq >= len(seen) or seen[seq]:
            self.duplicates += 1
            return
        seen[seq] = 1
        self.received += 1
        self.octets += size
        self.latencies_ms.append((now - sent_at) * 1000.0)
        self.last_at = now
        if self.received >= self.expected:
            self.done.set()


def subscribe_request(host_id: str, request_id: str) -> str:
    """What a subscriber sends once connected."""
    return dumps(
        {"type": "subscribe", "channel": CHANNEL, "filters": {"host_id": host_id}, "id": request_id}
    )


def is_ready_reply(raw: bytes | str, request_id: str) -> bool:
    """Whether ``raw`` tells a subscriber it now gets every event; raise on refusal."""
    reply = json.loads(raw)
    if reply.get("type") == "error":
        raise RuntimeError(f"subscriber {request_id} refused: {reply.get('data')}")
    return bool(reply.get("type") == "response" and reply.get("id") == request_id)


class Subscriber(Protocol):
    """One connected, subscribed receiver."""

    async def close(self) -> None:
        """Close the connection (bounded by the caller)."""

    def abort(self) -> None:
        """Drop the connection at once."""

    @property
    def closed_early(self) -> bool:
        """Whether the server closed the connection before the end of the run."""


class RawSubscriber(RawSocket):
    """A subscriber on :mod:`wsraw`: each event's stamp is read in the receive buffer."""

    def __init__(self, url: str, host_id: str, request_id: str, tally: Tally) -> None:
        super().__init__(url)
        self.host_id = host_id
        self.request_id = request_id
        self.tally = tally
        self.seen = bytearray(tally.events)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.now = 0.0
        self.closing = False

    def data_received(self, data: bytes) -> None:
        """Note the arrival time once for every message in ``data``."""
        self.now = time.time()
        super().data_received(data)

    def on_open(self) -> None:
        """Subscribe."""
        super().on_open()
        self.send(subscribe_request(self.host_id, self.request_id).encode())

    def on_message(self, buf: bytearray, start: int, end: int) -> None:
        """Count an event; before that, wait for the subscription's response."""
        if self.ready.done():
            found = STAMP.search(buf, start, end)
            stamp = (int(found.group(1)), int(found.group(2)) / 1000.0) if found else None
            self.tally.record(self.seen, stamp, end - start, self.now)
            return
        try:
            if is_ready_reply(bytes(buf[start:end]), self.request_id):
                self.ready.set_result(None)
        except (RuntimeError, ValueError) as exc:
            self.ready.set_exception(exc)

    async def close(self) -> None:  # type: ignore[override]
        """Send a close frame and drop the connection."""
        self.closing = True
        RawSocket.close(self)

    @property
    def closed_early(self) -> bool:
        """Whether the connection was lost before this process closed it."""
        return self.closed and not self.closing


async def open_raw_subscriber(
    url: str, host_id: str, index: int, tally: Tally, timeout: float
) -> RawSubscriber:
    """Connect and subscribe one :class:`RawSubscriber`."""
    sub = await open_raw(RawSubscriber(url, host_id, f"s{index}", tally), url, timeout)
    await asyncio.wait_for(sub.ready, timeout)
    return sub


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
                stamp = read_stamp(data) if message.get("type") == "event" else None
                tally.record(seen, stamp, len(data), now)
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
    url: str, host_id: str, index: int, tally: Tally, timeout: float
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
    await conn.send(subscribe_request(host_id, request_id))
    async with asyncio.timeout(timeout):
        while not is_ready_reply(await conn.recv(), request_id):
            pass
    return StandardSubscriber(conn, tally)


Opener = Callable[[str, str, int, Tally, float], Awaitable[Subscriber]]
OPENERS: dict[str, Opener] = {"raw": open_raw_subscriber, "standard": open_standard}


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
    hosts = load_hosts(args)
    url = f"{args.url.rstrip('/')}/ws" + (f"?token={args.token}" if args.token else "")
    per_host = args.events // len(hosts)
    tally = Tally(events=per_host, expected=args.subscribers * per_host)
    opener = OPENERS[args.client]
    gate = asyncio.Semaphore(args.connect_concurrency)

    async def open_one(index: int) -> Subscriber:
        async with gate:
            host_id = hosts[index % len(hosts)].host_id
            return await opener(url, host_id, index, tally, args.connect_timeout)

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
                mean_bytes=round(tally.octets / tally.received, 1) if tally.received else None,
                closed_early=closed_early,
            )
        ),
    )


# -- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (set by bench/fanout.py)."""
    parser = argparse.ArgumentParser(description="Fan-out benchmark load generator.")
    parser.add_argument("role", choices=("subscribe", "agents", "publish"))
    parser.add_argument("--mode", choices=("bare", "real"), required=True)
    parser.add_argument("--url", required=True, help="ws://127.0.0.1:PORT of the server")
    parser.add_argument("--events", type=int, required=True, help="events in all hosts")
    parser.add_argument("--hosts-file", type=Path, help="JSON list of host_id, hostname, token")
    parser.add_argument("--host-id", default="00000000-0000-0000-0000-000000000000")
    parser.add_argument("--hostname", default="bench-host")
    parser.add_argument(
        "--deadline",
        type=float,
        default=600.0,
        help="give up on the whole run after this many seconds",
    )
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=5.0,
        help="stop waiting after this long without a delivery",
    )
    sub = parser.add_argument_group("subscribe")
    sub.add_argument("--subscribers", type=int, default=1)
    sub.add_argument("--client", choices=sorted(OPENERS), default="raw")
    sub.add_argument("--token", default="", help="access JWT (real mode)")
    sub.add_argument("--connect-concurrency", type=int, default=50)
    pub = parser.add_argument_group("agents and publish")
    pub.add_argument("--rate", type=float, default=100.0, help="events per second")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    """Run one role within the overall deadline."""
    roles = {"subscribe": subscribe_main, "agents": agents_main, "publish": publish_main}
    async with asyncio.timeout(args.deadline):
        await roles[args.role](args)


if __name__ == "__main__":
    asyncio.run(amain(parse_args()))
