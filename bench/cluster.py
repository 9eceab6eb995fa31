"""
Cluster benchmark: what it costs each server process to receive the events that another
process published, and how that compares with a reference revision in the same run.

::

    .venv/bin/python bench/cluster.py --processes 1 2 --rate 500 --events 5000 \\
        --reference-ref e07fd36

Every server process receives every event published anywhere in the cluster, whether or
not its own sockets want it; that cost, paid N times for N processes, is what limits how
far a cluster grows.  For each revision (this checkout, and ``--reference-ref`` checked
out into a temporary ``git worktree``) and each process count, it starts that many
server processes on one fresh PostgreSQL database and one Redis prefix, opens one idle
client socket per process (which starts the process's node), and runs the revision's own
load generator (``bench/loadgen.py publish --mode real``: what another server process
publishes, through that revision's transport) at ``--rate`` events/s.  It reads each
server's CPU time over the window and prints CPU per received event per process, the
CPU of the publisher and of the whole machine, and whether every process kept up.
Revisions and process counts alternate, so machine noise affects both alike.

Needs PostgreSQL (``--postgres-url``, trust auth) and Redis (``--redis-url``) on
loopback; stops by itself.  See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis
import websockets
from _common import free_port, raise_fd_limit, reference_worktree  # bench/ is on sys.path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
APPLICATION = "sysmanage.asgi:application"

SETUP = """
import json
from django.contrib.auth import get_user_model
from sysmanage.credentials import access_token_for
user = get_user_model().objects.create_superuser("bench", "bench@example.invalid", "x" * 20)
print(json.dumps({"access": access_token_for(user)}))
"""


@dataclass
class Row:
    """One measurement: a revision, a process count, and what each process spent."""

    revision: str
    processes: int
    rate: float
    events: int
    published_rate: float
    us_per_event: list[float]
    publisher_cpu_pct: float
    machine_cpu_pct: float
    load: float

    def cells(self) -> list[str]:
        worst = max(self.us_per_event)
        return [
            self.revision,
            str(self.processes),
            f"{self.published_rate:.0f}",
            " / ".join(f"{u:.0f}" for u in self.us_per_event),
            f"{worst:.0f}",
            f"{self.publisher_cpu_pct:.0f}",
            f"{self.machine_cpu_pct:.0f}",
            f"{self.load:.2f}",
        ]


HEADER = [
    "revision",
    "procs",
    "pub/s",
    "µs/event per process",
    "worst µs",
    "pub %cpu",
    "machine %",
    "load1",
]


def server_env(postgres_url: str, database: str, redis_url: str, prefix: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "SYSMANAGE_", "DATABASE_URL", "REDIS_URL"))
    }
    parts = urllib.parse.urlsplit(postgres_url)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "sysmanage.settings",
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(40),
            "DATABASE_URL": urllib.parse.urlunsplit(parts._replace(path=f"/{database}")),
            "REDIS_URL": redis_url,
            "SYSMANAGE_REDIS_PREFIX": prefix,
            "JWT_ACCESS_TTL_SECONDS": "3600",
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": "",
        }
    )
    return env


@contextlib.contextmanager
def database(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    name = f"sysmanage_bench_{secrets.token_hex(4)}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_server(root: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    handle = log.open("wb")
    proc = subprocess.Popen(
        [PYTHON, "-m", "sysmanage.serve", "-b", "127.0.0.1", "-p", str(port), APPLICATION],
        cwd=root,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2),
        ):
            return proc, port
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()[-2000:]}")


async def hold_sockets(
    ports: list[int], token: str, ready: asyncio.Event, stop: asyncio.Event
) -> None:
    """One idle client per server: its connection starts the server's node."""
    async with contextlib.AsyncExitStack() as stack:
        for port in ports:
            ws = await stack.enter_async_context(
                websockets.connect(f"ws://127.0.0.1:{port}/ws?token={token}", proxy=None)
            )
            await ws.send(json.dumps({"type": "ping", "id": "start"}))
            await asyncio.wait_for(ws.recv(), 10)
        ready.set()
        await stop.wait()


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def measure(root: Path, label: str, processes: int, args: argparse.Namespace, work: Path) -> Row:
    prefix = f"bench-cluster-{secrets.token_hex(4)}"
    with database(args.postgres_url) as name:
        env = server_env(args.postgres_url, name, args.redis_url, prefix)
        subprocess.run(
            [PYTHON, "manage.py", "migrate", "-v0"], cwd=root, env=env, check=True, timeout=300
        )
        token = json.loads(
            subprocess.run(
                [PYTHON, "manage.py", "shell", "-c", SETUP],
                cwd=root,
                env=env,
                check=True,
                capture_output=True,
                text=True,
                timeout=120,
            )
            .stdout.strip()
            .splitlines()[-1]
        )["access"]
        servers = [
            start_server(root, env, work / f"{label}-{processes}-{i}.log") for i in range(processes)
        ]
        try:
            return asyncio.run(run_window(root, env, label, processes, servers, token, args))
        finally:
            for proc, _ in servers:
                proc.terminate()
            for proc, _ in servers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            client = redis.Redis.from_url(args.redis_url)
            keys = list(client.scan_iter(f"{prefix}*"))
            if keys:
                client.delete(*keys)
            client.close()


async def run_window(
    root: Path,
    env: dict[str, str],
    label: str,
    processes: int,
    servers: list[tuple[subprocess.Popen[bytes], int]],
    token: str,
    args: argparse.Namespace,
) -> Row:
    ready, stop = asyncio.Event(), asyncio.Event()
    ports = [port for _, port in servers]
    holder = asyncio.create_task(hold_sockets(ports, token, ready, stop))
    await asyncio.wait_for(ready.wait(), 60)
    publisher = await asyncio.create_subprocess_exec(
        PYTHON,
        str(root / "bench" / "loadgen.py"),
        "publish",
        "--mode",
        "real",
        "--url",
        f"ws://127.0.0.1:{servers[0][1]}",
        "--events",
        str(args.events),
        "--rate",
        str(args.rate),
        cwd=root,
        env={**env, "PYTHONPATH": str(root)},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    stdin, stdout = publisher.stdin, publisher.stdout
    assert stdin is not None
    assert stdout is not None

    async def line(tag: str) -> dict[str, Any]:
        while True:
            raw = await asyncio.wait_for(stdout.readline(), 120)
            if not raw:
                raise RuntimeError(f"the publisher ended before {tag}")
            text = raw.decode().strip()
            if text.startswith(tag):
                found: dict[str, Any] = json.loads(text[len(tag) :].strip() or "{}")
                return found

    await line("READY")
    procs = [psutil.Process(proc.pid) for proc, _ in servers]
    pub_proc = psutil.Process(publisher.pid)
    await asyncio.sleep(2)  # let start-up work settle
    # What each process spends idle (periodic jobs, the idle socket) is not the events'.
    idle_from = time.monotonic()
    idle_before = [cpu_seconds(p) for p in procs]
    await asyncio.sleep(args.idle)
    idle_rates = [
        (cpu_seconds(p) - b) / (time.monotonic() - idle_from)
        for p, b in zip(procs, idle_before, strict=True)
    ]
    before = [cpu_seconds(p) for p in procs]
    pub_before = pub_last = cpu_seconds(pub_proc)

    async def sample_publisher() -> None:
        nonlocal pub_last
        with contextlib.suppress(psutil.NoSuchProcess):
            while True:
                pub_last = cpu_seconds(pub_proc)
                await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample_publisher())
    psutil.cpu_percent(None)
    started = time.monotonic()
    stdin.write(b"GO\n")
    await stdin.drain()
    done = await line("DONE")
    await asyncio.sleep(args.drain)  # the last events are read and dispatched
    elapsed = time.monotonic() - started
    spent = [
        cpu_seconds(p) - b - idle * elapsed
        for p, b, idle in zip(procs, before, idle_rates, strict=True)
    ]
    sampler.cancel()
    pub_spent = pub_last - pub_before
    machine = psutil.cpu_percent(None)
    stop.set()
    await holder
    await publisher.wait()
    return Row(
        revision=label,
        processes=processes,
        rate=args.rate,
        events=args.events,
        published_rate=float(done["published_rate"]),
        us_per_event=[s / args.events * 1e6 for s in spent],
        publisher_cpu_pct=pub_spent / elapsed * 100,
        machine_cpu_pct=machine,
        load=os.getloadavg()[0],
    )


def table(rows: list[Row]) -> str:
    lines = [" | ".join(HEADER), " | ".join("---" for _ in HEADER)]
    lines += [" | ".join(row.cells()) for row in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=1, help="repetitions of every cell")
    parser.add_argument("--drain", type=float, default=3.0, help="seconds after the last event")
    parser.add_argument(
        "--idle", type=float, default=5.0, help="seconds of idle CPU measured first, subtracted"
    )
    parser.add_argument("--reference-ref", default=None, help="git revision to compare with")
    parser.add_argument("--target-us", type=float, default=50.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres-url", default="postgres://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    raise_fd_limit()
    rows: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        revisions = [("current", REPO)]
        if args.reference_ref:
            reference, _ = stack.enter_context(reference_worktree(args.reference_ref))
            revisions.append((args.reference_ref, reference))
        for _ in range(args.rounds):
            for processes in args.processes:
                for label, root in revisions:
                    row = measure(root, label, processes, args, work)
                    rows.append(row)
                    print(" | ".join(row.cells()), flush=True)
    print()
    print(f"load average (1/5/15 min) at the end: {os.getloadavg()}")
    print(table(rows))
    current_rows = [r for r in rows if r.revision == "current"]
    worst = max(max(r.us_per_event) for r in current_rows)
    verdict = "met" if worst <= args.target_us else "missed"
    print(
        f"target ≤ {args.target_us:.0f} µs per received event per process: {verdict} "
        f"(worst {worst:.0f} µs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
