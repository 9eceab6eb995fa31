"""
Agent reconnect storm: N agents connected to one server process on PostgreSQL; the
process is killed and started again at once; how long until every agent is online
again, and did any handshake fail?

::

    .venv/bin/python bench/agent_storm.py --agents 10000
    DB_THREADS=1 .venv/bin/python bench/agent_storm.py --agents 10000

The agents are those of ``bench/agents.py`` (the agent protocol of
``docs/agent-protocol.md``: ``hello``, answered ``welcome`` once the host is online in
the database; metrics every ``--interval`` s, heartbeats), in ``--workers`` processes.
They first connect at ``--ramp`` agents/s.  After ``--steady`` s the server is killed
with SIGKILL (a crash, or a restart that closes nothing) and started again on its port;
every agent then reconnects as the agent program does (``agent/backoff.py``: full
jitter, the first delay uniform in [0, 1) s, doubling per failed attempt up to 60 s).
An agent is back when its new ``welcome`` arrives.  A connection refused while nothing
listens is counted apart; every other failed attempt (an HTTP refusal, a close before
``welcome``, a timeout) is a failed handshake.

Prints, per run: the time from the kill until all agents were back (and from the
restarted server's first answer), the spread, the attempts refused and failed, the
server's CPU over the storm and the machine's report, then the targets.  Needs
PostgreSQL at 127.0.0.1:5432 (trust; a database is created and dropped); loopback only.
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
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import websockets
from _common import MachineWindow, Target, free_port, print_targets, raise_fd_limit
from agents import prepare, sample_metrics, server_env, start_server
from fanout import BenchError, Child
from loadgen import emit, expect_line

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PYTHON = sys.executable
#: The agent program's wait for ``welcome`` (agent/session.py).
WELCOME_TIMEOUT = 30.0
#: The agent program's reconnect back-off (agent/backoff.py).
BACKOFF_BASE, BACKOFF_CAP = 1.0, 60.0


# -- the agents (one worker process) ----------------------------------------------------


@dataclass
class Agent:
    """One simulated agent and what happened to it."""

    index: int
    token: str
    welcomed_at: list[float] = field(default_factory=list)
    refused: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)


class Fleet:
    """The agents of one worker process."""

    def __init__(self, args: argparse.Namespace, tokens: list[tuple[int, str]]) -> None:
        self.args = args
        self.agents = [Agent(index, token) for index, token in tokens]
        self.stop = asyncio.Event()
        self.welcomed = 0
        self.all_first = asyncio.Event()

    async def run_agent(self, agent: Agent, start_after: float) -> None:
        """Connect, stay connected, reconnect with the agent's back-off, until stopped."""
        await asyncio.sleep(start_after)
        rng = random.Random(agent.index)
        attempt = 0
        while not self.stop.is_set():
            try:
                await self.session(agent, rng)
                attempt = 0  # it was welcomed: the next drop starts the back-off again
            except ConnectionRefusedError:
                agent.refused += 1
            except (OSError, TimeoutError, websockets.WebSocketException, Refused) as exc:
                agent.failed += 1
                kind = type(exc).__name__
                agent.failures[kind] = agent.failures.get(kind, 0) + 1
            if self.stop.is_set():
                return
            await asyncio.sleep(rng.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)))
            attempt += 1

    async def session(self, agent: Agent, rng: random.Random) -> None:
        """One connection: hello, welcome, then metrics and heartbeats until it drops."""
        async with websockets.connect(
            self.args.url,
            additional_headers={"Authorization": f"Bearer {agent.token}"},
            max_size=2**20,
            open_timeout=self.args.open_timeout,
            ping_interval=None,
            compression=None,
            proxy=None,
        ) as ws:
            await ws.send(json.dumps({"type": "hello", "data": hello(agent.index)}))
            async with asyncio.timeout(WELCOME_TIMEOUT):
                while True:
                    message = json.loads(await ws.recv())
                    if message.get("type") == "welcome":
                        break
                    if message.get("type") == "error":
                        raise Refused(str(message.get("data", {}).get("code")))
            agent.welcomed_at.append(time.time())
            if len(agent.welcomed_at) == 1:
                self.welcomed += 1
                if self.welcomed == len(self.agents):
                    self.all_first.set()
            # from here on the connection counts as made: its end is no failure
            tasks = [asyncio.ensure_future(self.report(ws, rng)), asyncio.ensure_future(drain(ws))]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def report(self, ws: Any, rng: random.Random) -> None:
        """Metrics every interval and a heartbeat every ``--heartbeat`` s, staggered."""
        args = self.args
        next_report = time.monotonic() + rng.uniform(0, args.interval)
        next_beat = time.monotonic() + rng.uniform(0, args.heartbeat)
        while not self.stop.is_set():
            await asyncio.sleep(max(0.0, min(next_report, next_beat) - time.monotonic()))
            now = time.monotonic()
            if now >= next_report:
                metrics = sample_metrics(rng)
                await ws.send(json.dumps({"type": "metrics", "data": {"metrics": metrics}}))
                next_report += args.interval
            if now >= next_beat:
                await ws.send(json.dumps({"type": "heartbeat", "data": {}}))
                next_beat += args.heartbeat
        await ws.close()


class Refused(Exception):
    """The server answered the hello with an error."""


def hello(index: int) -> dict[str, Any]:
    """The agent's ``hello``."""
    return {
        "hostname": f"agent-{index:05d}",
        "cpu_count": 4,
        "ip_addresses": [],
        "os_name": "Debian GNU/Linux",
        "os_version": "12",
        "agent_version": "bench",
    }


async def drain(ws: Any) -> None:
    """Read (and drop) what the server sends until the socket closes."""
    async for _ in ws:
        pass


async def worker_main(args: argparse.Namespace) -> None:
    """A worker: connect its agents, READY, then KILLED, BACK, FINISH, RESULT."""
    tokens = json.loads(Path(args.tokens_file).read_text())
    mine = [(i, t) for i, t in enumerate(tokens) if i % args.workers == args.worker]
    fleet = Fleet(args, mine)
    spacing = args.workers / args.ramp
    tasks = [
        asyncio.create_task(fleet.run_agent(agent, n * spacing))
        for n, agent in enumerate(fleet.agents)
    ]
    began = time.monotonic()
    await fleet.all_first.wait()
    before = {a.index: (a.refused, a.failed) for a in fleet.agents}
    emit("READY", {"agents": len(fleet.agents), "seconds": round(time.monotonic() - began, 2)})
    killed = float((await expect_line("KILLED"))["at"])
    deadline = time.monotonic() + args.storm_timeout
    while time.monotonic() < deadline:
        back = sum(1 for a in fleet.agents if a.welcomed_at[-1] > killed)
        if back == len(fleet.agents):
            break
        await asyncio.sleep(0.25)
    emit("BACK", {})
    await expect_line("FINISH")
    fleet.stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    failures: dict[str, int] = {}
    for agent in fleet.agents:
        for kind, count in agent.failures.items():
            failures[kind] = failures.get(kind, 0) + count
    emit(
        "RESULT",
        {
            "back": [
                a.welcomed_at[-1] - killed for a in fleet.agents if a.welcomed_at[-1] > killed
            ],
            "refused": sum(a.refused - before[a.index][0] for a in fleet.agents),
            "failed": sum(a.failed - before[a.index][1] for a in fleet.agents),
            "failures": failures,
        },
    )


# -- the orchestrator -----------------------------------------------------------------------


def first_traceback(log: str) -> str:
    """The log line before the server's first traceback, and the traceback's last lines."""
    at = log.find("Traceback")
    if at < 0:
        return ""
    before = log[:at].rstrip("\n").rsplit("\n", 1)[-1]
    lines = log[at:].split("\n")
    end = next((n for n, line in enumerate(lines[1:], 1) if not line.startswith(" ")), 1)
    return "\n".join([before, *lines[max(1, end - 4) : end + 1]])


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def wait_listening(port: int, timeout: float) -> float:
    """Seconds until something accepts connections on ``port``."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return time.monotonic() - began
        time.sleep(0.02)
    raise BenchError(f"nothing listened on {port} within {timeout:.0f} s")


def create_database(admin: str) -> tuple[str, str]:
    """A fresh PostgreSQL database: its name and URL."""
    import psycopg

    name = f"sysmanage_bench_storm_{secrets.token_hex(5)}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"{admin.rsplit('/', 1)[0]}/{name}"


def drop_database(admin: str, name: str) -> None:
    import psycopg

    with contextlib.suppress(Exception), psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One storm on a fresh database and server; its figures."""
    workdir = Path(tempfile.mkdtemp(prefix="sysmanage-bench-storm-"))
    name, url = create_database(args.postgres_url)
    env = server_env(workdir, None, 86400)
    env["DATABASE_URL"] = url
    port = free_port()
    server: subprocess.Popen[bytes] | None = None
    workers: list[Child] = []
    try:
        began = time.monotonic()
        tokens = prepare(REPO, env, args.agents)["tokens"]
        print(f"  enrolled {args.agents} hosts in {time.monotonic() - began:.0f} s", flush=True)
        tokens_file = workdir / "tokens.json"
        tokens_file.write_text(json.dumps(tokens))
        server = start_server(REPO, env, port, workdir / "server.log")
        workers = [
            Child.spawn(
                [
                    PYTHON,
                    str(BENCH / "agent_storm.py"),
                    "worker",
                    "--worker",
                    str(w),
                    "--workers",
                    str(args.workers),
                    "--tokens-file",
                    str(tokens_file),
                    "--url",
                    f"ws://127.0.0.1:{port}/ws/agent",
                    "--ramp",
                    str(args.ramp),
                    "--interval",
                    str(args.interval),
                    "--heartbeat",
                    str(args.heartbeat),
                    "--open-timeout",
                    str(args.open_timeout),
                    "--storm-timeout",
                    str(args.storm_timeout),
                ],
                REPO,
                env,
                workdir / f"worker-{w}.log",
            )
            for w in range(args.workers)
        ]
        ready = [w.expect("READY", 600) for w in workers]
        print(
            f"  {sum(r['agents'] for r in ready)} agents connected in "
            f"{max(r['seconds'] for r in ready)} s; steady for {args.steady:g} s",
            flush=True,
        )
        time.sleep(args.steady)
        machine = MachineWindow()
        killed_at = time.time()
        server.kill()
        server.wait(10)
        server = start_server(REPO, env, port, workdir / "server.log")
        listening = time.time() - killed_at
        watched = psutil.Process(server.pid)
        for w in workers:
            w.say("KILLED", {"at": killed_at})
        for w in workers:
            w.expect("BACK", args.storm_timeout + 60)
        window = time.time() - killed_at
        server_cpu = sum(watched.cpu_times()[:2])
        report = machine.report()
        threads = len(watched.threads())
        for w in workers:
            w.say("FINISH", {})
        results = [w.expect("RESULT", 120) for w in workers]
        log = (workdir / "server.log").read_text(errors="replace")
    finally:
        for w in workers:
            with contextlib.suppress(Exception):
                w.proc.kill()
        if server is not None:
            server.kill()
            server.wait(10)
        drop_database(args.postgres_url, name)
        shutil.rmtree(workdir, ignore_errors=True)
    back = [t for r in results for t in r["back"]]
    failures: dict[str, int] = {}
    for r in results:
        for kind, count in r["failures"].items():
            failures[kind] = failures.get(kind, 0) + count
    return {
        "agents": args.agents,
        "back": len(back),
        "all_back_s": max(back) if len(back) == args.agents else None,
        "p50_s": percentile(back, 0.5),
        "p99_s": percentile(back, 0.99),
        "listening_s": listening,
        "refused": sum(r["refused"] for r in results),
        "failed": sum(r["failed"] for r in results),
        "failures": failures,
        "server_cpu_pct": 100.0 * server_cpu / window,
        "server_threads": threads,
        "tracebacks": log.count("Traceback"),
        "first_traceback": first_traceback(log),
        "machine": report,
        "db_threads": os.environ.get("DB_THREADS", "default"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="Agent reconnect storm.")
    parser.add_argument("role", nargs="?", choices=("run", "worker"), default="run")
    parser.add_argument("--agents", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=2, help="agent processes")
    parser.add_argument("--ramp", type=float, default=400.0, help="first connections per second")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between reports")
    parser.add_argument("--heartbeat", type=float, default=30.0)
    parser.add_argument("--steady", type=float, default=10.0, help="seconds before the kill")
    parser.add_argument(
        "--open-timeout", type=float, default=20.0, help="as the agent program (agent/session.py)"
    )
    parser.add_argument("--storm-timeout", type=float, default=240.0)
    parser.add_argument("--target-seconds", type=float, default=60.0)
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    # set by the orchestrator for its workers
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--tokens-file", default="")
    parser.add_argument("--url", default="")
    args = parser.parse_args()
    raise_fd_limit()
    if args.role == "worker":
        asyncio.run(worker_main(args))
        return 0
    if "127.0.0.1" not in args.postgres_url:
        raise SystemExit("PostgreSQL must be on loopback")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(args)
    print(
        f"agents {result['agents']}, DB_THREADS {result['db_threads']}: back {result['back']}; "
        f"all back {result['all_back_s']} s after the kill (p50 {result['p50_s']:.1f} s, "
        f"p99 {result['p99_s']:.1f} s); the restarted server listened after "
        f"{result['listening_s']:.1f} s"
    )
    print(
        f"  attempts refused while nothing listened {result['refused']}; failed handshakes "
        f"{result['failed']} {result['failures']}; server CPU {result['server_cpu_pct']:.0f}% "
        f"of a core over the storm ({result['server_threads']} threads); server tracebacks "
        f"{result['tracebacks']}"
    )
    if result["first_traceback"]:
        print(f"  the server's first traceback:\n{result['first_traceback']}")
    print(f"  {result['machine']}")
    all_back = result["all_back_s"] if result["all_back_s"] is not None else 1e9
    ok = print_targets(
        [
            Target(
                f"all {args.agents} agents online after the kill",
                all_back,
                args.target_seconds,
                " s",
            ),
            Target("failed handshakes", result["failed"], 0),
        ]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
