"""``manage.py seed_demo``: a demo fleet of simulated hosts streaming live metrics."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import websockets
from django.core.management.base import BaseCommand, CommandError, CommandParser

from hosts import services
from hosts.metrics import Metrics
from sysmanage.audit import Actor

ROLES = [
    ("web", "Debian GNU/Linux", "12"),
    ("db", "Ubuntu", "24.04"),
    ("cache", "Debian GNU/Linux", "12"),
    ("worker", "Rocky Linux", "9.4"),
]


@dataclass
class DemoHost:
    """One simulated machine: its token and a random walk of its figures."""

    hostname: str
    token: str
    os_name: str
    os_version: str
    cpu_count: int
    rng: random.Random
    figures: dict[str, float] = field(default_factory=dict)

    def facts(self) -> dict[str, object]:
        """What its ``hello`` reports."""
        index = int(self.hostname.rsplit("-", 1)[-1])
        return {
            "hostname": self.hostname,
            "fqdn": f"{self.hostname}.demo.invalid",
            "ip_addresses": [f"192.0.2.{index}"],
            "os_name": self.os_name,
            "os_version": self.os_version,
            "kernel": "6.1.0-demo",
            "architecture": "x86_64",
            "cpu_count": self.cpu_count,
            "memory_total": self.cpu_count * 4 * 2**30,
            "agent_version": "demo",
            "capabilities": [],
        }

    def metrics(self) -> Metrics:
        """The next sample of the random walk (the first host fills its /var slowly)."""

        def walk(name: str, start: float, low: float, high: float, step: float) -> float:
            value = self.figures.get(name, start) + self.rng.uniform(-step, step)
            self.figures[name] = min(high, max(low, value))
            return round(self.figures[name], 1)

        var_start, var_high = (85.5, 97.0) if self.hostname.endswith("-01") else (40.0, 70.0)
        cpu = walk("cpu", 20, 1, 99, 12)
        return {
            "cpu_usage": cpu,
            "memory_usage": walk("mem", 55, 20, 95, 3),
            "disk_usage": {
                "/": walk("root", 45, 30, 70, 0.5),
                "/var": walk("var", var_start, 30, var_high, 1.5),
            },
            "load_average": [
                round(cpu / 100 * self.cpu_count * 1.2, 2),
                round(cpu / 120 * self.cpu_count, 2),
                round(cpu / 140 * self.cpu_count, 2),
            ],
        }


class TokenRefused(Exception):
    """The server refused a demo host's token: it does not know the host."""


class Outage:
    """Says once, not per host and attempt, that the server cannot be reached, and
    again when it can."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.down = False

    def failed(self, url: str, exc: BaseException) -> None:
        """A connection attempt failed."""
        if not self.down:
            self.down = True
            self.say(f"cannot reach {url} ({exc or type(exc).__name__}); retrying every 2 s")

    def connected(self) -> None:
        """A connection succeeded."""
        if self.down:
            self.down = False
            self.say("connected again")


async def run_host(
    host: DemoHost, url: str, interval: float, stop: asyncio.Event, outage: Outage
) -> None:
    """Keep one simulated agent connected, reporting until ``stop`` is set."""
    while not stop.is_set():
        try:
            async with websockets.connect(
                url, additional_headers={"Authorization": f"Bearer {host.token}"}
            ) as ws:
                outage.connected()
                await ws.send(json.dumps({"type": "hello", "data": host.facts()}))
                await asyncio.gather(_report(ws, host, interval, stop), _answer(ws, stop))
        except websockets.ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == 4001:
                raise TokenRefused(host.hostname) from exc
            outage.failed(url, exc)
            await asyncio.sleep(2)
        except websockets.InvalidStatus as exc:
            if exc.response.status_code in (401, 403):
                raise TokenRefused(host.hostname) from exc
            outage.failed(url, exc)
            await asyncio.sleep(2)
        except (OSError, websockets.WebSocketException) as exc:
            outage.failed(url, exc)
            await asyncio.sleep(2)


async def _report(ws: Any, host: DemoHost, interval: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await ws.send(json.dumps({"type": "metrics", "data": {"metrics": host.metrics()}}))
        try:
            await asyncio.wait_for(stop.wait(), interval * host.rng.uniform(0.8, 1.2))
        except TimeoutError:
            continue
    await ws.close()


async def _answer(ws: Any, stop: asyncio.Event) -> None:
    """Demo hosts run nothing: they say so for every command and package operation."""
    async for raw in ws:
        message = json.loads(raw)
        data = message.get("data", {})
        if message.get("type") == "run_command":
            await ws.send(
                json.dumps(
                    {
                        "type": "command_result",
                        "data": {
                            "execution_id": data["execution_id"],
                            "status": "failed",
                            "exit_code": None,
                            "stdout": "",
                            "stderr": "",
                            "execution_time": 0.0,
                            "error": "This is a simulated demo host; it does not run commands.",
                        },
                    }
                )
            )
        elif message.get("type") == "package_operation":
            await ws.send(
                json.dumps(
                    {
                        "type": "package_result",
                        "data": {
                            "operation_id": data["operation_id"],
                            "status": "failed",
                            "exit_code": None,
                            "output": "",
                            "message": "This is a simulated demo host; nothing was installed.",
                        },
                    }
                )
            )
        if stop.is_set():
            return


def _check_server(server: str) -> None:
    """Refuse to start when nothing answers at ``server``: the demo would stream nowhere."""
    try:
        with urllib.request.urlopen(f"{server}/healthz", timeout=5):  # noqa: S310  # http(s) only
            pass
    except urllib.error.HTTPError:
        return  # something answers; the agents' endpoint will tell the rest
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CommandError(
            f"--server: nothing answers at {server} ({reason}); start the server first "
            "(scripts/serve) or pass its URL with --server"
        ) from None


class Command(BaseCommand):
    """Enroll demo hosts and run a simulated agent for each until stopped."""

    help = (
        "Enroll a demo fleet (demo-web-01, ...) and stream live metrics from simulated "
        "agents connected to a running server, so the dashboards have something to show. "
        "Runs until interrupted (or --duration seconds). Demo hosts refuse to run commands."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Options: server URL, fleet size, report interval, duration."""
        parser.add_argument(
            "--server", default="http://127.0.0.1:8000", help="the running server's base URL"
        )
        parser.add_argument("--hosts", type=int, default=6, help="how many demo hosts (1-200)")
        parser.add_argument(
            "--interval", type=float, default=2.0, help="seconds between metrics reports"
        )
        parser.add_argument(
            "--duration",
            type=float,
            default=0,
            help="stop after this many seconds (0: run until interrupted)",
        )
        parser.add_argument("--seed", type=int, default=None, help="random seed")

    def handle(self, *args: Any, **options: Any) -> None:
        """Enroll, then run the simulated agents."""
        if not 1 <= options["hosts"] <= 200:
            raise CommandError("--hosts must be between 1 and 200")
        if options["interval"] <= 0 or options["duration"] < 0:
            raise CommandError("--interval must be positive and --duration not negative")
        server = options["server"].rstrip("/")
        if not server.startswith(("http://", "https://")):
            raise CommandError("--server must be an http:// or https:// URL")
        url = "ws" + server[len("http") :] + "/ws/agent"
        _check_server(server)
        rng = random.Random(options["seed"])
        fleet = [self._enroll(i, rng) for i in range(1, options["hosts"] + 1)]
        self.stdout.write(
            f"Streaming metrics from {len(fleet)} demo hosts to {url} (Ctrl-C to stop)"
        )
        try:
            asyncio.run(self._run(fleet, url, options["interval"], options["duration"]))
        except TokenRefused as exc:
            raise CommandError(
                f"the server at {server} refused the token of {exc}: it is not using the "
                "database this command enrolled the demo hosts in (run both with the same "
                "DATABASE_URL and SYSMANAGE_VAR_DIR)"
            ) from None

    def _enroll(self, index: int, rng: random.Random) -> DemoHost:
        role, os_name, os_version = ROLES[(index - 1) % len(ROLES)]
        hostname = f"demo-{role}-{index:02d}"
        _, token = services.host_register(hostname=hostname, actor=Actor.command_line("seed_demo"))
        return DemoHost(
            hostname, token, os_name, os_version, rng.choice([2, 4, 8]), random.Random(rng.random())
        )

    async def _run(self, fleet: list[DemoHost], url: str, interval: float, duration: float) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if duration:
            loop.call_later(duration, stop.set)
        outage = Outage(lambda line: self.stderr.write(line))
        await asyncio.gather(*(run_host(h, url, interval, stop, outage) for h in fleet))
