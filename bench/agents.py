"""
Agent ingest benchmark: many simulated agents against one real server process.

::

    .venv/bin/python bench/agents.py --agents 1000 --interval 1 --duration 30 --commands 200

Starts a fresh server (SQLite, in-memory layer; ``--redis-url`` for channels-redis),
enrolls ``--agents`` hosts, and connects one simulated agent per host speaking the agent
protocol (``docs/agent-protocol.md``): ``hello``, then ``metrics`` every ``--interval``
seconds (staggered) and a heartbeat now and then.  A staff client watches ten hosts'
``host_metrics`` to check that reports really flow through, and sends ``--commands``
shell commands one after another to random agents, which answer at once, to time the
whole round trip (client → server → agent → server → client).

Prints: agents connected and connect time, metrics sent per second, the fraction of
watched reports delivered, server CPU (percent of one core) and RSS (total and per agent),
and command round-trip p50/p99.  Targets only loopback; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import websockets
from _common import free_port, raise_fd_limit  # bench/ is on sys.path when run

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

ENROLL = """
import json
from django.contrib.auth import get_user_model
from sysmanage.credentials import access_token_for
from hosts.services import host_register
user = get_user_model().objects.create_superuser("bench", "bench@example.invalid", "x" * 20)
tokens = [host_register(hostname=f"agent-{{i:05d}}")[1] for i in range({count})]
print(json.dumps({{"tokens": tokens, "access": access_token_for(user)}}))
"""


def server_env(workdir: Path, redis_url: str | None) -> dict[str, str]:
    """Environment of the server and of the enrolment script."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "SYSMANAGE_", "DATABASE_URL", "REDIS_URL"))
    }
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "sysmanage.settings",
            "SYSMANAGE_VAR_DIR": str(workdir),
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(40),
            "HOST_OFFLINE_AFTER_SECONDS": "3600",
            "JWT_ACCESS_TTL_SECONDS": "3600",
            "LOG_LEVEL": "WARNING",
        }
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
        env["SYSMANAGE_REDIS_PREFIX"] = f"bench-agents-{secrets.token_hex(4)}"
    return env


def prepare(env: dict[str, str], agents: int) -> dict[str, Any]:
    """Migrate a fresh database and enroll the hosts; return tokens."""
    subprocess.run(
        [PYTHON, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True, timeout=300
    )
    out = subprocess.run(
        [PYTHON, "manage.py", "shell", "-c", ENROLL.format(count=agents)],
        cwd=REPO,
        env=env,
        check=True,
        timeout=900,
        capture_output=True,
        text=True,
    ).stdout
    tokens = json.loads(out.strip().splitlines()[-1])
    if not isinstance(tokens, dict):
        raise RuntimeError(f"enrolment printed no JSON object: {out[-300:]!r}")
    return tokens


def start_server(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """Start Daphne and wait until it answers."""
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
            "sysmanage.asgi:application",
        ],
        cwd=REPO,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()[-2000:]}")


def sample_metrics(rng: random.Random) -> dict[str, Any]:
    """A plausible metrics report, under every default alert threshold."""
    return {
        "cpu_usage": round(rng.uniform(1, 60), 1),
        "memory_usage": round(rng.uniform(20, 80), 1),
        "disk_usage": {"/": round(rng.uniform(20, 70), 1), "/var": round(rng.uniform(20, 70), 1)},
        "load_average": [round(rng.uniform(0, 1.5), 2) for _ in range(3)],
    }


@dataclass
class Tally:
    """Counts shared by the simulated agents."""

    connected: int = 0
    sent: int = 0
    errors: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def run_agent(url: str, token: str, index: int, interval: float, tally: Tally) -> None:
    """One simulated agent: hello, metrics every interval, instant command results."""
    rng = random.Random(index)
    headers = {"Authorization": f"Bearer {token}"}
    async with websockets.connect(
        url, additional_headers=headers, max_size=2**20, open_timeout=60, ping_interval=None
    ) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "hello",
                    "data": {
                        "hostname": f"agent-{index:05d}",
                        "cpu_count": 4,
                        "ip_addresses": [],
                        "os_name": "Debian GNU/Linux",
                        "os_version": "12",
                        "agent_version": "bench",
                    },
                }
            )
        )
        welcome = json.loads(await ws.recv())
        if welcome.get("type") != "welcome":
            tally.errors += 1
            return
        tally.connected += 1
        await asyncio.gather(_report(ws, rng, interval, tally), _answer(ws, tally))


async def _report(ws: Any, rng: random.Random, interval: float, tally: Tally) -> None:
    await asyncio.sleep(rng.uniform(0, interval))
    beats = 0
    while not tally.stop.is_set():
        await ws.send(json.dumps({"type": "metrics", "data": {"metrics": sample_metrics(rng)}}))
        tally.sent += 1
        beats += 1
        if beats % 30 == 0:
            await ws.send(json.dumps({"type": "heartbeat", "data": {}}))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.stop.wait(), interval)
    await ws.close()


async def _answer(ws: Any, tally: Tally) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        async for raw in ws:
            message = json.loads(raw)
            if message.get("type") == "run_command":
                await ws.send(
                    json.dumps(
                        {
                            "type": "command_result",
                            "data": {
                                "execution_id": message["data"]["execution_id"],
                                "status": "completed",
                                "exit_code": 0,
                                "stdout": "ok\n",
                                "stderr": "",
                                "execution_time": 0.0,
                            },
                        }
                    )
                )
            elif message.get("type") == "error":
                tally.errors += 1


async def watch(url: str, access: str, host_ids: list[str], seconds: float) -> int:
    """Count ``host_metrics`` events for ``host_ids`` (one socket each) during ``seconds``."""
    counts = await asyncio.gather(*(watch_one(url, access, h, seconds) for h in host_ids))
    return sum(counts)


async def watch_one(url: str, access: str, host_id: str, seconds: float) -> int:
    """Count one host's ``host_metrics`` events during ``seconds``."""
    headers = {"Authorization": f"Bearer {access}"}
    async with websockets.connect(url, additional_headers=headers, max_size=2**22) as ws:
        await ws.send(
            json.dumps(
                {"type": "subscribe", "channel": "host_metrics", "filters": {"host_id": host_id}}
            )
        )
        count, deadline = 0, time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                message = json.loads(await asyncio.wait_for(ws.recv(), left))
                count += message.get("type") == "event"
        return count


async def settle(url: str, access: str, limit: float = 120) -> None:
    """Wait until a new client socket is accepted promptly again.

    Right after a connect storm the server's database thread is still working through
    the agents' first messages (hello, first alert-rule checks); handshakes that need it
    wait behind them.  The steady state is measured after that.
    """
    headers = {"Authorization": f"Bearer {access}"}
    deadline = time.monotonic() + limit
    while True:
        try:
            async with websockets.connect(url, additional_headers=headers, open_timeout=3) as ws:
                await ws.send(json.dumps({"type": "ping", "id": "settle"}))
                await asyncio.wait_for(ws.recv(), 3)
                return
        except (OSError, TimeoutError, websockets.WebSocketException):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1)


async def time_commands(url: str, access: str, host_ids: list[str], count: int) -> list[float]:
    """Round-trip times (ms) of ``count`` commands sent one after another."""
    headers = {"Authorization": f"Bearer {access}"}
    times = []
    async with websockets.connect(url, additional_headers=headers, max_size=2**22) as ws:
        for i in range(count):
            host_id = random.choice(host_ids)
            started = time.perf_counter()
            await ws.send(
                json.dumps(
                    {
                        "type": "command",
                        "channel": "command_execution",
                        "id": f"c{i}",
                        "data": {"host_id": host_id, "command": "true", "timeout": 10},
                    }
                )
            )
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if message.get("id") == f"c{i}":
                    break
            if message["type"] == "response" and message["data"]["status"] == "completed":
                times.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.02)
    return times


def host_ids(env: dict[str, str], limit: int) -> list[str]:
    """Ids of the enrolled hosts (first ``limit``)."""
    code = (
        "import json; from hosts.models import Host; "
        f"print(json.dumps([str(h) for h in Host.objects.order_by('hostname')"
        f".values_list('id', flat=True)[:{limit}]]))"
    )
    out = subprocess.run(
        [PYTHON, "manage.py", "shell", "-c", code],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return list(json.loads(out.strip().splitlines()[-1]))


async def drive(
    args: argparse.Namespace,
    base: str,
    data: dict[str, Any],
    ids: list[str],
    server: psutil.Process,
) -> dict[str, Any]:
    """Connect the agents, measure the steady state, time commands."""
    agent_url, client_url = f"ws://{base}/ws/agent", f"ws://{base}/ws"
    tally = Tally()
    rss_before = server.memory_info().rss
    started = time.monotonic()
    tasks = []
    for index, token in enumerate(data["tokens"]):
        tasks.append(
            asyncio.ensure_future(run_agent(agent_url, token, index, args.interval, tally))
        )
        if index % 50 == 49:
            await asyncio.sleep(0.05)  # a connect ramp, as a fleet restarting would be
    while tally.connected + tally.errors < len(tasks) and time.monotonic() - started < 300:
        await asyncio.sleep(0.2)
    connect_seconds = time.monotonic() - started
    settle_started = time.monotonic()
    await settle(client_url, data["access"])
    settle_seconds = time.monotonic() - settle_started
    await asyncio.sleep(args.interval * 2)
    cpu0, sent0, t0 = server.cpu_times(), tally.sent, time.monotonic()
    watched = await watch(client_url, data["access"], ids[:10], args.duration)
    cpu1, sent1, t1 = server.cpu_times(), tally.sent, time.monotonic()
    rss_after = server.memory_info().rss
    rtts = await time_commands(client_url, data["access"], ids, args.commands)
    tally.stop.set()
    await asyncio.wait(tasks, timeout=30)
    busy = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    return {
        "agents": len(tasks),
        "connected": tally.connected,
        "errors": tally.errors,
        "connect_s": round(connect_seconds, 1),
        "settle_s": round(settle_seconds, 1),
        "metrics_per_s": round((sent1 - sent0) / (t1 - t0)),
        "watched_delivery": round(watched / max(1, 10 * (t1 - t0) / args.interval), 3),
        "server_cpu_pct": round(100 * busy / (t1 - t0), 1),
        "rss_mb": round(rss_after / 2**20, 1),
        "rss_per_agent_kb": round((rss_after - rss_before) / max(1, tally.connected) / 1024, 1),
        "commands": len(rtts),
        "rtt_p50_ms": round(statistics.median(rtts), 1) if rtts else None,
        "rtt_p99_ms": round(sorted(rtts)[int(0.99 * (len(rtts) - 1))], 1) if rtts else None,
    }


def main() -> int:
    """Run the benchmark once and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--commands", type=int, default=200)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="bench-agents-"))
    env = server_env(workdir, args.redis_url)
    proc = None
    try:
        data = prepare(env, args.agents)
        ids = host_ids(env, args.agents)
        port = free_port()
        proc = start_server(env, port, workdir / "server.log")
        result = asyncio.run(drive(args, f"127.0.0.1:{port}", data, ids, psutil.Process(proc.pid)))
    except BaseException:
        log = workdir / "server.log"
        if log.exists():
            print(
                "server log (last lines):\n"
                + "\n".join(log.read_text(errors="replace").splitlines()[-40:]),
                file=sys.stderr,
            )
        raise
    finally:
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    layer = "redis" if args.redis_url else "in-memory"
    print(
        f"agents benchmark ({layer} layer, interval {args.interval}s, "
        f"{args.duration:.0f}s steady state, {os.cpu_count()} cores)"
    )
    for key, value in result.items():
        print(f"  {key:18} {value}")
    return 0 if result["connected"] == result["agents"] and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
