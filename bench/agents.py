"""
Agent ingest benchmark: many simulated agents against one real server process.

::

    .venv/bin/python bench/agents.py --agents 1000 --interval 1 --duration 30 --commands 200
    .venv/bin/python bench/agents.py --commands 0 --repeat 3 --reference-ref main

Starts a fresh server (SQLite, in-memory layer; ``--redis-url`` for channels-redis),
enrolls ``--agents`` hosts, and connects one simulated agent per host speaking the agent
protocol (``docs/agent-protocol.md``): ``hello``, then ``metrics`` every ``--interval``
seconds (staggered) and a heartbeat now and then.  A staff client watches ten hosts'
``host_metrics`` to check that reports really flow through, and sends ``--commands``
shell commands one after another to random agents, which answer at once, to time the
whole round trip (client → server → agent → server → client).

``--reference-ref REV`` measures REV's server too, from a temporary git worktree of it
(its own database, enrolled by its own code), in the same session: ``--repeat`` runs of
each, alternating (ABBA), every run on a freshly started server.  ``--profile DIR``
records py-spy samples of the server over each window and summarises them.

Prints per run: agents connected, metrics sent per second, server CPU (percent of one
core) and **server CPU per metrics message** against the target, the CPU of this load
generator and of every other process over the same window, the machine's load average,
the fraction of watched reports delivered, RSS per agent and the command round trip;
then the min and median per server.  Targets only loopback; stops by itself.
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
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import websockets
from _common import (  # bench/ is on sys.path
    MachineWindow,
    Target,
    free_port,
    print_targets,
    raise_fd_limit,
    reference_worktree,
)
from _profile import start_py_spy, summarise

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PYTHON = sys.executable
#: The target of server CPU per agent metrics message (docs/benchmarks.md), microseconds.
TARGET_US = 150.0

ENROLL = """
import json
from django.contrib.auth import get_user_model
from sysmanage.credentials import access_token_for
from hosts.services import host_register
user = get_user_model().objects.create_superuser("bench", "bench@example.invalid", "x" * 20)
tokens = [host_register(hostname=f"agent-{{i:05d}}")[1] for i in range({count})]
print(json.dumps({{"tokens": tokens, "access": access_token_for(user)}}))
"""


#: Server settings taken from this process's environment: switches of the server's own
#: code to compare with and without (``SYSMANAGE_FAST_FRAMES=0``).
PASSED_THROUGH = {"SYSMANAGE_FAST_FRAMES"}


def server_env(workdir: Path, redis_url: str | None, offline_after: int | None) -> dict[str, str]:
    """Environment of the server and of the enrolment script."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "SYSMANAGE_", "DATABASE_URL", "REDIS_URL"))
        or k in PASSED_THROUGH
    }
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "sysmanage.settings",
            "SYSMANAGE_VAR_DIR": str(workdir),
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(40),
            "JWT_ACCESS_TTL_SECONDS": "21600",
            "LOG_LEVEL": "WARNING",
        }
    )
    if offline_after is not None:
        env["HOST_OFFLINE_AFTER_SECONDS"] = str(offline_after)
    if redis_url:
        env["REDIS_URL"] = redis_url
        env["SYSMANAGE_REDIS_PREFIX"] = f"bench-agents-{secrets.token_hex(4)}"
    return env


def prepare(root: Path, env: dict[str, str], agents: int) -> dict[str, Any]:
    """Migrate a fresh database and enroll the hosts with the code in ``root``; return
    the agents' tokens and a staff user's access token."""
    subprocess.run(
        [PYTHON, "manage.py", "migrate", "-v0"], cwd=root, env=env, check=True, timeout=300
    )
    out = subprocess.run(
        [PYTHON, "manage.py", "shell", "-c", ENROLL.format(count=agents)],
        cwd=root,
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


#: How each kind of server is started: module run by Python, ASGI application.
SERVERS = {
    "server": ("sysmanage.serve", "sysmanage.asgi:application"),
    "floor": ("daphne", "floor_app:application"),
}


def start_server(
    root: Path, env: dict[str, str], port: int, log: Path, kind: str = "server"
) -> subprocess.Popen[bytes]:
    """Start the server of the code in ``root`` as it ships (or the floor application),
    and wait until it answers."""
    module, app = SERVERS[kind]
    handle = log.open("ab")
    proc = subprocess.Popen(
        [PYTHON, "-m", module, "-b", "127.0.0.1", "-p", str(port), app],
        cwd=root,
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
    beats: int = 0
    errors: int = 0
    retries: int = 0
    #: ``run_command`` messages answered
    answered: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Behaviour:
    """How the simulated agents behave (the agent program's defaults but for metrics)."""

    interval: float
    heartbeat: float
    #: seconds between the agents' protocol pings (0: none)
    ping: float
    #: give up connecting after this many seconds of retrying
    connect_for: float
    #: seconds an agent takes to answer a ``run_command`` (0: at once)
    answer_delay: float = 0.0


async def run_agent(url: str, token: str, index: int, how: Behaviour, tally: Tally) -> None:
    """One simulated agent: hello, metrics every interval, heartbeats, instant command
    results; a refused or dropped handshake is retried with backoff, as the agent does."""
    rng = random.Random(index)
    deadline, delay = time.monotonic() + how.connect_for, 1.0
    while True:
        welcomed = asyncio.Event()
        try:
            await _agent(url, token, index, how, tally, welcomed, rng)
            return
        except (OSError, TimeoutError, websockets.WebSocketException):
            if welcomed.is_set() or time.monotonic() > deadline or tally.stop.is_set():
                tally.errors += 1
                return
        tally.retries += 1
        await asyncio.sleep(rng.uniform(0, delay))
        delay = min(delay * 2, 10.0)


async def _agent(
    url: str,
    token: str,
    index: int,
    how: Behaviour,
    tally: Tally,
    welcomed: asyncio.Event,
    rng: random.Random,
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with websockets.connect(
        url,
        additional_headers=headers,
        max_size=2**20,
        open_timeout=60,
        ping_interval=how.ping or None,
        ping_timeout=how.ping or None,
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
        welcomed.set()
        tally.connected += 1
        await asyncio.gather(_report(ws, rng, how, tally), _answer(ws, tally, how.answer_delay))


async def _report(ws: Any, rng: random.Random, how: Behaviour, tally: Tally) -> None:
    now = time.monotonic()
    next_report = now + rng.uniform(0, how.interval)  # spread over the fleet
    next_beat = now + rng.uniform(0, how.heartbeat)
    while not tally.stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                tally.stop.wait(), max(0.0, min(next_report, next_beat) - time.monotonic())
            )
        if tally.stop.is_set():
            break
        now = time.monotonic()
        if now >= next_report:
            metrics = sample_metrics(rng)
            await ws.send(json.dumps({"type": "metrics", "data": {"metrics": metrics}}))
            tally.sent += 1
            next_report += how.interval
        if now >= next_beat:
            await ws.send(json.dumps({"type": "heartbeat", "data": {}}))
            tally.beats += 1
            next_beat += how.heartbeat
    await ws.close()


async def _answer(ws: Any, tally: Tally, delay: float = 0.0) -> None:
    pending: set[asyncio.Task[None]] = set()
    with contextlib.suppress(websockets.ConnectionClosed):
        async for raw in ws:
            message = json.loads(raw)
            if message.get("type") == "run_command":
                execution_id = message["data"]["execution_id"]
                if not delay:
                    await _result(ws, execution_id, tally)
                    continue
                task = asyncio.ensure_future(_result(ws, execution_id, tally, delay))
                pending.add(task)  # kept until done, so that it is not collected
                task.add_done_callback(pending.discard)
            elif message.get("type") == "error":
                tally.errors += 1


async def _result(ws: Any, execution_id: str, tally: Tally, delay: float = 0.0) -> None:
    """Answer a ``run_command`` as the command had run for ``delay`` seconds."""
    if delay:
        await asyncio.sleep(delay)
    with contextlib.suppress(websockets.ConnectionClosed):
        await ws.send(
            json.dumps(
                {
                    "type": "command_result",
                    "data": {
                        "execution_id": execution_id,
                        "status": "completed",
                        "exit_code": 0,
                        "stdout": "ok\n",
                        "stderr": "",
                        "execution_time": delay,
                    },
                }
            )
        )
    tally.answered += 1


async def watch(url: str, access: str, host_ids: list[str], seconds: float) -> int:
    """Count ``host_metrics`` events for ``host_ids`` (one socket each) during ``seconds``."""
    counts = await asyncio.gather(*(watch_one(url, access, h, seconds) for h in host_ids))
    return sum(counts)


async def watch_one(url: str, access: str, host_id: str, seconds: float) -> int:
    """Count one host's ``host_metrics`` events during ``seconds``."""
    headers = {"Authorization": f"Bearer {access}"}
    async with websockets.connect(
        url, additional_headers=headers, max_size=2**22, open_timeout=60
    ) as ws:
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


async def settle(url: str, access: str, limit: float) -> None:
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


def host_ids(root: Path, env: dict[str, str], limit: int) -> list[str]:
    """Ids of the enrolled hosts (first ``limit``)."""
    code = (
        "import json; from hosts.models import Host; "
        f"print(json.dumps([str(h) for h in Host.objects.order_by('hostname')"
        f".values_list('id', flat=True)[:{limit}]]))"
    )
    out = subprocess.run(
        [PYTHON, "manage.py", "shell", "-c", code],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return list(json.loads(out.strip().splitlines()[-1]))


class CpuWindow:
    """CPU seconds of some processes over a window (the rest of the machine is
    :class:`_common.MachineWindow`'s)."""

    def __init__(self, procs: dict[str, psutil.Process]) -> None:
        self.procs = procs
        self.start = self._sample()

    def _sample(self) -> tuple[float, dict[str, float]]:
        used = {}
        for name, proc in self.procs.items():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                used[name] = times.user + times.system
                used[f"{name}_system"] = times.system
        return time.monotonic(), used

    def close(self) -> dict[str, float]:
        """CPU seconds used since the window opened, per process, and the window's
        ``seconds``."""
        t0, used0 = self.start
        t1, used1 = self._sample()
        spent = {name: used1[name] - used0.get(name, 0.0) for name in used1}
        spent["seconds"] = t1 - t0
        return spent


@dataclass
class Deployment:
    """One revision's server: the code it runs from, its database and its environment."""

    label: str
    root: Path
    workdir: Path
    env: dict[str, str]
    #: "server", or "floor" (``bench/floor_app.py`` under Daphne)
    kind: str = "server"
    data: dict[str, Any] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)

    def prepare(self, agents: int) -> None:
        """Migrate the deployment's fresh database and enroll the hosts (the floor
        application takes any token)."""
        if self.kind == "floor":
            self.data = {"tokens": [f"floor-{i}" for i in range(agents)], "access": "floor"}
            self.ids = [str(uuid.UUID(int=i)) for i in range(agents)]
            return
        self.data = prepare(self.root, self.env, agents)
        self.ids = host_ids(self.root, self.env, agents)


async def drive(
    args: argparse.Namespace,
    base: str,
    deployment: Deployment,
    server: psutil.Process,
    profile_to: Path | None,
) -> dict[str, Any]:
    """Connect the agents, measure the steady state, time commands."""
    data, ids = deployment.data, deployment.ids
    agent_url, client_url = f"ws://{base}/ws/agent", f"ws://{base}/ws"
    tally = Tally()
    rss_before = server.memory_info().rss
    started = time.monotonic()
    how = Behaviour(args.interval, args.heartbeat, args.agent_ping, args.connect_for)
    tasks = []
    for index, token in enumerate(data["tokens"]):
        tasks.append(asyncio.ensure_future(run_agent(agent_url, token, index, how, tally)))
        if index % 50 == 49:
            await asyncio.sleep(50 / args.ramp)  # a connect ramp, as a fleet restarting would be
    deadline = started + args.connect_for + 60
    while tally.connected + tally.errors < len(tasks) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    connect_seconds = time.monotonic() - started
    settle_started = time.monotonic()
    await settle(client_url, data["access"], args.settle_for)
    await asyncio.sleep(args.interval * 2)
    # The agents' first reports queue their first alert checks for the database thread;
    # measure once it keeps up again.
    await settle(client_url, data["access"], args.settle_for)
    settle_seconds = time.monotonic() - settle_started - args.interval * 2
    profiler = None
    if profile_to is not None:
        profiler = start_py_spy(
            server.pid, profile_to, args.duration, profile_to.with_suffix(".log")
        )
        await asyncio.sleep(1.0)  # py-spy attaches before the window opens
    procs = {"server": server, "loadgen": psutil.Process()}
    if profiler is not None:
        procs["profiler"] = psutil.Process(profiler.pid)
    window, machine = CpuWindow(procs), MachineWindow(own=[server.pid])
    sent0, beats0 = tally.sent, tally.beats
    watched = await watch(client_url, data["access"], ids[:10], args.duration)
    spent = window.close()
    machine_report = machine.report()
    sent, beats = tally.sent - sent0, tally.beats - beats0
    load = os.getloadavg()
    rss_after = server.memory_info().rss
    if profiler is not None:
        await asyncio.to_thread(profiler.wait, 60)
    rtts = await time_commands(client_url, data["access"], ids, args.commands)
    tally.stop.set()
    await asyncio.wait(tasks, timeout=30)
    seconds = spent["seconds"]
    us_per_message = 1e6 * spent["server"] / sent if sent else None
    return {
        "agents": len(tasks),
        "connected": tally.connected,
        "errors": tally.errors,
        "handshake_retries": tally.retries,
        "connect_s": round(connect_seconds, 1),
        "settle_s": round(settle_seconds, 1),
        "metrics_per_s": round(sent / seconds),
        "heartbeats_per_s": round(beats / seconds, 1),
        "watched_delivery": round(watched / max(1, 10 * seconds / args.interval), 3),
        "server_cpu_pct": round(100 * spent["server"] / seconds, 1),
        "server_kernel_pct": round(100 * spent["server_system"] / seconds, 1),
        "us_per_message": round(us_per_message, 1) if us_per_message is not None else None,
        "loadgen_cpu_pct": round(100 * spent["loadgen"] / seconds, 1),
        "profiler_cpu_pct": round(100 * spent.get("profiler", 0.0) / seconds, 1),
        "load_avg": " ".join(f"{v:.2f}" for v in load),
        "machine": machine_report,
        "rss_mb": round(rss_after / 2**20, 1),
        "rss_per_agent_kb": round((rss_after - rss_before) / max(1, tally.connected) / 1024, 1),
        "commands": len(rtts),
        "rtt_p50_ms": round(statistics.median(rtts), 1) if rtts else None,
        "rtt_p99_ms": round(sorted(rtts)[int(0.99 * (len(rtts) - 1))], 1) if rtts else None,
    }


def run_once(
    args: argparse.Namespace, deployment: Deployment, run: int, profile_dir: Path | None
) -> dict[str, Any]:
    """Start a fresh server of ``deployment``, drive it once, stop it."""
    log = deployment.workdir / "server.log"
    profile_to = None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        profile_to = profile_dir / f"{deployment.label.split()[0]}-{run}.txt"
    port = free_port()
    proc = start_server(deployment.root, deployment.env, port, log, deployment.kind)
    try:
        result = asyncio.run(
            drive(args, f"127.0.0.1:{port}", deployment, psutil.Process(proc.pid), profile_to)
        )
    except BaseException:
        print(
            "server log (last lines):\n"
            + "\n".join(log.read_text(errors="replace").splitlines()[-40:]),
            file=sys.stderr,
        )
        raise
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        proc.kill()
        proc.wait()
    if profile_to is not None and profile_to.exists():
        summary = summarise(profile_to, us_per_unit=result["us_per_message"])
        profile_to.with_name(profile_to.stem + "-summary.txt").write_text(summary)
    return {"server": deployment.label, "run": run, **result}


def describe(rev: str) -> str:
    """A revision's short hash."""
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", rev],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def working_tree_label() -> str:
    """The label of the code being measured: its commit, and whether it has changes."""
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"candidate ({describe('HEAD')}{' + changes' if dirty else ''})"


#: Columns of the per-run table: key, heading.
COLUMNS = [
    ("server", "server"),
    ("run", "run"),
    ("connected", "agents"),
    ("metrics_per_s", "msg/s"),
    ("server_cpu_pct", "srv%"),
    ("us_per_message", "µs/msg"),
    ("loadgen_cpu_pct", "gen%"),
    ("load_avg", "load 1/5/15 min"),
    ("watched_delivery", "watched"),
    ("rss_per_agent_kb", "KB/agent"),
    ("rtt_p99_ms", "cmd p99 ms"),
    ("target", "≤150 µs"),
]


def verdict(us: float | None) -> str:
    """Whether one figure meets the target."""
    if us is None:
        return "n/a"
    return "met" if us <= TARGET_US else "MISSED"


def print_table(rows: list[dict[str, Any]]) -> None:
    """The per-run rows, aligned."""
    cells = [[head for _, head in COLUMNS]]
    cells += [
        ["" if row.get(key) is None else str(row.get(key)) for key, _ in COLUMNS] for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))


def print_summary(rows: list[dict[str, Any]], labels: list[str]) -> dict[str, float]:
    """Min and median µs per message of each server, the target, and the ratio."""
    medians = {}
    for label in labels:
        figures = [
            r["us_per_message"] for r in rows if r["server"] == label and r["us_per_message"]
        ]
        if not figures:
            continue
        medians[label] = statistics.median(figures)
        print(
            f"  {label}: server CPU per metrics message min {min(figures):.1f} µs, "
            f"median {medians[label]:.1f} µs over {len(figures)} run(s)"
        )
    by_role = {label.split()[0]: median for label, median in medians.items()}
    if "reference" in by_role and "candidate" in by_role:
        ratio = by_role["candidate"] / by_role["reference"]
        print(f"  candidate / reference (medians): {ratio:.2f}")
    if "floor" in by_role:
        for role in ("reference", "candidate"):
            if role in by_role:
                print(
                    f"  {role} above the floor (medians): "
                    f"{by_role[role] - by_role['floor']:.1f} µs per message"
                )
    return medians


def main() -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between reports")
    parser.add_argument(
        "--heartbeat", type=float, default=30.0, help="seconds between heartbeats (the agent's)"
    )
    parser.add_argument(
        "--agent-ping",
        type=float,
        default=20.0,
        help="seconds between the agents' protocol pings (the agent's default; 0: none)",
    )
    parser.add_argument("--ramp", type=float, default=1000.0, help="agents started per second")
    parser.add_argument(
        "--settle-for",
        type=float,
        default=120.0,
        help="how long the server may take to accept a client promptly again after the "
        "agents connected and after their first reports",
    )
    parser.add_argument(
        "--connect-for", type=float, default=300.0, help="how long an agent retries connecting"
    )
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--commands", type=int, default=200)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument(
        "--offline-after",
        type=int,
        default=None,
        help="HOST_OFFLINE_AFTER_SECONDS of the server (default: the shipped 90); an "
        "agent's last-seen time is written every third of it",
    )
    parser.add_argument(
        "--reference-ref",
        default=None,
        help="also measure this git revision's server (from a temporary worktree), "
        "alternating with the working tree's",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per server")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure bench/floor_app.py under Daphne: what a frame costs before any "
        "of the server's own work",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="record py-spy samples of the server over each window into this directory",
    )
    args = parser.parse_args()
    raise_fd_limit()
    scratch = Path(tempfile.mkdtemp(prefix="bench-agents-"))
    rows: list[dict[str, Any]] = []
    try:
        with contextlib.ExitStack() as stack:
            deployments = []
            if args.reference_ref:
                tree, _ = stack.enter_context(reference_worktree(args.reference_ref))
                deployments.append((f"reference ({describe(args.reference_ref)})", tree))
            deployments.append((working_tree_label(), REPO))
            servers = []
            for index, (label, root) in enumerate(deployments):
                workdir = scratch / str(index)
                workdir.mkdir()
                env = server_env(workdir, args.redis_url, args.offline_after)
                servers.append(Deployment(label, root, workdir, env))
            if args.floor:
                workdir = scratch / "floor"
                workdir.mkdir()
                env = server_env(workdir, None, None)
                servers.append(Deployment("floor (bare Daphne)", BENCH, workdir, env, "floor"))
            for deployment in servers:
                deployment.prepare(args.agents)
            for run in range(1, args.repeat + 1):
                # ABBA order, so that a drift of the machine's load weighs on both alike
                for deployment in servers if run % 2 else servers[::-1]:
                    row = run_once(args, deployment, run, args.profile)
                    row["target"] = verdict(row["us_per_message"])
                    rows.append(row)
                    print(
                        f"  {row['server']} run {run}: {row['us_per_message']} µs/msg, "
                        f"{row['machine']}",
                        flush=True,
                    )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    layer = "redis" if args.redis_url else "in-memory"
    print(
        f"agents benchmark ({layer} layer, {args.agents} agents, reports every "
        f"{args.interval}s, heartbeats every {args.heartbeat}s, pings every "
        f"{args.agent_ping or '-'}s, {args.duration:.0f}s windows, offline after "
        f"{args.offline_after if args.offline_after is not None else 'default'}, "
        f"{os.cpu_count()} cores)"
    )
    print_table(rows)
    print(
        "  srv% gen%: percent of one core used by the server and by this load generator over "
        "the window; load: os.getloadavg() at its end"
    )
    for row in rows:
        print(
            f"  {row['server']} run {row['run']}: connected {row['connected']} of "
            f"{row['agents']} in {row['connect_s']}s (+{row['settle_s']}s settling), "
            f"errors {row['errors']}, handshakes retried {row['handshake_retries']}, "
            f"heartbeats {row['heartbeats_per_s']}/s, "
            f"server CPU in the kernel {row['server_kernel_pct']}% of a core, "
            f"RSS {row['rss_mb']} MB, commands {row['commands']} "
            f"p50/p99 {row['rtt_p50_ms']}/{row['rtt_p99_ms']} ms, "
            f"py-spy {row['profiler_cpu_pct']}%"
        )
        print(f"    {row['machine']}")
    medians = print_summary(rows, [d.label for d in servers])
    candidate = [median for label, median in medians.items() if label.startswith("candidate")]
    if candidate:
        print_targets(
            [Target("server CPU per metrics message (median)", candidate[0], TARGET_US, " µs")]
        )
    if args.profile is not None:
        print(f"  profiles (raw py-spy samples and *-summary.txt): {args.profile}")
    ok = all(r["connected"] == r["agents"] and not r["errors"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
