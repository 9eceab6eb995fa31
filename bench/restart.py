"""
Restart benchmark: one of two server processes behind nginx gets SIGTERM while N ``/ws``
clients and M agents are connected through nginx and every agent runs a command.

One command runs everything and stops by itself::

    .venv/bin/python bench/restart.py --clients 2000 --agents 200

Two server processes (``tests/integration/harness.py``) on a fresh PostgreSQL database
and a Redis prefix of their own, Debian's nginx with ``deploy/nginx/`` in front
(``tests/integration/nginx.py``).  The clients subscribe to ``host_status`` through
nginx; after a close they reconnect at once (uniform 0-200 ms, as the browser client
after 1012) and resume with ``since``.  The agents speak the agent protocol
(``/ws/agent``) through nginx: ``hello``, then for each ``run_command`` a
``command_started`` and, after the delay the command names, a ``command_result`` kept
until acknowledged and sent again after reconnecting, as ``python -m agent`` does.  A
requester connected straight to the process that stays sends each agent a command
taking 1 to ``--window + 5`` seconds, waits until every agent started its command,
and the other process gets SIGTERM.

Measured from the SIGTERM: how the process exits, each close (code, when), how long each
client takes to subscribe again, handshakes refused (HTTP status), closes per second,
and whether every command ended ``completed`` with its output.  Needs PostgreSQL at
127.0.0.1:5432 (trust), Redis at 127.0.0.1:6379 and nginx.  See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import MachineWindow, Target, print_targets, raise_fd_limit
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration import harness  # noqa: E402  # needs the repository on sys.path
from tests.integration.client import obtain_tokens  # noqa: E402
from tests.integration.nginx import Nginx, find_nginx  # noqa: E402

POSTGRES = "postgres://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"

#: Enrolls the benchmark's hosts; prints their ids and tokens.
HOSTS_SCRIPT = """
import json
from hosts.services import host_register
found = []
for n in range({count}):
    host, token = host_register(hostname=f"restart-{{n:03d}}")
    found.append([str(host.id), token])
print("HOSTS " + json.dumps(found))
"""


@dataclass
class Client:
    """A ``/ws`` client through nginx, subscribed to ``host_status``."""

    url: str
    token: str
    closes: list[tuple[float, int | None]] = field(default_factory=list)
    subscribed: list[float] = field(default_factory=list)
    recovered: list[bool] = field(default_factory=list)
    #: (when, why) of each handshake refused or failed
    refused: list[tuple[float, str]] = field(default_factory=list)
    position: dict[str, Any] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            ws: ClientConnection | None = None
            try:
                async with connect(
                    self.url,
                    additional_headers={"Authorization": f"Bearer {self.token}"},
                    open_timeout=30,
                    max_queue=None,
                ) as ws:
                    await self.follow(ws)
            except InvalidStatus as exc:
                self.refused.append((time.monotonic(), f"HTTP {exc.response.status_code}"))
            except (ConnectionClosed, TimeoutError):
                pass
            except (InvalidHandshake, OSError) as exc:
                self.refused.append((time.monotonic(), type(exc).__name__))
            if ws is not None:
                self.closes.append((time.monotonic(), ws.close_code))
            await asyncio.sleep(random.uniform(0, 0.2))

    async def follow(self, ws: ClientConnection) -> None:
        message: dict[str, Any] = {"type": "subscribe", "channel": "host_status", "id": "s"}
        if self.position is not None:
            message["since"] = self.position
        await ws.send(json.dumps(message))
        async for raw in ws:
            data = json.loads(raw)
            if data.get("id") == "s" and data["type"] == "response":
                self.position = data["data"].get("position", self.position)
                if "recovered" in data["data"]:
                    self.recovered.append(data["data"]["recovered"])
                self.subscribed.append(time.monotonic())
            elif data["type"] == "event":
                self.position = {"epoch": data["epoch"], "offset": data["offset"]}


@dataclass
class Agent:
    """One host's agent through nginx: runs each command for the seconds it names."""

    url: str
    token: str
    hostname: str
    welcomed: asyncio.Event = field(default_factory=asyncio.Event)
    started: set[str] = field(default_factory=set)
    unacked: dict[str, dict[str, Any]] = field(default_factory=dict)
    closes: list[tuple[float, int | None]] = field(default_factory=list)
    refused: list[tuple[float, str]] = field(default_factory=list)
    link: ClientConnection | None = None
    jobs: set[asyncio.Task[None]] = field(default_factory=set)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with connect(
                    self.url,
                    additional_headers={"Authorization": f"Bearer {self.token}"},
                    open_timeout=30,
                ) as ws:
                    self.link = ws
                    await self.session(ws)
            except InvalidStatus as exc:
                self.refused.append((time.monotonic(), f"HTTP {exc.response.status_code}"))
            except (ConnectionClosed, TimeoutError):
                pass
            except (InvalidHandshake, OSError) as exc:
                self.refused.append((time.monotonic(), type(exc).__name__))
            if self.link is not None:
                self.closes.append((time.monotonic(), self.link.close_code))
            self.link = None
            self.welcomed.clear()
            await asyncio.sleep(random.uniform(0, 1.0))

    async def session(self, ws: ClientConnection) -> None:
        facts = {"hostname": self.hostname, "capabilities": ["commands"], "cpu_count": 2}
        await ws.send(json.dumps({"type": "hello", "data": facts, "id": "h"}))
        async for raw in ws:
            message = json.loads(raw)
            kind = message.get("type")
            if kind == "welcome":
                self.welcomed.set()
                for result in list(self.unacked.values()):
                    await ws.send(json.dumps(result))
            elif kind == "run_command":
                ref = message["data"]["execution_id"]
                if ref not in self.started:
                    self.started.add(ref)
                    await ws.send(
                        json.dumps({"type": "command_started", "data": {"execution_id": ref}})
                    )
                    job = asyncio.create_task(self.execute(ref, message["data"]["command"]))
                    self.jobs.add(job)
                    job.add_done_callback(self.jobs.discard)
            elif kind == "ack":
                self.unacked.pop(message["data"]["ref"], None)

    async def execute(self, ref: str, command: str) -> None:
        seconds = float(command.split()[-1])
        await asyncio.sleep(seconds)
        result = {
            "type": "command_result",
            "data": {
                "execution_id": ref,
                "status": "completed",
                "exit_code": 0,
                "stdout": f"{self.hostname} after {seconds:.1f}s\n",
                "stderr": "",
                "execution_time": seconds,
            },
        }
        self.unacked[ref] = result
        link = self.link
        if link is not None:
            with contextlib.suppress(ConnectionClosed):
                await link.send(json.dumps(result))


async def gather_batched(coros: list[Any], width: int) -> None:
    """Run ``coros`` with at most ``width`` at once."""
    gate = asyncio.Semaphore(width)

    async def one(coro: Any) -> None:
        async with gate:
            await coro

    await asyncio.gather(*(one(c) for c in coros))


async def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:.0f}s")
        await asyncio.sleep(0.1)


async def run(args: argparse.Namespace) -> bool:
    raise_fd_limit()
    binary = find_nginx()
    if binary is None:
        raise SystemExit("nginx is not installed (apt-get install nginx)")
    work = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    database = harness.create_postgres_database(POSTGRES)
    prefix = f"sysmanage-bench-restart-{secrets.token_hex(4)}"
    servers: list[harness.DaphneServer] = []
    nginx: Nginx | None = None
    try:
        common = {
            **harness.COMMON_SETTINGS,
            "DATABASE_URL": harness.with_database(POSTGRES, database),
            "DJANGO_SECRET_KEY": harness.new_secret(),
            "SYSMANAGE_VAR_DIR": str(work / "var"),
            "DRAIN_SECONDS": str(args.window),
        }
        seed = harness.seed_database(harness.server_env(**common))
        shell = harness.manage_shell(
            harness.server_env(**common), HOSTS_SCRIPT.format(count=args.agents), timeout=300
        )
        hosts = json.loads(next(x for x in shell.splitlines() if x.startswith("HOSTS "))[6:])
        env = harness.server_env(
            **common,
            REDIS_URL=REDIS,
            SYSMANAGE_REDIS_PREFIX=prefix,
            WS_MAX_SOCKETS_PER_USER=str(args.clients * 2 + 10),
            WS_RATE_LIMIT_PER_SECOND="1000",
            WS_RATE_LIMIT_BURST="1000",
        )
        servers = harness.start_servers([("a", env), ("b", env)], work)
        # two connections per socket, and room for the storm of first connections
        sockets = args.clients + args.agents + 100
        nginx = Nginx(binary, work / "nginx", [s.port for s in servers], 4 * sockets).start()
        token = obtain_tokens(nginx.base_url, "admin", seed["password"])["access"]
        leaving, staying = servers
        stop = asyncio.Event()
        clients = [Client(nginx.ws_url, token) for _ in range(args.clients)]
        agents = [
            Agent(f"{nginx.base_url.replace('http', 'ws')}/ws/agent", t, f"restart-{n:03d}")
            for n, (_, t) in enumerate(hosts)
        ]
        tasks = [asyncio.create_task(a.run(stop)) for a in agents]
        tasks += [asyncio.create_task(c.run(stop)) for c in clients]
        began_connecting = time.monotonic()
        await wait_until(lambda: all(c.subscribed for c in clients), 300, "every subscription")
        await wait_until(lambda: all(a.welcomed.is_set() for a in agents), 120, "every hello")
        connected_in = time.monotonic() - began_connecting
        print(f"{args.clients} clients and {args.agents} agents connected in {connected_in:.1f}s")
        async with connect(
            staying.ws_url, additional_headers={"Authorization": f"Bearer {token}"}
        ) as requester:
            delays = {
                host_id: round(random.uniform(1.0, args.window + 5.0), 1) for host_id, _ in hosts
            }
            for n, (host_id, seconds) in enumerate(delays.items()):
                command = {"host_id": host_id, "command": f"bench {seconds}", "timeout": 120}
                await requester.send(
                    json.dumps(
                        {
                            "type": "command",
                            "channel": "command_execution",
                            "id": f"c{n}",
                            "data": command,
                        }
                    )
                )
            await wait_until(lambda: all(a.started for a in agents), 60, "every command start")
            window = MachineWindow(
                own=[s.process.pid for s in servers if s.process] + [nginx_pid(nginx)]
            )
            sigterm = time.monotonic()
            assert leaving.process is not None
            leaving.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(leaving.process.wait, args.window + 30)
            exited = time.monotonic() - sigterm
            replies: dict[str, dict[str, Any]] = {}
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.window + 60):
                    while len(replies) < len(delays):
                        reply = json.loads(await requester.recv())
                        if str(reply.get("id", "")).startswith("c"):
                            replies[reply["id"]] = reply
        await asyncio.sleep(2)
        report = window.report()
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return summarize(args, clients, agents, replies, sigterm, exited, code, report)
    finally:
        if nginx is not None:
            nginx.stop()
        for server in servers:
            server.stop()
        harness.drop_postgres_database(POSTGRES, database)
        harness.delete_redis_keys(REDIS, prefix)


def nginx_pid(nginx: Nginx) -> int:
    return nginx.process.pid if nginx.process is not None else 0


def summarize(
    args: argparse.Namespace,
    clients: list[Client],
    agents: list[Agent],
    replies: dict[str, dict[str, Any]],
    sigterm: float,
    exited: float,
    code: int,
    report: str,
) -> bool:
    closed = moved = 0
    back: list[float] = []
    codes = collections.Counter[int | None]()
    per_second = collections.Counter[int]()
    last_back = 0.0
    for client in clients:
        for closed_at, close_code in client.closes:
            if closed_at < sigterm:
                continue
            closed += 1
            codes[close_code] += 1
            per_second[int(closed_at - sigterm)] += 1
            later = [t for t in client.subscribed if t > closed_at]
            if later:
                moved += 1
                back.append(min(later) - closed_at)
                last_back = max(last_back, min(later) - sigterm)
    # only after the SIGTERM: the first connection storm is not the subject
    attempts = [r for c in clients for r in c.refused] + [r for a in agents for r in a.refused]
    refused = [why for t, why in attempts if t >= sigterm]
    before = sum(1 for t, _ in attempts if t < sigterm)
    completed = sum(
        1
        for r in replies.values()
        if r["type"] == "response" and r["data"].get("status") == "completed"
    )
    agent_codes = collections.Counter(code for a in agents for t, code in a.closes if t >= sigterm)
    back.sort()
    p99 = back[int(0.99 * (len(back) - 1))] if back else 0.0
    print(report)
    print(
        f"SIGTERM: exit {code} after {exited:.1f}s (window {args.window:g}s); "
        f"clients closed {dict(codes)}, {moved} back on the other process, "
        f"reconnect p50 {back[len(back) // 2] if back else 0:.3f}s p99 {p99:.3f}s "
        f"max {back[-1] if back else 0:.3f}s; last back {last_back:.2f}s after SIGTERM"
    )
    print(f"client closes per second after SIGTERM: {dict(sorted(per_second.items()))}")
    print(
        f"agents closed {dict(agent_codes)}; handshakes refused or failed after SIGTERM: "
        f"{dict(collections.Counter(refused))} (while first connecting: {before})"
    )
    print(f"commands completed {completed} of {len(agents)} (replies {len(replies)})")
    resumed = [r for c in clients for r in c.recovered]
    print(f"resumed subscriptions {len(resumed)}, recovered {sum(resumed)}")
    peak = max(per_second.values()) if per_second else 0
    return print_targets(
        [
            Target("exit code after the drain", code, 0),
            Target("clients refused (5xx/403) or failed on reconnect", len(refused), 0),
            Target("clients closed and not back", closed - moved, 0),
            Target("clients closed other than with 1012", closed - codes[1012], 0),
            Target("last client back after SIGTERM", round(last_back, 2), args.window, "s"),
            # spread evenly, a second holds closed / window; allow twice that
            Target("closes in the busiest second", peak, 2 * closed / max(args.window, 1)),
            Target("command results lost", len(agents) - completed, 0),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--window", type=float, default=10.0, help="DRAIN_SECONDS")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return 0 if asyncio.run(run(parse_args(argv))) else 1


if __name__ == "__main__":
    sys.exit(main())
