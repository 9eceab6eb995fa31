"""
Resume benchmark: how long N ``/ws`` clients take to get back what they missed after
their server process is killed, and whether each got every event it was owed.

One command runs everything and stops by itself::

    .venv/bin/python bench/resume.py --clients 1000

Variants (``--variants``, all three by default), each on fresh server processes:

``other``
    Two server processes, A and B, on PostgreSQL and Redis.  The clients are on A; A
    is killed with SIGKILL (and restarted, as a supervisor would), and every client
    reconnects to B and subscribes again with ``since``: its last position.
``restart``
    The same, but the clients reconnect to A's address and wait (backing off) until
    the restarted A serves them.
``memory``
    One server process on SQLite, with the in-memory streams: killed, restarted on the
    same port; every client is owed ``recovered: false`` and the ``status`` snapshot.

Each client subscribes to ``system_alerts``, ``host_metrics`` of one of the benchmark's
hosts and, with ``--channels 3`` (the default), ``host_status``.  Events flow all along:
with Redis a publisher process numbers and stores them in the channel streams as
another server process would (metrics of every host, alerts, host status changes);
on the single process, the only way in is its REST API, so alerts are raised there.
After a connection drops, a client waits as the browser client does
(``static/js/sysmanage-client.js``: full jitter, uniform in ``[0, min(max, min *
2^attempt))``, 1 s and 30 s by default), reconnects and resubscribes; "resumed" is the
arrival of the last of its subscribe responses.  With Redis one observer per host stays
connected to B with the same subscriptions from start to end: every client's events
(offsets, in order, without duplicates) must equal its observer's from the client's
first subscription to the end of the run.

Processes: the servers; the clients (and observers) in one process of their own; the
publisher in another.  CPU of each is read from the kill until every client resumed.
Needs PostgreSQL at 127.0.0.1:5432 (trust authentication; a database is created and
dropped) and Redis at 127.0.0.1:6379 for the first two variants; targets only loopback
addresses.  See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from _common import MachineWindow, Target, free_port, print_targets  # bench/ is on sys.path
from fanout import (
    BenchError,
    Child,
    CpuWindow,
    machine_load,
    raise_open_file_limit,
    stop_process,
    tail,
    wait_until_quiet,
)
from loadgen import emit, expect_line, iso_now, read_line, sample_metrics
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PYTHON = sys.executable
LOOPBACK = "127.0.0.1"
USERNAME = "bench"

#: Creates the benchmark's user and hosts in the fresh database; prints them.
SEED_SCRIPT = """
import json, os
from django.contrib.auth import get_user_model
from hosts.services import host_create
get_user_model().objects.create_user(
    username="bench", password=os.environ["BENCH_PASSWORD"], is_staff=True,
    is_superuser=True)
hosts = [host_create(hostname=f"bench-{n:02d}") for n in range(int(os.environ["BENCH_HOSTS"]))]
print("HOSTS " + json.dumps([[str(h.id), h.hostname] for h in hosts]))
"""

#: Signs the benchmark's user in N times (``--refresh``): one pair of tokens per client.
MINT_SCRIPT = """
import json, os
from django.contrib.auth import get_user_model
from sysmanage.credentials import FingerprintedRefreshToken
user = get_user_model().objects.get(username="bench")
count = int(os.environ["BENCH_SIGN_INS"])
tokens = [FingerprintedRefreshToken.for_user(user) for _ in range(count)]
print("TOKENS " + json.dumps([[str(t.access_token), str(t)] for t in tokens]))
"""

#: The channels a client subscribes to, in this order (``--channels`` takes the first).
CHANNELS = ("system_alerts", "host_metrics", "host_status")


def subscriptions(channels: int, host_id: str) -> dict[str, dict[str, Any]]:
    """A client's subscriptions: channel -> filters."""
    every: dict[str, dict[str, Any]] = {
        "system_alerts": {},
        "host_metrics": {"host_id": host_id},
        "host_status": {},
    }
    return {channel: every[channel] for channel in CHANNELS[:channels]}


def percentile(values: list[float], fraction: float) -> float | None:
    """The ``fraction`` quantile of ``values`` (nearest rank), None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered)) - 1))
    return round(ordered[rank], 3)


def spread(values: list[float]) -> dict[str, float | int | None]:
    """How many ``values``, their median, 99th percentile and maximum."""
    return {
        "count": len(values),
        "p50": percentile(values, 0.50),
        "p99": percentile(values, 0.99),
        "max": round(max(values), 3) if values else None,
    }


def backoff(attempt: int, low: float, high: float) -> float:
    """The browser client's reconnection delay (``backoffDelay``): full jitter."""
    return random.random() * min(high, low * float(2 ** min(attempt, 30)))


async def post_json(
    host: str, port: int, path: str, body: dict[str, Any], timeout: float
) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 ``POST`` of a JSON body on a connection of its own: the status and
    the JSON answer (a lean client: thousands of them share the clients' process)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            data = json.dumps(body).encode()
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + data
            )
            raw = await reader.read(-1)
        finally:
            writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        answer = json.loads(payload) if payload.strip() else {}
    except ValueError:
        answer = {}
    return status, answer if isinstance(answer, dict) else {}


# -- publisher ------------------------------------------------------------------------------


@dataclass
class Schedule:
    """When the next event of one kind is due, at a fixed rate (events/s)."""

    rate: float
    due: float = 0.0
    count: int = 0

    def take(self, now: float) -> int:
        """How many events are due at ``now``; moves the schedule on past them."""
        if self.rate <= 0:
            return 0
        taken = 0
        while self.due <= now:
            self.due += 1.0 / self.rate
            taken += 1
        self.count += taken
        return taken


class StreamSource:
    """Numbers and stores events in the channel streams in Redis, as another server
    process would (needs the server's ``REDIS_URL`` and ``SYSMANAGE_REDIS_PREFIX``)."""

    def __init__(self, hosts: list[tuple[str, str]], args: argparse.Namespace) -> None:
        import django

        django.setup()
        from django.conf import settings

        from sysmanage.streams import RedisStreams

        if not settings.REDIS_URL:
            raise SystemExit("the streams publisher needs REDIS_URL")
        self.streams = RedisStreams(settings.REDIS_URL)
        self.hosts = hosts
        self.rng = random.Random(7)
        self.schedules = {
            "host_metrics": Schedule(args.metrics_rate * len(hosts)),
            "system_alerts": Schedule(args.alerts_rate),
            "host_status": Schedule(args.status_rate),
        }
        self.failed = 0

    def due_events(self, now: float) -> list[tuple[str, str, dict[str, Any], str]]:
        """The events due at ``now``, as ``RedisStreams.publish`` takes them."""
        from alerts.events import AlertChanged
        from hosts.events import HostMetricsReported, HostStatusChanged

        events = []
        for channel, schedule in self.schedules.items():
            for _ in range(schedule.take(now)):
                host_id, hostname = self.hosts[schedule.count % len(self.hosts)]
                if channel == "host_metrics":
                    event: Any = HostMetricsReported(
                        host_id=host_id,
                        hostname=hostname,
                        timestamp=iso_now(),
                        metrics=sample_metrics(self.rng),  # type: ignore[arg-type]
                    )
                elif channel == "system_alerts":
                    event = AlertChanged(
                        alert_id=str(uuid.uuid4()),
                        action="raised",
                        severity=self.rng.choice(("info", "warning", "critical")),
                        status="open",
                        title=f"bench alert {schedule.count}",
                        message="raised by bench/resume.py",
                        host_id=host_id,
                        hostname=hostname,
                        category="custom",
                        timestamp=iso_now(),
                    )
                else:
                    status = self.rng.choice(("online", "offline"))
                    event = HostStatusChanged(
                        host_id=host_id,
                        hostname=hostname,
                        status=status,
                        previous_status="offline" if status == "online" else "online",
                        timestamp=iso_now(),
                    )
                message = event.to_message()
                events.append((channel, message["event"], message["data"], message["timestamp"]))
        return events

    async def send(self, now: float) -> None:
        """Publish what is due (one pipeline)."""
        events = self.due_events(now)
        if events:
            await self.streams.publish(events)

    def published(self) -> dict[str, int]:
        """Events published so far, per channel."""
        return {channel: s.count for channel, s in self.schedules.items()}

    async def close(self) -> None:
        """Close the Redis connections."""
        await self.streams.close()


class AlertSource:
    """Raises alerts through a server's REST API (a single process has no other way in)."""

    def __init__(self, port: int, token: str, rate: float) -> None:
        self.port = port
        self.token = token
        self.schedule = Schedule(rate)
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.failed = 0

    def _raise(self, n: int) -> None:
        body = json.dumps(
            {"severity": "warning", "category": "custom", "title": f"bench alert {n}"}
        ).encode()
        request = urllib.request.Request(
            f"http://{LOOPBACK}:{self.port}/api/alerts/",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        try:
            with self.opener.open(request, timeout=5) as response:
                response.read()
        except (OSError, urllib.error.URLError):
            self.failed += 1  # the server is down: that alert is not raised

    async def send(self, now: float) -> None:
        """Raise the alerts that are due (one request each, in a thread)."""
        for _ in range(self.schedule.take(now)):
            await asyncio.to_thread(self._raise, self.schedule.count)

    def published(self) -> dict[str, int]:
        """Alerts attempted so far."""
        return {"system_alerts": self.schedule.count - self.failed}

    async def close(self) -> None:
        """Nothing to close."""


async def publish_main(args: argparse.Namespace) -> None:
    """The publisher process: READY, GO, publish until STOP, DONE."""
    hosts = [(str(host_id), str(name)) for host_id, name in json.loads(args.hosts_json)]
    source: StreamSource | AlertSource = (
        StreamSource(hosts, args)
        if args.mode == "streams"
        else AlertSource(args.port, args.token, args.alerts_rate)
    )
    emit("READY", {})
    await expect_line("GO")
    stop = asyncio.ensure_future(read_line())
    start = time.monotonic()  # every schedule counts from here
    while not stop.done():
        now = time.monotonic() - start
        try:
            await source.send(now)
        except Exception as exc:  # Redis refused: say so, keep the schedule
            print(f"publish failed: {exc}", file=sys.stderr)
            source.failed += 1
        await asyncio.wait({stop}, timeout=0.05)
    await source.close()
    emit("DONE", {"published": source.published(), "failed": source.failed})


# -- clients ------------------------------------------------------------------------------


@dataclass
class Stream:
    """One subscription of a client or an observer, and what it received."""

    channel: str
    filters: dict[str, Any]
    #: the position of the first subscribe response (epoch, offset)
    initial: tuple[str, int] | None = None
    #: where to resume from: the last event's position, or a response's
    since: dict[str, Any] | None = None
    #: every event received, (epoch, offset) in arrival order
    seen: list[tuple[str, int]] = field(default_factory=list)
    #: events received before the connection was lost
    before_loss: int = 0
    recovered: bool | None = None
    #: the position of the resume response
    resume_head: tuple[str, int] | None = None
    replayed: int = 0
    snapshot_at: float | None = None


class Peer:
    """A client or observer socket: subscribes, keeps what it receives, and (clients)
    reconnects after losing its connection, as the browser client does."""

    def __init__(self, crowd: Crowd, name: str, subs: dict[str, dict[str, Any]]) -> None:
        self.crowd = crowd
        self.name = name
        self.streams = {channel: Stream(channel, filters) for channel, filters in subs.items()}
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.conn: ClientConnection | None = None
        self.requests = 0
        self.lost_at: float | None = None
        self.connected_at: float | None = None
        self.resumed_at: float | None = None
        self.failed_attempts = 0
        self.refusals = 0
        self.errors: list[str] = []
        self.resuming = False
        #: with ``--refresh``: the client's own sign-in, refreshed before it reconnects
        self.access = ""
        self.refresh = ""
        self.refreshed_at: float | None = None
        self.refresh_answers: dict[str, int] = {}
        self.logged_out = False
        #: attempts that reached the server but did not end subscribed (not counting
        #: connections refused while no process listened)
        self.handshakes_dropped = 0
        self.drop_kinds: dict[str, int] = {}

    # messages

    def handle(self, raw: str | bytes) -> None:
        """Account for one server message."""
        now = time.time()
        self.crowd.last_message_at = now
        message = json.loads(raw)
        kind = message.get("type")
        stream = self.streams.get(message.get("channel", ""))
        if kind == "event" and stream is not None:
            position = (str(message["epoch"]), int(message["offset"]))
            stream.seen.append(position)
            stream.since = {"epoch": position[0], "offset": position[1]}
            head = stream.resume_head
            if (
                stream.recovered
                and head is not None
                and position[0] == head[0]
                and position[1] <= head[1]
            ):
                stream.replayed += 1
            return
        reply_to = message.get("id")
        if kind == "status" and message["data"].get("event") == "events_missed":
            self.crowd.missed_notices += 1
            return
        if kind == "status" and stream is not None and reply_to is not None:
            if self.resuming:
                stream.snapshot_at = now
            return
        waiter = self.waiting.pop(str(reply_to), None) if reply_to is not None else None
        if kind == "error":
            self.errors.append(str(message["data"].get("code")))
        elif kind == "response" and stream is not None and waiter is not None:
            # Taken in here, before the replayed events that follow are read.
            self.took_response(stream, message["data"])
        if waiter is not None and not waiter.done():
            waiter.set_result(message)
        elif kind != "error":
            self.crowd.other_messages += 1

    def took_response(self, stream: Stream, data: dict[str, Any]) -> None:
        """Note the position (and, resuming, the outcome) a subscribe response gives."""
        head = data.get("position")
        position = (str(head["epoch"]), int(head["offset"])) if head else None
        stream.since = head  # the replayed events that follow set it again
        if self.resuming:
            stream.recovered = bool(data.get("recovered"))
            stream.resume_head = position
        else:
            stream.initial = position

    async def pump(self, conn: ClientConnection) -> None:
        """Read ``conn`` until it closes; fail the requests still waiting."""
        try:
            async for raw in conn:
                self.handle(raw)
        except ConnectionClosed:
            pass
        finally:
            for waiter in self.waiting.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("connection lost"))
            self.waiting.clear()

    async def subscribe(
        self, conn: ClientConnection, streams: list[Stream], resume: bool, timeout: float
    ) -> list[Stream]:
        """Send the subscribes of ``streams`` at once (with ``since`` when resuming), wait
        for every answer; return the refused ones.  Raise if the connection drops."""
        loop = asyncio.get_running_loop()
        pending = []
        for stream in streams:
            self.requests += 1
            request_id = f"{self.name}-{self.requests}"
            request: dict[str, Any] = {
                "type": "subscribe",
                "channel": stream.channel,
                "filters": stream.filters,
                "id": request_id,
            }
            if resume:
                request["since"] = stream.since
            self.waiting[request_id] = loop.create_future()
            pending.append((stream, self.waiting[request_id]))
            await conn.send(json.dumps(request))
        refused = []
        async with asyncio.timeout(timeout):
            for stream, waiter in pending:
                reply = await waiter
                if reply.get("type") != "response":
                    refused.append(stream)
        return refused

    def url(self, url: str) -> str:
        """``url`` with the client's own access token, when it has one."""
        return f"{url.split('?', 1)[0]}?token={self.access}" if self.access else url

    async def refresh_token(self) -> bool:
        """``POST /api/token/refresh/`` with the client's refresh token until answered
        200 (retried with the same token, after the back-off, on anything but 401);
        False when the server says the token is no good: the user is logged out."""
        args = self.crowd.args
        base = urllib.parse.urlsplit(args.resume_url)
        for attempt in itertools.count():
            try:
                status, body = await post_json(
                    base.hostname or LOOPBACK,
                    base.port or 80,
                    "/api/token/refresh/",
                    {"refresh": self.refresh},
                    args.connect_timeout,
                )
            except ConnectionRefusedError:
                status, body = -1, {}
            except (OSError, TimeoutError, ValueError):
                status, body = 0, {}
            key = {-1: "nothing listening", 0: "no answer"}.get(status, str(status))
            self.refresh_answers[key] = self.refresh_answers.get(key, 0) + 1
            if status == 200:
                self.access, self.refresh = str(body["access"]), str(body["refresh"])
                self.refreshed_at = time.time()
                return True
            if status == 401:
                self.logged_out = True
                return False
            await asyncio.sleep(backoff(attempt, args.min_delay, args.max_delay))
        return False

    def dropped(self, exc: BaseException, when: str) -> None:
        """Count an attempt that reached the server and failed, by kind."""
        self.handshakes_dropped += 1
        status = getattr(getattr(exc, "response", None), "status_code", None)
        close = getattr(getattr(exc, "rcvd", None), "code", None)
        kind = f"{when}: {type(exc).__name__}" + (f" {status}" if status else "")
        kind += f" close {close}" if close else ""
        self.drop_kinds[kind] = self.drop_kinds.get(kind, 0) + 1

    async def open(self, url: str) -> ClientConnection:
        """Open a socket to ``url`` (bounded by ``--connect-timeout``)."""
        return await connect(
            self.url(url),
            compression=None,
            proxy=None,
            open_timeout=self.crowd.args.connect_timeout,
            ping_interval=None,
            close_timeout=2,
            max_size=2**20,
        )

    # life

    async def start(self, url: str) -> asyncio.Task[None]:
        """Connect and subscribe; return the task that reads the socket."""
        conn = self.conn = await self.open(url)
        reader = asyncio.create_task(self.pump(conn))
        streams = list(self.streams.values())
        refused = await self.subscribe(conn, streams, False, self.crowd.args.reply_timeout)
        if refused:
            raise BenchError(f"{self.name}: subscribe refused: {self.errors}")
        return reader

    async def live(self, reader: asyncio.Task[None], url: str) -> None:
        """Read until the connection drops; then (unless the run is ending) reconnect to
        ``url`` with the browser's back-off until subscribed again; read on."""
        await reader
        if self.crowd.finishing:
            return
        self.lost_at = time.time()
        self.resuming = True
        for stream in self.streams.values():
            stream.before_loss = len(stream.seen)
        args = self.crowd.args
        attempt = 0
        while not self.crowd.finishing:
            await asyncio.sleep(backoff(attempt, args.min_delay, args.max_delay))
            attempt += 1
            if args.refresh and self.refreshed_at is None and not await self.refresh_token():
                return  # logged out
            try:
                conn = self.conn = await self.open(url)
            except ConnectionRefusedError:
                self.failed_attempts += 1  # nothing listens yet
                continue
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                self.failed_attempts += 1
                self.dropped(exc, "opening")
                continue
            self.connected_at = time.time()
            reader = asyncio.create_task(self.pump(conn))
            todo = list(self.streams.values())
            try:
                # A refused subscription ("subscribe again later") is asked again on the
                # same socket, after the same back-off.
                for retry in itertools.count():
                    todo = await self.subscribe(conn, todo, True, args.reply_timeout)
                    if not todo:
                        break
                    self.refusals += len(todo)
                    await asyncio.sleep(backoff(retry, args.min_delay, args.max_delay))
            except (ConnectionError, ConnectionClosed, TimeoutError) as exc:
                self.failed_attempts += 1
                self.dropped(exc, "subscribing")
                await conn.close()
                await reader
                continue
            self.resumed_at = time.time()
            self.crowd.resumed += 1
            if self.crowd.resumed == len(self.crowd.clients):
                self.crowd.all_resumed.set()
            await reader
            return


class Crowd:
    """The client process: every client and observer, and the run's figures."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        hosts = [str(h) for h in args.host_ids.split(",")]
        self.clients = [
            Peer(self, f"c{i}", subscriptions(args.channels, hosts[i % len(hosts)]))
            for i in range(args.clients)
        ]
        self.observers = (
            {h: Peer(self, f"o{n}", subscriptions(args.channels, h)) for n, h in enumerate(hosts)}
            if args.observer_url
            else {}
        )
        self.host_of = {c.name: hosts[i % len(hosts)] for i, c in enumerate(self.clients)}
        if args.tokens_file:
            pairs = json.loads(Path(args.tokens_file).read_text())
            for client, (access, refresh) in zip(self.clients, pairs, strict=True):
                client.access, client.refresh = access, refresh
        self.finishing = False
        self.resumed = 0
        self.all_resumed = asyncio.Event()
        self.last_message_at = time.time()
        self.other_messages = 0
        self.missed_notices = 0

    async def run(self) -> None:
        """The client process's protocol with the orchestrator (see :func:`main`)."""
        args = self.args
        observer_readers = [
            await observer.start(args.observer_url) for observer in self.observers.values()
        ]
        gate = asyncio.Semaphore(args.connect_concurrency)

        async def first(peer: Peer) -> asyncio.Task[None]:
            async with gate:
                return await peer.start(args.initial_url)

        started = time.monotonic()
        readers = await asyncio.gather(*(first(c) for c in self.clients))
        emit(
            "READY",
            {"clients": len(readers), "connect_seconds": round(time.monotonic() - started, 2)},
        )
        lives = [
            asyncio.create_task(c.live(r, args.resume_url))
            for c, r in zip(self.clients, readers, strict=True)
        ]
        killed = await expect_line("KILLED")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.resume_timeout):
                await self.all_resumed.wait()
        emit(
            "RESUMED",
            {"resumed": self.resumed, "seconds": round(time.time() - float(killed["at"]), 3)},
        )
        await expect_line("FINISH")
        deadline = time.monotonic() + 30
        while time.time() - self.last_message_at < args.drain and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        self.finishing = True
        observers_lost = sum(1 for r in observer_readers if r.done())
        peers = [*self.clients, *self.observers.values()]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.gather(
                    *(p.conn.close() for p in peers if p.conn is not None),
                    return_exceptions=True,
                )
        for task in [*lives, *observer_readers]:
            task.cancel()
        emit("RESULT", self.result(float(killed["at"]), observers_lost))

    def result(self, killed_at: float, observers_lost: int) -> dict[str, Any]:
        """The run's figures (times in seconds after the kill)."""
        clients = self.clients

        def after(values: list[float | None]) -> dict[str, float | int | None]:
            return spread([v - killed_at for v in values if v is not None])

        streams = [s for c in clients for s in c.streams.values()]
        check = self.check() if self.observers else None
        errors: dict[str, int] = {}
        for peer in [*clients, *self.observers.values()]:
            for code in peer.errors:
                errors[code] = errors.get(code, 0) + 1
        snapshots = [s.snapshot_at for s in streams if s.snapshot_at is not None]
        return {
            "clients": len(clients),
            "lost": after([c.lost_at for c in clients]),
            "connected": after([c.connected_at for c in clients]),
            "resumed": after([c.resumed_at for c in clients]),
            "subscribed_after_open": spread(
                [
                    c.resumed_at - c.connected_at
                    for c in clients
                    if c.resumed_at is not None and c.connected_at is not None
                ]
            ),
            "snapshots": after(list(snapshots)),
            "subscriptions": len(streams),
            "recovered_true": sum(1 for s in streams if s.recovered is True),
            "recovered_false": sum(1 for s in streams if s.recovered is False),
            "clients_all_recovered": sum(
                1 for c in clients if all(s.recovered for s in c.streams.values())
            ),
            "replayed": sum(s.replayed for s in streams),
            "replayed_per_channel": {
                ch: sum(s.replayed for s in streams if s.channel == ch)
                for ch in CHANNELS[: self.args.channels]
            },
            "events_received": sum(len(s.seen) for s in streams),
            "failed_attempts": sum(c.failed_attempts for c in clients),
            "refused_subscribes": sum(c.refusals for c in clients),
            "clients_refused": sum(1 for c in clients if c.refusals),
            "events_missed_notices": self.missed_notices,
            "clients_with_failed_attempts": sum(1 for c in clients if c.failed_attempts),
            "errors": errors,
            "other_messages": self.other_messages,
            "observers": len(self.observers),
            "observers_lost": observers_lost,
            "refreshed": after([c.refreshed_at for c in clients]),
            "refresh_answers": tally(c.refresh_answers for c in clients),
            "logged_out": sum(1 for c in clients if c.logged_out),
            "handshakes_dropped": sum(c.handshakes_dropped for c in clients),
            "drop_kinds": tally(c.drop_kinds for c in clients),
            "check": check,
        }

    def check(self) -> dict[str, Any]:
        """Compare every resumed client's events with its observer's, from the client's
        first subscription to the end: the same offsets in the same order, once each.

        A subscription answered ``recovered: false`` (its gap no longer in the history)
        is owed the events before it lost its socket and those after the resume
        response's position, not the gap between.
        """
        complete = streams = missing = extra = duplicates = disordered = 0
        owed = checked = gaps_told = skipped = 0
        examples: list[str] = []
        for client in self.clients:
            if client.resumed_at is None:
                skipped += len(client.streams)
                continue
            observer = self.observers[self.host_of[client.name]]
            for channel, stream in client.streams.items():
                streams += 1
                reference = observer.streams[channel].seen
                start = stream.initial
                if start is None:
                    continue
                got = stream.seen
                last = got[stream.before_loss - 1][1] if stream.before_loss else start[1]
                head = stream.resume_head[1] if stream.resume_head else last
                expected = [p for p in reference if p[0] == start[0] and p[1] > start[1]]
                if stream.recovered is False:
                    gaps_told += 1
                    expected = [p for p in expected if not last < p[1] <= head]
                else:
                    owed += sum(1 for p in expected if last < p[1] <= head)
                checked += len(expected)
                if got == expected:
                    complete += 1
                    continue
                lacking = set(expected) - set(got)
                surplus = set(got) - set(expected)
                missing += len(lacking)
                extra += len(surplus)
                duplicates += len(got) - len(set(got))
                disordered += int(got != sorted(got))
                if len(examples) < 5:
                    examples.append(
                        f"{client.name} {channel}: missing {sorted(lacking)[:5]}, "
                        f"extra {sorted(surplus)[:5]}, {len(got)} got vs {len(expected)}"
                    )
        return {
            "streams": streams,
            "complete": complete,
            "not_resumed": skipped,
            "recovered_false": gaps_told,
            "events_checked": checked,
            "owed_while_away": owed,
            "missing": missing,
            "extra": extra,
            "duplicates": duplicates,
            "out_of_order": disordered,
            "examples": examples,
        }


def tally(counts: Iterator[dict[str, int]]) -> dict[str, int]:
    """The sum of several counts by key."""
    total: dict[str, int] = {}
    for count in counts:
        for key, value in count.items():
            total[key] = total.get(key, 0) + value
    return total


async def clients_main(args: argparse.Namespace) -> None:
    """The client process (see :class:`Crowd`)."""
    await Crowd(args).run()


# -- orchestrator ---------------------------------------------------------------------------


@dataclass
class Server:
    """One server process (``python -m sysmanage.serve``), restartable on its port."""

    name: str
    env: dict[str, str]
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    #: the checkout whose server runs (``--server-root``)
    root: Path = REPO

    @property
    def http(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}-{self.starts}.log"

    def start(self) -> None:
        """Start the process on the server's port (Daphne binds it with SO_REUSEADDR)."""
        self.starts += 1
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    PYTHON,
                    "-m",
                    "sysmanage.serve",
                    "-b",
                    LOOPBACK,
                    "-p",
                    str(self.port),
                    "sysmanage.asgi:application",
                ],
                cwd=self.root,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Return once ``GET /healthz`` answers ``ok``."""
        assert self.proc is not None
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"server {self.name} exited:\n{tail(self.log)}")
            with contextlib.suppress(OSError), opener.open(f"{self.http}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
            time.sleep(0.05)
        raise BenchError(f"server {self.name} did not serve within {timeout:.0f}s")

    @property
    def pid(self) -> int:
        """The process id of the running process."""
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL the process, as a crash or an OOM kill would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """Stop the process if it runs."""
        if self.proc is not None:
            stop_process(self.proc)


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time ``proc`` used so far (user and system), 0 if it is gone."""
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def token_of(server: Server, password: str) -> str:
    """An access token of the benchmark user, from ``/api/token/``."""
    body = json.dumps({"username": USERNAME, "password": password}).encode()
    request = urllib.request.Request(
        f"http://{LOOPBACK}:{server.port}/api/token/",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        return str(json.load(response)["access"])


class Bench:
    """The temporary directory, databases, Redis prefixes and processes of one run."""

    def __init__(self, options: argparse.Namespace, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.password = secrets.token_urlsafe(16)
        self.secret_key = secrets.token_urlsafe(50)
        self.prefix = f"sysmanage-bench-resume-{uuid.uuid4().hex[:10]}"
        self.database = ""
        self.hosts: dict[str, list[tuple[str, str]]] = {}

    def env(self, database_url: str, redis_prefix: str | None) -> dict[str, str]:
        """A server process's environment."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.lower().endswith("_proxy") and not k.startswith(("DJANGO_", "SYSMANAGE_"))
        }
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "sysmanage.settings",
                "DATABASE_URL": database_url,
                "SYSMANAGE_VAR_DIR": str(self.workdir / "var"),
                "DJANGO_SECRET_KEY": self.secret_key,
                "JWT_ACCESS_TTL_SECONDS": "7200",
                # every client socket of the benchmark is the same user's
                "WS_MAX_SOCKETS_PER_USER": "0",
                "HOST_OFFLINE_AFTER_SECONDS": "86400",
                "LOG_LEVEL": "WARNING",
                "PYTHONPATH": str(self.options.server_root),
                "PYTHONUNBUFFERED": "1",
                "BENCH_PASSWORD": self.password,
                "BENCH_HOSTS": str(self.options.hosts),
            }
        )
        env.pop("REDIS_URL", None)
        if redis_prefix is not None:
            env["REDIS_URL"] = self.options.redis_url
            env["SYSMANAGE_REDIS_PREFIX"] = redis_prefix
        return env

    def seed(self, kind: str, env: dict[str, str]) -> None:
        """Migrate the database of ``env`` and create the user and hosts."""
        manage = [PYTHON, str(self.options.server_root / "manage.py")]
        for command in (
            [*manage, "migrate", "--noinput", "-v", "0"],
            [*manage, "shell", "-c", SEED_SCRIPT],
        ):
            done = subprocess.run(
                command,
                cwd=self.options.server_root,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if done.returncode != 0:
                raise BenchError(f"{' '.join(command[1:3])} failed:\n{done.stderr[-3000:]}")
        for line in done.stdout.splitlines():
            if line.startswith("HOSTS "):
                self.hosts[kind] = [(h, name) for h, name in json.loads(line[6:])]
        if kind not in self.hosts:
            raise BenchError(f"seeding printed no hosts:\n{done.stdout}")

    def mint(self, env: dict[str, str], path: Path) -> None:
        """Sign the user in once per client; write the pairs of tokens to ``path``."""
        done = subprocess.run(
            [PYTHON, str(self.options.server_root / "manage.py"), "shell", "-c", MINT_SCRIPT],
            cwd=self.options.server_root,
            env={**env, "BENCH_SIGN_INS": str(self.options.clients)},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        for line in done.stdout.splitlines():
            if line.startswith("TOKENS "):
                path.write_text(line[7:])
                return
        raise BenchError(f"minting tokens failed:\n{done.stderr[-3000:]}")

    def postgres_url(self) -> str:
        """A fresh database on the PostgreSQL server (created once per run)."""
        import psycopg

        admin = self.options.postgres_url
        if not self.database:
            self.database = f"sysmanage_bench_{secrets.token_hex(6)}"
            with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'CREATE DATABASE "{self.database}"')
        base = admin.rsplit("/", 1)[0]
        return f"{base}/{self.database}"

    def cleanup(self) -> None:
        """Drop the database and delete the Redis keys of the run."""
        if self.database:
            import psycopg

            with (
                contextlib.suppress(Exception),
                psycopg.connect(
                    self.options.postgres_url, autocommit=True, connect_timeout=5
                ) as conn,
            ):
                conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        with contextlib.suppress(Exception):
            import redis

            client = redis.Redis.from_url(self.options.redis_url, socket_timeout=5)
            keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()

    def profile(self, pid: int, variant: str) -> subprocess.Popen[bytes] | None:
        """Sample process ``pid`` with py-spy until stopped, if ``--profile`` asks."""
        directory: Path | None = self.options.profile
        if directory is None:
            return None
        directory.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "py-spy.log").open("ab") as log:
            proc = subprocess.Popen(
                [
                    str(Path(PYTHON).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--nonblocking",
                    *(["--gil"] if self.options.profile_gil else []),
                    "--output",
                    str(directory / f"resume-{variant}.txt"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        time.sleep(1.0)  # attached before the clients come
        return proc

    # -- one variant ----------------------------------------------------------------------

    def run(self, variant: str) -> dict[str, Any]:
        """Run one variant from fresh server processes; return its figures."""
        options = self.options
        single = variant == "memory"
        quiet = wait_until_quiet(options.quiet_below, options.quiet_wait)
        if quiet > options.quiet_below:
            print(f"  (machine still {quiet:.0f}% busy; measuring anyway)", flush=True)
        if single:
            env = self.env(f"sqlite:///{self.workdir / 'memory.sqlite3'}", None)
            self.seed("memory", env)
            hosts = self.hosts["memory"]
        else:
            env = self.env(self.postgres_url(), f"{self.prefix}-{variant}")
            if "postgres" not in self.hosts:
                self.seed("postgres", env)
            hosts = self.hosts["postgres"]
        tokens = self.workdir / f"{variant}-tokens.json"
        if options.refresh:
            self.mint(env, tokens)
        a = Server(f"{variant}-a", env, self.workdir, root=options.server_root)
        b = None if single else Server(f"{variant}-b", env, self.workdir, root=options.server_root)
        servers = [s for s in (a, b) if s is not None]
        children: list[Child] = []
        profilers: list[subprocess.Popen[bytes] | None] = []
        try:
            for server in servers:
                server.start()
            for server in servers:
                server.wait_ready()
            survivor = b or a
            token = token_of(survivor, self.password)
            host_ids = ",".join(h for h, _ in hosts)
            resume_url = (
                b.ws if variant == "other" and b is not None else a.ws
            ) + f"?token={token}"
            crowd = Child.spawn(
                [
                    PYTHON,
                    str(BENCH / "resume.py"),
                    "clients",
                    "--clients",
                    str(options.clients),
                    "--channels",
                    str(options.channels),
                    "--host-ids",
                    host_ids,
                    "--initial-url",
                    f"{a.ws}?token={token}",
                    "--resume-url",
                    resume_url,
                    "--observer-url",
                    f"{b.ws}?token={token}" if b is not None else "",
                    "--min-delay",
                    str(options.min_delay),
                    "--max-delay",
                    str(options.max_delay),
                    "--resume-timeout",
                    str(options.resume_timeout),
                    "--connect-timeout",
                    str(options.connect_timeout),
                    "--reply-timeout",
                    str(options.reply_timeout),
                    "--connect-concurrency",
                    str(options.connect_concurrency),
                    "--drain",
                    str(options.drain),
                    *(["--refresh", "--tokens-file", str(tokens)] if options.refresh else []),
                ],
                REPO,
                env,
                self.workdir / f"{variant}-clients.log",
            )
            children.append(crowd)
            ready = crowd.expect("READY", 300)
            publisher = Child.spawn(
                [
                    PYTHON,
                    str(BENCH / "resume.py"),
                    "publish",
                    "--mode",
                    "http" if single else "streams",
                    "--port",
                    str(survivor.port),
                    "--token",
                    token,
                    "--hosts-json",
                    json.dumps(hosts),
                    "--metrics-rate",
                    str(options.metrics_rate),
                    "--alerts-rate",
                    str(options.alerts_rate),
                    "--status-rate",
                    str(options.status_rate),
                ],
                REPO,
                env,
                self.workdir / f"{variant}-publisher.log",
            )
            children.append(publisher)
            publisher.expect("READY", 60)
            publisher.say("GO", {})
            print(
                f"  {variant}: {ready['clients']} clients subscribed in "
                f"{ready['connect_seconds']} s; events flowing for {options.steady:g} s",
                flush=True,
            )
            time.sleep(options.steady)
            load_before = machine_load()
            watched = {
                "clients": psutil.Process(crowd.proc.pid),
                "publisher": psutil.Process(publisher.proc.pid),
            }
            if b is not None:
                watched["B"] = psutil.Process(b.pid)
            if b is not None and variant == "other":
                profilers.append(self.profile(b.pid, variant))
            cpu = CpuWindow(watched)
            machine = MachineWindow()
            killed_at = time.time()
            a.kill()
            a.start()
            crowd.say("KILLED", {"at": killed_at})
            restarted_a = psutil.Process(a.pid)
            a.wait_ready()
            if variant != "other":
                profilers.append(self.profile(a.pid, variant))
            a_ready = time.time() - killed_at
            a_startup = cpu_seconds(restarted_a)
            resumed = crowd.expect("RESUMED", options.resume_timeout + 30)
            machine_report = machine.report()
            window = time.time() - killed_at
            usage = cpu.percentages()
            a_used = cpu_seconds(restarted_a)
            for profiler in profilers:
                if profiler is not None:
                    profiler.send_signal(signal.SIGINT)
                    profiler.wait(30)
            profilers.clear()
            usage["A (restarted)"] = round(100.0 * a_used / window, 1)
            ours = sum(v for k, v in usage.items() if k != "machine")
            usage["rest"] = round(max(0.0, usage["machine"] - ours), 1)
            # the CPU the serving process spent on the clients' return
            serving = usage["B"] * window / 100.0 if variant == "other" else a_used - a_startup
            time.sleep(options.after)
            publisher.say("STOP", {})
            published = publisher.expect("DONE", 60)
            crowd.say("FINISH", {})
            result = crowd.expect("RESULT", 120)
            load_after = machine_load()
            for child in children:
                child.proc.wait(30)
            for server in servers:
                if server.proc is not None and server.proc.poll() is not None:
                    raise BenchError(f"server {server.name} died:\n{tail(server.log)}")
        finally:
            for child in children:
                stop_process(child.proc, grace=5)
            for profiler in profilers:
                if profiler is not None:
                    stop_process(profiler)
            for server in servers:
                server.stop()
        logs = "".join(
            path.read_text(errors="replace") for path in self.workdir.glob(f"{variant}-[ab]-*.log")
        )
        result.update(
            variant=variant,
            machine=machine_report,
            database_locked=logs.count("database is locked"),
            tracebacks=logs.count("Traceback"),
            db_threads=os.environ.get("DB_THREADS", "default"),
            jitter=f"full jitter, first delay uniform in [0, {options.min_delay:g}) s, "
            f"doubling per failed attempt up to {options.max_delay:g} s",
            a_serving_after=round(a_ready, 3),
            a_startup_cpu_s=round(a_startup, 2),
            resumed_seconds=resumed["seconds"],
            cpu_percent=usage,
            serving_cpu_s=round(serving, 2),
            serving_cpu_ms_per_client=round(1000.0 * serving / max(options.clients, 1), 2),
            quiet_before=quiet,
            published=published,
            load_before=load_before,
            load_after=load_after,
        )
        return result


def summary(result: dict[str, Any]) -> Iterator[str]:
    """The figures of one variant, one per line."""
    n = result["clients"]
    resumed = result["resumed"]
    yield f"variant {result['variant']}: {n} clients, {result['subscriptions']} subscriptions"
    yield f"  reconnect: {result['jitter']}"
    yield (
        f"  restarted A serving (/healthz) {result['a_serving_after']} s after the kill; "
        f"connections seen lost: {result['lost']['count']} (last {result['lost']['max']} s)"
    )
    yield (
        f"  resumed (all subscribe responses): {resumed['count']} of {n}; after the kill "
        f"p50 {resumed['p50']} s, p99 {resumed['p99']} s, 100% "
        f"{resumed['max'] if resumed['count'] == n else 'not reached'} s"
    )
    connected = result["connected"]
    yield (
        f"  socket open again: p50 {connected['p50']} s, p99 {connected['p99']} s, "
        f"max {connected['max']} s; failed attempts {result['failed_attempts']} "
        f"({result['clients_with_failed_attempts']} clients)"
    )
    yield (
        f"  subscribes refused (asked again on the same socket after the back-off): "
        f"{result['refused_subscribes']} ({result['clients_refused']} clients); "
        f"events_missed notices received {result['events_missed_notices']}"
    )
    subscribed = result["subscribed_after_open"]
    yield (
        f"  from socket open to the last subscribe response: p50 {subscribed['p50']} s, "
        f"p99 {subscribed['p99']} s, max {subscribed['max']} s"
    )
    yield (
        f"  recovered: true {result['recovered_true']}, false {result['recovered_false']}; "
        f"clients with every subscription recovered {result['clients_all_recovered']}"
    )
    snapshots = result["snapshots"]
    if snapshots["count"]:
        yield (
            f"  status snapshots after recovered: false: {snapshots['count']}; p50 "
            f"{snapshots['p50']} s, 100% {snapshots['max']} s"
        )
    yield (
        f"  events replayed {result['replayed']} ({result['replayed_per_channel']}); "
        f"events received in all {result['events_received']}; published "
        f"{result['published']['published']} (failed {result['published']['failed']})"
    )
    check = result["check"]
    if check is not None:
        yield (
            f"  against {result['observers']} observers on B ({result['observers_lost']} "
            f"lost): {check['complete']} of {check['streams']} subscriptions of resumed "
            f"clients complete ({check['recovered_false']} of them told recovered: false, "
            f"checked without their gap; {check['not_resumed']} subscriptions of clients "
            f"not resumed not checked); {check['events_checked']} events checked, "
            f"{check['owed_while_away']} owed from the outage; missing {check['missing']}, "
            f"extra {check['extra']}, duplicates {check['duplicates']}, out of order "
            f"{check['out_of_order']}"
        )
        for example in check["examples"]:
            yield f"    {example}"
    if result["refreshed"]["count"]:
        refreshed = result["refreshed"]
        yield (
            f"  token refreshed: {refreshed['count']} clients, p50 {refreshed['p50']} s, "
            f"p99 {refreshed['p99']} s, max {refreshed['max']} s after the kill; answers "
            f"{result['refresh_answers']}; logged out {result['logged_out']}"
        )
    yield (
        f"  handshakes dropped (reached the server, did not end subscribed) "
        f"{result['handshakes_dropped']} {result['drop_kinds']}; server logs: 'database is locked' "
        f"{result['database_locked']}, tracebacks {result['tracebacks']}; "
        f"DB_THREADS {result['db_threads']}"
    )
    if result["errors"]:
        yield f"  errors received: {result['errors']}"
    yield (
        "  CPU from the kill until all resumed (% of one core; rest: Redis, PostgreSQL, "
        "other people): " + ", ".join(f"{k} {v}" for k, v in result["cpu_percent"].items())
    )
    serving = "B" if result["variant"] == "other" else "A after it served again"
    yield (
        f"  CPU of the serving process ({serving}) until all resumed: "
        f"{result['serving_cpu_s']} s, {result['serving_cpu_ms_per_client']} ms per client; "
        f"restarted A's start-up: {result['a_startup_cpu_s']} s"
    )
    yield f"  {result['machine']}"
    yield f"  before: {result['load_before']}"
    yield f"  after:  {result['load_after']}"


def targets(result: dict[str, Any], limit: float) -> list[Target]:
    """The storm's targets: every client back within ``limit`` s of the kill, no server
    error, nobody logged out, no handshake dropped, SQLite never "locked"."""
    n = result["clients"]
    resumed = result["resumed"]
    back = resumed["max"] if resumed["count"] == n and resumed["max"] is not None else 1e9
    answers = result["refresh_answers"]
    return [
        Target(f"{result['variant']}: all {n} back (resumed) after the kill", back, limit, " s"),
        Target("HTTP 500 answers to refreshes", answers.get("500", 0), 0),
        Target("clients logged out", result["logged_out"], 0),
        Target("handshakes dropped", result["handshakes_dropped"], 0),
        Target('"database is locked" in the server logs', result["database_locked"], 0),
    ]


# -- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the orchestrator and of its two roles."""
    parser = argparse.ArgumentParser(description="Resume benchmark.")
    parser.add_argument("role", nargs="?", choices=("run", "clients", "publish"), default="run")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument(
        "--channels", type=int, choices=(2, 3), default=3, help="subscriptions per client"
    )
    parser.add_argument("--hosts", type=int, default=10, help="hosts whose metrics flow")
    parser.add_argument(
        "--metrics-rate", type=float, default=1.0, help="host_metrics events/s per host"
    )
    parser.add_argument("--alerts-rate", type=float, default=2.0, help="system_alerts events/s")
    parser.add_argument("--status-rate", type=float, default=0.5, help="host_status events/s")
    parser.add_argument(
        "--variants",
        default="other,restart,memory",
        type=lambda s: [v for v in s.split(",") if v],
        help="other (resume on B), restart (on the restarted A), memory (one process)",
    )
    parser.add_argument(
        "--steady", type=float, default=5.0, help="seconds of events before the kill"
    )
    parser.add_argument(
        "--after", type=float, default=5.0, help="seconds of events after all resumed"
    )
    parser.add_argument("--min-delay", type=float, default=1.0, help="back-off base, seconds")
    parser.add_argument("--max-delay", type=float, default=30.0, help="back-off cap, seconds")
    parser.add_argument("--resume-timeout", type=float, default=180.0)
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument(
        "--reply-timeout",
        type=float,
        default=60.0,
        help="a client that waits longer for its subscribe responses reconnects",
    )
    parser.add_argument("--connect-concurrency", type=int, default=50)
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=30.0,
        help="before each variant, wait until the machine's CPU use (%% of one core, "
        "all cores summed) is at most this",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=120.0, help="wait at most this long for it"
    )
    parser.add_argument("--drain", type=float, default=3.0, help="quiet seconds that end a run")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record py-spy samples of the serving process from the kill until every "
        "client resumed, into DIR (collapsed stacks, one file per variant)",
    )
    parser.add_argument(
        "--profile-gil",
        action="store_true",
        help="with --profile: sample only the thread holding the interpreter lock (where "
        "the process's Python CPU goes, rather than where its threads wait)",
    )
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="every client has a sign-in of its own and, after losing its socket, "
        "refreshes its token (POST /api/token/refresh/, retried with the same token) "
        "before it reconnects with the new access token",
    )
    parser.add_argument(
        "--target-seconds",
        type=float,
        default=30.0,
        help="with --refresh: every client must be back within this long of the kill",
    )
    parser.add_argument(
        "--server-root",
        type=Path,
        default=REPO,
        help="run the server (and seed its database) from this checkout, e.g. a worktree "
        "of an earlier revision to compare with",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    # set by the orchestrator for its roles
    parser.add_argument("--host-ids", default="")
    parser.add_argument("--initial-url", default="")
    parser.add_argument("--resume-url", default="")
    parser.add_argument("--observer-url", default="")
    parser.add_argument("--mode", choices=("streams", "http"), default="streams")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default="")
    parser.add_argument("--hosts-json", dest="hosts_json", default="")
    parser.add_argument("--tokens-file", default="")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every variant and print the figures; 0 when all completed, else 1."""
    options = parse_args(argv)
    raise_open_file_limit()
    if options.role == "clients":
        asyncio.run(clients_main(options))
        return 0
    if options.role == "publish":
        asyncio.run(publish_main(options))
        return 0
    for url in (options.redis_url, options.postgres_url):
        if "127.0.0.1" not in url and "localhost" not in url:
            raise SystemExit(f"{url} is not a loopback address")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="sysmanage-bench-resume-"))
    bench = Bench(options, workdir)
    results = []
    status = 0
    print(f"machine: {psutil.cpu_count()} CPUs; work dir {workdir}", flush=True)
    try:
        for variant in options.variants:
            results.append(bench.run(variant))
            for line in summary(results[-1]):
                print(line, flush=True)
            if options.refresh:
                print_targets(targets(results[-1], options.target_seconds))
    except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"benchmark stopped: {exc}", file=sys.stderr)
        status = 1
    finally:
        bench.cleanup()
        if options.keep:
            print(f"kept {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        if options.json is not None and results:
            options.json.write_text(json.dumps(results, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
