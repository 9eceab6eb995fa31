"""
SysManage agent benchmark: many simulated, unchanged SysManage agents against one real
server process, over real HTTP and WebSockets.

::

    .venv/bin/python bench/sysmanage_agents.py --agents 200
    .venv/bin/python bench/sysmanage_agents.py --agents 500 --database postgres

Starts a fresh server (one Daphne process, in-memory channel layer; SQLite by default,
or a database of its own on PostgreSQL), creates one registration key
(``manage.py create_registration_key``) and a staff user, then runs ``--agents``
simulated agents in ``--workers`` client processes (asyncio, many agents each).  Every
agent does what the real agent does when it starts (``docs/sysmanage-agent.md``):

1. ``POST /api/host/register`` with the key (approved at once), ``GET /``,
   ``POST /api/agent/auth`` (short host name), ``/api/agent/connect?token=``;
2. ``system_info`` (``host_id`` only: held), ``heartbeat`` (``host_id`` and
   ``host_token``: proves the connection), ``os_version_update``, ``hardware_update``
   and a ``software_inventory_update`` of ``--packages`` packages, about
   ``--inventory-kb`` KB;
3. answers ``sync_custom_metrics`` (acknowledgement, then ``command_result``) and then
   sends ``custom_metric_samples`` for the metric ids it was given every
   ``--metrics-interval`` seconds, and a heartbeat every ``--heartbeat`` seconds;
4. answers ``execute_shell`` at once: acknowledgement, then a fake result.

Phases, each measured on its own: the connect **storm** (agents start spread over
``--ramp`` seconds; it ends when every agent's inventory was acknowledged and the
server pushed its metric scripts, i.e. the host came online), the **steady** state
(``--duration`` seconds), then ``--commands`` seed ``command`` requests sent one after
another over ``/ws`` by a staff client to random agents.  A ``/ws`` client subscribed
to ``fleet_status`` times when all hosts are online; five more watch five hosts'
``host_metrics``.  Server CPU is taken per thread, so the database thread (Daphne runs
every synchronous Django call of a process in one thread) shows on its own.

Targets only loopback; every wait is bounded; stops every process it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import psutil
import websockets
from _common import free_port, raise_fd_limit  # bench/ is on sys.path when run
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
#: Daphne's frame limits as ``scripts/serve`` sets them (agent limit + 64 KiB).
WS_LIMIT = 4 * 1024 * 1024 + 65536
PG_ADMIN_URL = "postgres://postgres@127.0.0.1:5432/test"
AGENT_VERSION = "0.9.9-bench"

SETUP = """
import json
from django.contrib.auth import get_user_model
from sysmanage.credentials import access_token_for
user = get_user_model().objects.create_superuser("bench", "bench@example.invalid", "x" * 20)
print(json.dumps({"access": access_token_for(user)}))
"""

# Shared counters (multiprocessing.Array) of the client processes.
REGISTERED, CONNECTED, PROVEN, ONLINE, INVENTORY_ACKED, FAILED, RECONNECTS = range(7)
COUNTERS = 7
# Phases (multiprocessing.Value); latencies are filed under the phase of their send.
STORM, STEADY, COMMANDS, STOP = range(4)
PHASES = ("storm", "steady", "commands", "stop")

WORDS = (
    "library",
    "utility",
    "daemon",
    "support",
    "shared",
    "development",
    "files",
    "runtime",
    "documentation",
    "plugin",
    "module",
    "kernel",
    "network",
    "client",
    "server",
    "tools",
    "the",
    "for",
    "and",
    "with",
    "GNU",
    "Python",
    "Perl",
    "data",
    "common",
    "extension",
    "bindings",
    "headers",
    "interface",
    "protocol",
    "format",
)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


# -- the inventory ---------------------------------------------------------------------


def software_tail(packages: int, target_kb: float, seed: int = 7) -> str:
    """The part of a ``software_inventory_update`` after ``"data":{"host_id":…,``: a
    package list of about ``target_kb`` KB, descriptions made of words."""
    rng = random.Random(seed)

    def entry(i: int, description: str) -> dict[str, Any]:
        name = f"{rng.choice(WORDS).lower()}-{rng.choice(WORDS).lower()}{i}"
        return {
            "package_name": name,
            "version": f"{rng.randint(0, 9)}.{rng.randint(0, 40)}."
            f"{rng.randint(0, 99)}-{rng.randint(1, 9)}+deb12u{rng.randint(1, 5)}",
            "package_manager": "apt",
            "architecture": "amd64",
            "size": rng.randint(10_000, 90_000_000),
            "description": description,
            "source": "debian-bookworm",
            "install_date": "2026-10-02T08:14:55+00:00",
        }

    bare = len(json.dumps([entry(i, "") for i in range(packages)]))
    room = max(0, int(target_kb * 1024) - bare - 200)
    each = room // max(1, packages)
    rng.seed(seed)
    software = []
    for i in range(packages):
        words: list[str] = []
        while len(" ".join(words)) < each:
            words.append(rng.choice(WORDS))
        software.append(entry(i, " ".join(words)[:each]))
    body = json.dumps({"software_packages": software, "total_packages": packages})
    return body[1:]  # without the opening brace: it follows "host_id": …,


# -- a light HTTP/1.1 client (the agent's HTTP calls) -----------------------------------


async def http(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> tuple[int, Any]:
    """One request on a new connection (``Connection: close``); JSON answers decoded."""
    data = json.dumps(body).encode() if body is not None else b""
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "User-Agent: sysmanage-agent/bench",
        "Accept: application/json",
        "Connection: close",
        f"Content-Length: {len(data)}",
    ]
    if body is not None:
        lines.append("Content-Type: application/json")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        raw = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head, _, content = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    if any(
        h.lower().startswith("transfer-encoding:") and "chunked" in h.lower() for h in header_lines
    ):
        decoded, rest = b"", content
        while rest:
            size_text, _, rest = rest.partition(b"\r\n")
            size = int(size_text.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2 :]
        content = decoded
    try:
        parsed: Any = json.loads(content) if content else None
    except ValueError:
        parsed = None
    return status, parsed


# -- one simulated agent ------------------------------------------------------------------


@dataclass
class Shared:
    """What the client processes share with the coordinator."""

    counters: Any  # mp.Array('q', COUNTERS)
    phase: Any  # mp.Value('i')
    start: Any  # mp.Event
    t0: Any  # mp.Value('d'): wall-clock start of the storm


@dataclass
class WorkerStats:
    """What one client process measured."""

    http: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    http_status: Counter[str] = field(default_factory=Counter)
    acks: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    agent_times: list[dict[str, float | None]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    commands_run: int = 0
    extensions: Counter[str] = field(default_factory=Counter)
    host_ids: list[str] = field(default_factory=list)


class Agent:
    """One SysManage agent as it behaves on the wire."""

    def __init__(
        self, index: int, opts: dict[str, Any], shared: Shared, stats: WorkerStats, tail: str
    ) -> None:
        self.index = index
        self.opts = opts
        self.port = opts["port"]
        self.shared = shared
        self.stats = stats
        self.tail = tail
        self.short = f"smb-{index:05d}"
        self.fqdn = f"{self.short}.bench.test"
        self.rng = random.Random(index)
        self.host_id: str | None = None
        self.host_token: str | None = None
        self.metric_ids: list[str] = []
        self.sent: dict[str, tuple[str, int, float]] = {}  # message_id -> (type, phase, t)
        self.seen_commands: set[str] = set()
        self.times: dict[str, float | None] = {
            "registered": None,
            "connected": None,
            "proven": None,
            "online": None,
            "inventory_acked": None,
        }
        self.inventory_id: str | None = None
        self.ws: Any = None

    def bump(self, index: int) -> None:
        with self.shared.counters.get_lock():
            self.shared.counters[index] += 1

    def mark(self, what: str, counter: int) -> None:
        if self.times[what] is None:
            self.times[what] = time.time()
            self.bump(counter)

    @property
    def stopping(self) -> bool:
        return bool(self.shared.phase.value >= STOP)

    async def timed_http(self, what: str, *args: Any, **kwargs: Any) -> tuple[int, Any]:
        started = time.perf_counter()
        try:
            status, body = await http(self.port, *args, **kwargs)
        except (OSError, TimeoutError, ValueError, IndexError) as exc:
            self.stats.http_status[f"{what} {type(exc).__name__}"] += 1
            raise
        self.stats.http[what].append((time.perf_counter() - started) * 1000)
        self.stats.http_status[f"{what} {status}"] += 1
        return status, body

    # -- start-up ---------------------------------------------------------------------------

    async def register(self) -> bool:
        body = {
            "message_type": "registration_request",
            "message_id": str(uuid.uuid4()),
            "timestamp": now_iso(),
            "hostname": self.fqdn,
            "fqdn": self.fqdn,
            "ipv4": f"10.{self.index // 65536 % 256}.{self.index // 256 % 256}.{self.index % 256}",
            "ipv6": None,
            "active": True,
            "script_execution_enabled": True,
            "is_privileged": False,
            "enabled_shells": ["sh", "bash"],
            "agent_version": AGENT_VERSION,
            "registration_key": self.opts["key"],
        }
        for attempt in range(8):
            try:
                status, answer = await self.timed_http(
                    "register", "POST", "/api/host/register", body
                )
            except (OSError, TimeoutError, ValueError, IndexError):
                status, answer = 0, None
            if status in (200, 201) and isinstance(answer, dict):
                self.host_id, self.host_token = answer["id"], answer["host_token"]
                self.mark("registered", REGISTERED)
                return True
            if status == 409:
                self.stats.errors["register 409 without an identity"] += 1
                return False
            if self.stopping:
                return False
            await asyncio.sleep(min(60, 5 * 2**attempt) * self.rng.uniform(0.8, 1.2))
        return False

    def envelope(
        self, message_type: str, data: dict[str, Any], *, identity: bool = True
    ) -> dict[str, Any]:
        if identity:
            data = {**data, "host_id": self.host_id, "host_token": self.host_token}
        return {
            "message_type": message_type,
            "message_id": str(uuid.uuid4()),
            "timestamp": now_iso(),
            "data": data,
        }

    async def send(
        self, message: dict[str, Any] | str, message_type: str, message_id: str | None
    ) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        if message_id is not None:
            self.sent[message_id] = (message_type, self.shared.phase.value, time.perf_counter())
        await self.ws.send(text)

    async def send_message(self, message: dict[str, Any]) -> None:
        await self.send(message, message["message_type"], message["message_id"])

    async def first_messages(self) -> None:
        """What the agent sends right after connecting."""
        await self.send_message(
            self.envelope(
                "system_info",
                {
                    "hostname": self.fqdn,
                    "fqdn": self.fqdn,
                    "ipv4": "10.0.0.1",
                    "ipv6": None,
                    "platform": "Linux",
                    "platform_release": "6.1.0-28-amd64",
                    "platform_version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1 (2024-11-22)",
                    "architecture": "x86_64",
                    "processor": "x86_64",
                    "os_info": {
                        "distribution": "Debian GNU/Linux",
                        "distribution_version": "12",
                        "distribution_codename": "bookworm",
                    },
                    "timezone": "UTC",
                    "is_privileged": False,
                    "script_execution_enabled": True,
                    "enabled_shells": ["sh", "bash"],
                    "agent_version": AGENT_VERSION,
                    "host_id": self.host_id,
                },
                identity=False,
            )
        )
        await self.send_message(self.heartbeat())
        await self.send_message(
            self.envelope(
                "os_version_update",
                {
                    "platform": "Linux",
                    "platform_release": "6.1.0-28-amd64",
                    "platform_version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1 (2024-11-22)",
                    "machine_architecture": "x86_64",
                    "processor": "x86_64",
                    "os_info": {
                        "distribution": "Debian GNU/Linux",
                        "distribution_version": "12",
                        "distribution_codename": "bookworm",
                    },
                },
            )
        )
        await self.send_message(
            self.envelope(
                "hardware_update",
                {
                    "cpu_vendor": "GenuineIntel",
                    "cpu_model": "Intel Xeon Processor (Icelake)",
                    "cpu_cores": 2,
                    "cpu_threads": 2,
                    "cpu_frequency_mhz": 2400,
                    "memory_total_mb": 24105,
                    "memory_available_mb": 20110,
                    "storage_devices": [
                        {
                            "name": "/dev/vda1",
                            "mount_point": "/",
                            "total_size": 50 * 2**30,
                            "used_size": 20 * 2**30,
                            "file_system": "ext4",
                        },
                        {
                            "name": "/dev/vdb1",
                            "mount_point": "/var",
                            "total_size": 100 * 2**30,
                            "used_size": 41 * 2**30,
                            "file_system": "xfs",
                        },
                    ],
                    "network_interfaces": [
                        {
                            "name": "lo",
                            "ipv4_addresses": ["127.0.0.1"],
                            "ipv6_addresses": ["::1"],
                            "mac_address": "00:00:00:00:00:00",
                            "is_up": True,
                        },
                        {
                            "name": "eth0",
                            "ipv4_addresses": ["10.0.0.1"],
                            "ipv6_addresses": [],
                            "mac_address": "02:00:00:00:00:01",
                            "is_up": True,
                        },
                    ],
                    "host_id": self.host_id,
                },
                identity=False,
            )
        )
        message_id = str(uuid.uuid4())
        self.inventory_id = message_id
        text = (
            '{"message_type":"software_inventory_update","message_id":"'
            + message_id
            + '","timestamp":"'
            + now_iso()
            + '","data":{"host_id":"'
            + str(self.host_id)
            + '",'
            + self.tail
            + "}"
        )
        await self.send(text, "software_inventory_update", message_id)

    def heartbeat(self) -> dict[str, Any]:
        return self.envelope(
            "heartbeat",
            {
                "agent_status": "healthy",
                "hostname": self.fqdn,
                "ipv4": "10.0.0.1",
                "ipv6": None,
                "agent_version": AGENT_VERSION,
            },
        )

    def samples(self) -> dict[str, Any]:
        values = []
        for metric_id in self.metric_ids:
            if "cpu" in metric_id:
                value = round(self.rng.uniform(1, 60), 2)
            elif "load" in metric_id:
                value = round(self.rng.uniform(0, 1.5), 2)
            else:
                value = round(self.rng.uniform(20, 70), 2)
            values.append(
                {
                    "metric_id": metric_id,
                    "value": value,
                    "status": "ok",
                    "error_detail": None,
                    "collected_at": now_iso(),
                }
            )
        return self.envelope("custom_metric_samples", {"samples": values})

    # -- the connection -------------------------------------------------------------------

    async def run(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if not await self.register():
            self.bump(FAILED)
            self.stats.errors["registration failed"] += 1
            return
        attempts = 0
        while not self.stopping:
            try:
                await self.connection()
            except (
                OSError,
                TimeoutError,
                ValueError,
                IndexError,
                KeyError,
                websockets.WebSocketException,
            ) as exc:
                self.stats.errors[f"connect: {type(exc).__name__}"] += 1
            if self.stopping:
                break
            attempts += 1
            self.bump(RECONNECTS)
            if attempts > 20:
                self.bump(FAILED)
                self.stats.errors["gave up reconnecting"] += 1
                break
            # websocket.reconnect_interval (5 s), with jitter
            await asyncio.sleep(self.opts["reconnect"] * self.rng.uniform(0.8, 1.2))

    async def connection(self) -> None:
        status, _ = await self.timed_http("GET /", "GET", "/")
        if status != 200:
            raise ValueError(f"GET / answered {status}")
        status, answer = await self.timed_http(
            "auth", "POST", "/api/agent/auth", headers={"x-agent-hostname": self.short}
        )
        if status != 200 or not isinstance(answer, dict):
            raise ValueError(f"auth answered {status}")
        url = f"ws://127.0.0.1:{self.port}/api/agent/connect?" + urlencode(
            {"token": answer["connection_token"]}
        )
        started = time.perf_counter()
        ping = self.opts["ws_ping"] or None
        async with ws_connect(
            url,
            open_timeout=60,
            close_timeout=5,
            max_size=2**20,
            ping_interval=ping,
            ping_timeout=ping,
            proxy=None,
            compression=None if self.opts["no_deflate"] else "deflate",
        ) as ws:
            self.ws = ws
            self.stats.http["ws handshake"].append((time.perf_counter() - started) * 1000)
            self.stats.extensions[",".join(e.name for e in ws.protocol.extensions) or "none"] += 1
            self.mark("connected", CONNECTED)
            tasks = [asyncio.ensure_future(self.read_loop(ws))]
            try:
                await self.first_messages()
                tasks.append(asyncio.ensure_future(self.heartbeats()))
                tasks.append(asyncio.ensure_future(self.metric_loop()))
                stop = asyncio.ensure_future(self.wait_stop())
                _done, _ = await asyncio.wait([tasks[0], stop], return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        rcvd = ws.protocol.close_rcvd
        code = rcvd.code if rcvd is not None else 1006
        if not self.stopping:
            self.stats.closes[str(code)] += 1

    async def wait_stop(self) -> None:
        while not self.stopping:
            await asyncio.sleep(0.5)

    async def heartbeats(self) -> None:
        interval = self.opts["heartbeat"]
        await asyncio.sleep(self.rng.uniform(0, interval))
        while True:
            await self.send_message(self.heartbeat())
            await asyncio.sleep(interval)

    async def metric_loop(self) -> None:
        interval = self.opts["metrics_interval"]
        while not self.metric_ids:
            await asyncio.sleep(0.5)
        # the scripts run on their cadence from the moment they arrive
        await asyncio.sleep(self.rng.uniform(1, interval))
        while True:
            await self.send_message(self.samples())
            await asyncio.sleep(interval)

    async def read_loop(self, ws: Any) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                message = json.loads(raw)
                kind = message.get("message_type")
                if kind == "ack":
                    self.on_ack(message)
                elif kind == "command":
                    await self.on_command(message)
                elif kind == "ping":
                    data = message.get("data") or {}
                    await self.send_message(
                        self.envelope(
                            "pong", {"ping_id": data.get("ping_id", message.get("message_id"))}
                        )
                    )
                elif kind == "error":
                    self.stats.errors[f"server error {message.get('error_type')}"] += 1

    def on_ack(self, message: dict[str, Any]) -> None:
        acked = (message.get("data") or {}).get("acked_message_id")
        sent = self.sent.pop(acked, None) if isinstance(acked, str) else None
        if sent is None:
            return
        kind, phase, at = sent
        self.stats.acks[f"{PHASES[phase]} {kind}"].append((time.perf_counter() - at) * 1000)
        if kind == "heartbeat":
            self.mark("proven", PROVEN)
        if acked == self.inventory_id:
            self.mark("inventory_acked", INVENTORY_ACKED)

    async def on_command(self, message: dict[str, Any]) -> None:
        queue_id = str(message.get("queue_message_id") or message.get("message_id"))
        ack = {
            "message_type": "command_acknowledgment",
            "message_id": queue_id,
            "timestamp": now_iso(),
        }
        await self.send(ack, "command_acknowledgment", None)
        if queue_id in self.seen_commands:
            return
        self.seen_commands.add(queue_id)
        body = message.get("data") or {}
        command_type = body.get("command_type")
        parameters = body.get("parameters") or {}
        if command_type == "sync_custom_metrics":
            self.metric_ids = [m["id"] for m in parameters.get("metrics", [])]
            self.mark("online", ONLINE)
            data = {
                "success": True,
                "result": {"metric_count": len(self.metric_ids)},
                "error": None,
                "exit_code": 0,
            }
        elif command_type == "execute_shell":
            self.stats.commands_run += 1
            data = {
                "success": True,
                "result": {"result": {"stdout": "ok\n", "stderr": "", "exit_code": 0}},
                "error": None,
                "exit_code": 0,
            }
        else:
            data = {
                "success": False,
                "result": None,
                "error": f"Unknown command type: {command_type}",
                "exit_code": None,
            }
        await self.send_message(
            self.envelope(
                "command_result",
                {"command_id": message.get("message_id"), "command_type": command_type, **data},
            )
        )


def worker_main(indices: list[int], opts: dict[str, Any], shared: Shared, results: Any) -> None:
    """One client process: its share of the agents, until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit()
    tail = software_tail(opts["packages"], opts["inventory_kb"])
    stats = WorkerStats()

    async def main() -> None:
        shared.start.wait()
        t0 = shared.t0.value
        n = opts["agents"]
        agents = [Agent(i, opts, shared, stats, tail) for i in indices]
        tasks = [
            asyncio.ensure_future(a.run(max(0.0, t0 + opts["ramp"] * i / n - time.time())))
            for a, i in zip(agents, indices, strict=True)
        ]
        while shared.phase.value < STOP:
            await asyncio.sleep(0.5)
        await asyncio.wait(tasks, timeout=30)
        for agent in agents:
            stats.agent_times.append(agent.times)
            if agent.host_id:
                stats.host_ids.append(agent.host_id)

    asyncio.run(main())
    results.put(
        {
            "http": dict(stats.http),
            "http_status": dict(stats.http_status),
            "acks": dict(stats.acks),
            "agent_times": stats.agent_times,
            "errors": dict(stats.errors),
            "closes": dict(stats.closes),
            "commands_run": stats.commands_run,
            "extensions": dict(stats.extensions),
        }
    )


# -- the server ---------------------------------------------------------------------------


def server_env(workdir: Path, database_url: str, agents: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "SYSMANAGE_", "JWT_", "WS_"))
        and k not in ("DATABASE_URL", "REDIS_URL", "LOG_LEVEL", "PYTHONPATH")
    }
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "sysmanage.settings",
            "SYSMANAGE_VAR_DIR": str(workdir),
            "DATABASE_URL": database_url,
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(40),
            "JWT_ACCESS_TTL_SECONDS": "7200",
            "LOG_LEVEL": "WARNING",
            # Every simulated agent connects from 127.0.0.1 but stands for a machine
            # of its own: one address may hold all of them unproven at once.
            "SYSMANAGE_AGENT_UNPROVEN_PER_ADDRESS": str(agents),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def manage(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    result = subprocess.run(
        [PYTHON, "manage.py", *args],
        cwd=REPO,
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {args[0]} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def start_server(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "sysmanage.serve",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "--websocket-max-message-size",
            str(WS_LIMIT),
            "--websocket-max-frame-size",
            str(WS_LIMIT),
            "sysmanage.asgi:application",
        ],
        cwd=REPO,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with (
            contextlib.suppress(OSError),
            opener.open(f"http://127.0.0.1:{port}/healthz", timeout=1) as response,
        ):
            if response.status == 200:
                return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")


class Sampler:
    """CPU of the server (per thread), of the client processes and of the machine."""

    def __init__(self, server: psutil.Process, clients: list[psutil.Process]) -> None:
        self.server = server
        self.clients = clients
        self.peak_rss = 0

    def snapshot(self) -> dict[str, Any]:
        cpu = self.server.cpu_times()
        threads = {t.id: t.user_time + t.system_time for t in self.server.threads()}
        clients = 0.0
        for proc in self.clients:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                clients += times.user + times.system
        machine = psutil.cpu_times()
        rss = self.server.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)
        return {
            "t": time.monotonic(),
            "server": cpu.user + cpu.system,
            "threads": threads,
            "clients": clients,
            "rss": rss,
            "machine": sum(machine) - machine.idle - getattr(machine, "iowait", 0),
        }

    def window(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        span = max(1e-6, b["t"] - a["t"])
        server = 100 * (b["server"] - a["server"]) / span
        clients = 100 * (b["clients"] - a["clients"]) / span
        machine = 100 * (b["machine"] - a["machine"]) / span
        busy = sorted(
            (
                (100 * (b["threads"][tid] - a["threads"].get(tid, 0.0)) / span, tid)
                for tid in b["threads"]
            ),
            reverse=True,
        )
        main = next((v for v, tid in busy if tid == self.server.pid), 0.0)
        others = [(v, tid) for v, tid in busy if tid != self.server.pid]
        return {
            "seconds": round(span, 1),
            "server_cpu": round(server, 1),
            "main_thread_cpu": round(main, 1),
            "busiest_other_thread_cpu": round(others[0][0], 1) if others else 0.0,
            "client_cpu": round(clients, 1),
            "other_cpu": round(max(0.0, machine - server - clients), 1),
            "rss_mb": round(b["rss"] / 2**20, 1),
        }


# -- /ws clients of the coordinator ---------------------------------------------------


async def fleet_watch(url: str, access: str, target: int, seen: dict[str, Any]) -> None:
    """Follow ``fleet_status``; note when ``online_hosts`` first reaches ``target``."""
    headers = {"Authorization": f"Bearer {access}"}
    async with ws_connect(
        url, additional_headers=headers, max_size=2**22, proxy=None, open_timeout=60
    ) as ws:
        await ws.send(json.dumps({"type": "subscribe", "channel": "fleet_status", "id": "f"}))
        async for raw in ws:
            message = json.loads(raw)
            if message.get("channel") != "fleet_status":
                continue
            data = message.get("data") or {}
            seen["last"] = data
            seen["events"] = seen.get("events", 0) + 1
            if data.get("online_hosts", 0) >= target and "all_online_at" not in seen:
                seen["all_online_at"] = time.time()


async def metrics_watch(url: str, access: str, host_id: str, counts: dict[str, int]) -> None:
    headers = {"Authorization": f"Bearer {access}"}
    async with ws_connect(
        url, additional_headers=headers, max_size=2**22, proxy=None, open_timeout=60
    ) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "subscribe",
                    "channel": "host_metrics",
                    "filters": {"host_id": host_id},
                    "id": "m",
                }
            )
        )
        async for raw in ws:
            message = json.loads(raw)
            if message.get("type") == "event" and message.get("channel") == "host_metrics":
                counts[host_id] = counts.get(host_id, 0) + 1


async def time_commands(
    url: str, access: str, host_ids: list[str], count: int, spacing: float
) -> tuple[list[float], Counter[str]]:
    """Round trips (ms) of ``count`` shell commands sent one after another."""
    headers = {"Authorization": f"Bearer {access}"}
    times: list[float] = []
    outcomes: Counter[str] = Counter()
    rng = random.Random(1)
    async with ws_connect(
        url, additional_headers=headers, max_size=2**22, proxy=None, open_timeout=60
    ) as ws:
        for i in range(count):
            started = time.perf_counter()
            await ws.send(
                json.dumps(
                    {
                        "type": "command",
                        "channel": "command_execution",
                        "id": f"c{i}",
                        "data": {"host_id": rng.choice(host_ids), "command": "true", "timeout": 10},
                    }
                )
            )
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if message.get("id") == f"c{i}":
                    break
            elapsed = (time.perf_counter() - started) * 1000
            if message["type"] == "response":
                outcomes[str(message["data"].get("status"))] += 1
                if message["data"].get("status") == "completed":
                    times.append(elapsed)
            else:
                outcomes[f"{message['type']} {(message.get('data') or {}).get('code')}"] += 1
            await asyncio.sleep(max(0.0, spacing - elapsed / 1000))
    return times, outcomes


def rest_get(port: int, path: str, access: str) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {access}"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=60) as response:
        return json.loads(response.read())


def rest_register_without_key(port: int) -> int:
    """A new registration without a key, from the same address (the per-address limit)."""
    body = json.dumps(
        {
            "message_type": "registration_request",
            "message_id": str(uuid.uuid4()),
            "timestamp": now_iso(),
            "hostname": "keyless-check.bench.test",
            "agent_version": "x",
        }
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/host/register",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


# -- the run ------------------------------------------------------------------------------


async def coordinate(
    args: argparse.Namespace,
    port: int,
    access: str,
    shared: Shared,
    sampler: Sampler,
    workers: list[Any],
) -> dict[str, Any]:
    n = args.agents
    ws_url = f"ws://127.0.0.1:{port}/ws"
    fleet: dict[str, Any] = {}
    background = [asyncio.ensure_future(fleet_watch(ws_url, access, n, fleet))]
    await asyncio.sleep(1.0)
    out: dict[str, Any] = {}
    rss0 = sampler.server.memory_info().rss
    profiler = start_profiler(args, sampler.server.pid, "storm")

    # -- the storm
    s0 = sampler.snapshot()
    shared.t0.value = time.time() + 0.5
    t0 = shared.t0.value
    out["t0"] = t0
    shared.start.set()
    deadline = time.monotonic() + args.storm_timeout
    progress_at = time.monotonic()
    peak_1s = 0.0
    last = s0
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        snap = sampler.snapshot()
        peak_1s = max(peak_1s, 100 * (snap["server"] - last["server"]) / (snap["t"] - last["t"]))
        last = snap
        c = list(shared.counters)
        if time.monotonic() - progress_at >= 10:
            progress_at = time.monotonic()
            print(
                f"  [{time.time() - t0:5.0f}s] registered {c[REGISTERED]}, connected "
                f"{c[CONNECTED]}, proven {c[PROVEN]}, online {c[ONLINE]}, inventory acked "
                f"{c[INVENTORY_ACKED]}, failed {c[FAILED]}, reconnects {c[RECONNECTS]}",
                flush=True,
            )
        if c[INVENTORY_ACKED] + c[FAILED] >= n and c[ONLINE] + c[FAILED] >= n:
            break
    s1 = sampler.snapshot()
    stop_profiler(profiler)
    out["storm"] = sampler.window(s0, s1)
    out["storm"]["peak_1s_server_cpu"] = round(peak_1s, 1)
    out["storm"]["rss_per_agent_kb"] = round((s1["rss"] - rss0) / max(1, n) / 1024, 1)
    out["storm_wall_s"] = round(time.time() - t0, 1)
    out["counters"] = dict(
        zip(
            (
                "registered",
                "connected",
                "proven",
                "online",
                "inventory_acked",
                "failed",
                "reconnects",
            ),
            list(shared.counters),
            strict=True,
        )
    )
    # fleet_status is throttled (FLEET_STATUS_MIN_INTERVAL): give its last event a moment
    for _ in range(10):
        if "all_online_at" in fleet:
            break
        await asyncio.sleep(0.5)
    out["fleet_all_online_s"] = (
        round(fleet["all_online_at"] - t0, 1) if "all_online_at" in fleet else None
    )
    out["fleet_last"] = fleet.get("last")

    rows: list[dict[str, Any]] = []
    while True:  # the API pages at most 500 hosts at a time
        page = rest_get(port, f"/api/hosts/?status=online&limit=500&offset={len(rows)}", access)
        rows += page["results"]
        if not page.get("next") or not page["results"]:
            break
    host_ids = [str(h["id"]) for h in rows if h.get("status") == "online"]
    out["online_in_db"] = len(host_ids)
    if host_ids:
        with contextlib.suppress(Exception):
            inventory = rest_get(port, f"/api/hosts/{host_ids[0]}/inventory/", access)
            out["inventory_sample"] = {
                kind: (row.get("item_count"), len(json.dumps(row.get("data"))))
                for kind, row in inventory["inventory"].items()
            }

    # -- the steady state
    shared.phase.value = STEADY
    counts: dict[str, int] = {}
    watched = host_ids[:5]
    background += [asyncio.ensure_future(metrics_watch(ws_url, access, h, counts)) for h in watched]
    await asyncio.sleep(2.0)
    reconnects0 = shared.counters[RECONNECTS]
    profiler = start_profiler(args, sampler.server.pid, "steady")
    s2 = sampler.snapshot()
    await asyncio.sleep(args.duration)
    s3 = sampler.snapshot()
    stop_profiler(profiler)
    out["steady"] = sampler.window(s2, s3)
    out["steady"]["reconnects"] = shared.counters[RECONNECTS] - reconnects0
    expected = len(watched) * args.duration / args.metrics_interval
    out["host_metrics_events"] = sum(counts.values())
    out["host_metrics_expected"] = round(expected, 1)

    # -- commands
    shared.phase.value = COMMANDS
    rtts: list[float] = []
    outcomes: Counter[str] = Counter()
    if args.commands and host_ids:
        s4 = sampler.snapshot()
        rtts, outcomes = await time_commands(
            ws_url, access, host_ids, args.commands, args.command_spacing
        )
        s5 = sampler.snapshot()
        out["commands"] = sampler.window(s4, s5)
    out["command_rtts"] = rtts
    out["command_outcomes"] = dict(outcomes)
    out["keyless_registration_after"] = rest_register_without_key(port)

    shared.phase.value = STOP
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    out["peak_rss_mb"] = round(sampler.peak_rss / 2**20, 1)
    return out


def start_profiler(args: argparse.Namespace, pid: int, label: str) -> Any:
    if args.profile is None:
        return None
    args.profile.mkdir(parents=True, exist_ok=True)
    py_spy = Path(PYTHON).parent / "py-spy"
    output = args.profile / f"{label}-{args.agents}-{args.database}.txt"
    proc = subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "100",
            "--format",
            "raw",
            "--threads",
            "--idle",
            "--nonblocking",
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    return proc


def stop_profiler(proc: Any) -> None:
    if proc is None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def summarize(
    args: argparse.Namespace, out: dict[str, Any], results: list[dict[str, Any]]
) -> tuple[list[tuple[str, str]], bool]:
    http: dict[str, list[float]] = defaultdict(list)
    acks: dict[str, list[float]] = defaultdict(list)
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    closes: Counter[str] = Counter()
    extensions: Counter[str] = Counter()
    times: list[dict[str, Any]] = []
    for r in results:
        for k, v in r["http"].items():
            http[k] += v
        for k, v in r["acks"].items():
            acks[k] += v
        statuses.update(r["http_status"])
        errors.update(r["errors"])
        closes.update(r["closes"])
        extensions.update(r["extensions"])
        times += r["agent_times"]
    t0 = out["t0"]

    def spread(values: list[float], unit: str = "ms") -> str:
        if not values:
            return "-"
        return (
            f"p50 {pct(values, 0.5):.0f} / p99 {pct(values, 0.99):.0f} / max "
            f"{max(values):.0f} {unit} (n={len(values)})"
        )

    def when(key: str) -> str:
        values = [t[key] - t0 for t in times if t[key] is not None]
        if not values:
            return "-"
        return (
            f"{len(values)}/{args.agents}; p50 {pct(values, 0.5):.1f} s, last {max(values):.1f} s"
        )

    storm, steady = out["storm"], out["steady"]
    n = args.agents
    rows = [
        (
            "agents / client processes",
            f"{n} / {args.workers}; ramp {args.ramp:.0f} s; "
            f"inventory {args.packages} packages, "
            f"{out['inventory_bytes'] / 1024:.0f} KB",
        ),
        ("storm: registered (after 1st start)", when("registered")),
        ("storm: socket open", when("connected")),
        ("storm: identity proven (heartbeat ack)", when("proven")),
        ("storm: online (metric scripts received)", when("online")),
        ("storm: software inventory acknowledged", when("inventory_acked")),
        (
            "storm: all online on fleet_status",
            f"{out['fleet_all_online_s']} s after start"
            if out["fleet_all_online_s"] is not None
            else f"never (last: {out['fleet_last']})",
        ),
        ("storm: window", f"{storm['seconds']} s"),
        (
            "storm: server CPU",
            f"{storm['server_cpu']}% (peak 1 s {storm['peak_1s_server_cpu']}%);"
            f" main thread {storm['main_thread_cpu']}%, busiest other "
            f"thread {storm['busiest_other_thread_cpu']}%",
        ),
        ("storm: client CPU / others", f"{storm['client_cpu']}% / {storm['other_cpu']}%"),
        (
            "storm: server RSS",
            f"{storm['rss_mb']} MB ({storm['rss_per_agent_kb']} KB per "
            f"agent); peak {out['peak_rss_mb']} MB",
        ),
        ("storm: POST /api/host/register", spread(http["register"])),
        ("storm: GET /", spread(http["GET /"])),
        ("storm: POST /api/agent/auth", spread(http["auth"])),
        ("storm: WebSocket handshake", spread(http["ws handshake"])),
        ("storm: ack system_info (held)", spread(acks["storm system_info"])),
        ("storm: ack heartbeat", spread(acks["storm heartbeat"])),
        ("storm: ack hardware_update", spread(acks["storm hardware_update"])),
        ("storm: ack software_inventory_update", spread(acks["storm software_inventory_update"])),
        (
            "steady: window",
            f"{steady['seconds']} s, heartbeat every {args.heartbeat:.0f} s, "
            f"samples every {args.metrics_interval:.0f} s",
        ),
        (
            "steady: server CPU",
            f"{steady['server_cpu']}%; main thread "
            f"{steady['main_thread_cpu']}%, busiest other thread "
            f"{steady['busiest_other_thread_cpu']}%",
        ),
        ("steady: client CPU / others", f"{steady['client_cpu']}% / {steady['other_cpu']}%"),
        ("steady: server RSS", f"{steady['rss_mb']} MB"),
        ("steady: ack heartbeat", spread(acks["steady heartbeat"])),
        ("steady: ack custom_metric_samples", spread(acks["steady custom_metric_samples"])),
        (
            "steady: host_metrics events (5 hosts)",
            f"{out['host_metrics_events']} (expected ~{out['host_metrics_expected']})",
        ),
        ("steady: reconnects", str(steady["reconnects"])),
    ]
    rtts = out["command_rtts"]
    if "commands" in out:
        rows += [
            ("commands: round trip", spread(rtts)),
            (
                "commands: outcomes",
                ", ".join(f"{k} {v}" for k, v in sorted(out["command_outcomes"].items())),
            ),
            ("commands: server CPU", f"{out['commands']['server_cpu']}%"),
        ]
    rows += [
        ("HTTP answers", ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))),
        ("WebSocket extensions", ", ".join(f"{k}: {v}" for k, v in extensions.items())),
        ("unexpected closes", ", ".join(f"{k}: {v}" for k, v in closes.items()) or "none"),
        ("agent-side errors", ", ".join(f"{k}: {v}" for k, v in errors.items()) or "none"),
        ("online hosts in the database", str(out["online_in_db"])),
        ("inventory of one host (kind: items, bytes)", str(out.get("inventory_sample"))),
        ("keyless registration afterwards", f"HTTP {out['keyless_registration_after']}"),
        ("server log", out["log_summary"]),
    ]
    ok = (
        out["counters"]["failed"] == 0
        and out["counters"]["inventory_acked"] == n
        and out["counters"]["online"] == n
        and not closes
        and (not args.commands or len(rtts) == args.commands)
    )
    return rows, ok


def log_summary(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "no log"
    interesting: Counter[str] = Counter()
    for line in lines:
        for word in ("ERROR", "WARNING", "Traceback", "database is locked", "timed out"):
            if word in line:
                interesting[word] += 1
    if not interesting:
        return f"{len(lines)} lines, no warnings or errors"
    first = next((ln for ln in lines if "ERROR" in ln or "WARNING" in ln or "Traceback" in ln), "")
    return (
        f"{len(lines)} lines; "
        + ", ".join(f"{k} {v}" for k, v in interesting.items())
        + f"; first: {first[:200]}"
    )


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument(
        "--ramp", type=float, default=5.0, help="seconds over which the agents start (default 5)"
    )
    parser.add_argument("--heartbeat", type=float, default=30.0)
    parser.add_argument("--metrics-interval", type=float, default=60.0)
    parser.add_argument("--duration", type=float, default=120.0, help="steady state, seconds")
    parser.add_argument("--commands", type=int, default=100)
    parser.add_argument(
        "--command-spacing",
        type=float,
        default=0.1,
        help="at least this long between two commands' starts (the /ws "
        "rate limit is 20 messages/s)",
    )
    parser.add_argument("--packages", type=int, default=800)
    parser.add_argument("--inventory-kb", type=float, default=200.0)
    parser.add_argument(
        "--reconnect", type=float, default=5.0, help="the agent's reconnect interval, seconds"
    )
    parser.add_argument(
        "--ws-ping",
        type=float,
        default=20.0,
        help="client keepalive ping interval and timeout (0: none)",
    )
    parser.add_argument("--no-deflate", action="store_true", help="do not offer permessage-deflate")
    parser.add_argument("--storm-timeout", type=float, default=600.0)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy the server (raw collapsed stacks, per thread) over the "
        "storm and the steady state, into this directory",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    raise_fd_limit()

    workdir = Path(tempfile.mkdtemp(prefix="bench-smagents-"))
    pg_name = None
    proc: subprocess.Popen[bytes] | None = None
    workers: list[Any] = []
    log = workdir / "server.log"
    try:
        if args.database == "postgres":
            import psycopg

            pg_name = f"bench_smagents_{secrets.token_hex(4)}"
            with psycopg.connect(args.pg_admin_url, autocommit=True, connect_timeout=5) as c:
                c.execute(f'CREATE DATABASE "{pg_name}"')
            database_url = with_database(args.pg_admin_url, pg_name)
        else:
            database_url = f"sqlite:///{workdir / 'sysmanage.sqlite3'}"
        env = server_env(workdir, database_url, args.agents)
        manage(env, "migrate", "-v0")
        access = json.loads(manage(env, "shell", "-c", SETUP).strip().splitlines()[-1])["access"]
        key = json.loads(
            manage(env, "create_registration_key", "bench storm").strip().splitlines()[-1]
        )["key"]
        port = free_port()
        proc = start_server(env, port, log)

        ctx = mp.get_context("fork")
        shared = Shared(
            counters=ctx.Array("q", COUNTERS),
            phase=ctx.Value("i", STORM),
            start=ctx.Event(),
            t0=ctx.Value("d", 0.0),
        )
        results = ctx.Queue()
        opts = {
            "port": port,
            "key": key,
            "agents": args.agents,
            "ramp": args.ramp,
            "heartbeat": args.heartbeat,
            "metrics_interval": args.metrics_interval,
            "packages": args.packages,
            "inventory_kb": args.inventory_kb,
            "reconnect": args.reconnect,
            "ws_ping": args.ws_ping,
            "no_deflate": args.no_deflate,
        }
        for w in range(args.workers):
            indices = list(range(w, args.agents, args.workers))
            worker = ctx.Process(
                target=worker_main, args=(indices, opts, shared, results), daemon=True
            )
            worker.start()
            workers.append(worker)
        sampler = Sampler(psutil.Process(proc.pid), [psutil.Process(w.pid) for w in workers])
        time.sleep(1.0)  # the workers build their inventory
        print(
            f"sysmanage agents benchmark: {args.agents} agents, {args.database}, "
            f"server pid {proc.pid}, client pids {[w.pid for w in workers]}",
            flush=True,
        )
        out = asyncio.run(coordinate(args, port, access, shared, sampler, workers))
        collected = [results.get(timeout=120) for _ in workers]
        for worker in workers:
            worker.join(30)
        out["inventory_bytes"] = len(software_tail(args.packages, args.inventory_kb)) + 150
        out["log_summary"] = log_summary(log)
    except BaseException:
        if log.exists():
            print(
                "server log (last lines):\n"
                + "\n".join(log.read_text(errors="replace").splitlines()[-40:]),
                file=sys.stderr,
            )
        raise
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(5)
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if pg_name is not None:
            import psycopg

            with psycopg.connect(args.pg_admin_url, autocommit=True, connect_timeout=5) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    rows, ok = summarize(args, out, collected)
    width = max(len(k) for k, _ in rows)
    print(
        f"\nSysManage agents benchmark ({args.database}, in-memory layer, one Daphne "
        f"process, {os.cpu_count()} cores; CPU in % of one core)"
    )
    print(f"| {'figure':{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k:{width}} | {v} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "out": out, "rows": rows},
                indent=1,
                default=str,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
