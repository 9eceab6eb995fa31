"""
Cluster benchmark: what it costs each server process to receive the events that other
processes publish, whether N processes keep up with a cluster-wide rate, and how that
compares with a reference revision in the same run.

::

    .venv/bin/python bench/cluster.py --processes 1 2 4 --rates 1000 5000 --seconds 10 \\
        --reference-ref 4d097ed

Every server process receives every event published anywhere in the cluster, whether or
not its own sockets want it; that cost, paid N times for N processes, is what limits how
far a cluster grows.  For each revision (this checkout, and ``--reference-ref`` checked
out into a temporary ``git worktree``), each process count and each rate, it starts that
many server processes on one fresh PostgreSQL database and one Redis prefix, and one
client socket per process, subscribed to ``host_metrics`` of one host of ``--hosts`` (so
each process's own subscribers want one event in ``--hosts``, as in a cluster whose
processes each serve part of the fleet; ``--subscribe none`` subscribes to nothing).  A
publisher process (this file's ``publish`` command, importing the revision's own
``sysmanage.streams``: what another server process's publish loop sends, several events
per round trip when they are due together) publishes ``HostMetricsReported`` for the
hosts in turn at the rate, the last one for the subscribed host.  Each server's CPU time
over the window, minus what it spent idle just before, divided by the events, is its
cost per received event; the arrival of the last event on each socket tells whether the
process kept up (its received rate, and how late the last event came).

On a machine with two or more cores the servers run on the last core and the publisher
and this orchestrator on the first (``taskset``), so that the load generator does not
compete with the servers (``--no-pin`` to let the scheduler place them).  The ratio of
2 processes to 1 is then the throughput of two processes sharing one core to that of one.

Needs PostgreSQL (``--postgres-url``, trust auth) and Redis (``--redis-url``) on
loopback; stops by itself.  See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import psutil
import psycopg
import redis
import websockets
from _common import (  # bench/ is on sys.path
    MachineWindow,
    Target,
    free_port,
    print_targets,
    raise_fd_limit,
    reference_worktree,
)

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
APPLICATION = "sysmanage.asgi:application"

SETUP = """
import json
from django.contrib.auth import get_user_model
from sysmanage.credentials import access_token_for
from hosts.models import Host
user = get_user_model().objects.create_superuser("bench", "bench@example.invalid", "x" * 20)
host = Host.objects.create(hostname="bench-subscribed")
print(json.dumps({"access": access_token_for(user), "host": str(host.id)}))
"""


@dataclass
class Row:
    """One measurement: a revision, a process count, a rate, and what each process did."""

    revision: str
    processes: int
    rate: float
    events: int
    published_rate: float
    us_per_event: list[float]
    #: events/s each process took in (all events over the time until the last arrived)
    received_rate: list[float]
    #: how late the last event reached each process's socket (s after it was published)
    last_lag: list[float]
    publisher_cpu_pct: float
    machine: str = ""
    delivered: list[int] = field(default_factory=list)

    @property
    def kept_up(self) -> bool:
        """Whether every process had every event within a second of its publication."""
        return bool(self.last_lag) and max(self.last_lag) <= 1.0

    def cells(self) -> list[str]:
        return [
            self.revision,
            str(self.processes),
            f"{self.rate:.0f}",
            f"{self.published_rate:.0f}",
            " / ".join(f"{u:.0f}" for u in self.us_per_event),
            " / ".join(f"{r:.0f}" for r in self.received_rate),
            f"{max(self.last_lag) * 1000:.0f}" if self.last_lag else "-",
            f"{self.publisher_cpu_pct:.0f}",
        ]


HEADER = [
    "revision",
    "procs",
    "rate",
    "pub/s",
    "µs/event per process",
    "received/s per process",
    "last lag ms",
    "pub %cpu",
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


def taskset(cpu: int | None, argv: list[str]) -> list[str]:
    """``argv`` run on core ``cpu`` only (as it is when ``cpu`` is None)."""
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def start_server(
    root: Path, env: dict[str, str], log: Path, cpu: int | None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    handle = log.open("wb")
    argv = [PYTHON, "-m", "sysmanage.serve", "-b", "127.0.0.1", "-p", str(port), APPLICATION]
    proc = subprocess.Popen(
        taskset(cpu, argv), cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT
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


@dataclass
class Watch:
    """What one server's client socket saw of the events."""

    delivered: int = 0
    last_at: float = 0.0
    last_seq: int = -1


async def hold_sockets(
    ports: list[int],
    token: str,
    host: str | None,
    watches: list[Watch],
    ready: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    """One client per server (its connection starts the server's node), subscribed to
    ``host``'s metrics unless ``host`` is None; count what each receives."""

    async def watch(ws: Any, seen: Watch) -> None:
        async for raw in ws:
            message = json.loads(raw)
            if message.get("type") == "event":
                seen.delivered += 1
                seen.last_at = time.time()
                seen.last_seq = int(message["data"]["metrics"]["bench_seq"])

    async with contextlib.AsyncExitStack() as stack:
        readers = []
        for port, seen in zip(ports, watches, strict=True):
            ws = await stack.enter_async_context(
                websockets.connect(f"ws://127.0.0.1:{port}/ws?token={token}", proxy=None)
            )
            if host is None:
                await ws.send(json.dumps({"type": "ping", "id": "start"}))
            else:
                request = {
                    "type": "subscribe",
                    "id": "start",
                    "channel": "host_metrics",
                    "filters": {"host_id": host},
                }
                await ws.send(json.dumps(request))
            while True:
                reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if reply.get("type") == "error":
                    raise RuntimeError(f"subscription refused: {reply}")
                if reply.get("id") == "start":
                    break
            readers.append(asyncio.create_task(watch(ws, seen)))
        ready.set()
        await stop.wait()
        for reader in readers:
            reader.cancel()


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


@dataclass
class Placement:
    """Which core the servers and which the load generator run on (None: anywhere)."""

    servers: int | None
    generator: int | None


def measure(
    root: Path,
    label: str,
    processes: int,
    rate: float,
    args: argparse.Namespace,
    where: Placement,
    work: Path,
) -> Row:
    prefix = f"bench-cluster-{secrets.token_hex(4)}"
    with database(args.postgres_url) as name:
        env = server_env(args.postgres_url, name, args.redis_url, prefix)
        subprocess.run(
            [PYTHON, "manage.py", "migrate", "-v0"], cwd=root, env=env, check=True, timeout=300
        )
        made = json.loads(
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
        )
        servers = [
            start_server(root, env, work / f"{label}-{processes}-{i}.log", where.servers)
            for i in range(processes)
        ]
        try:
            return asyncio.run(run_window(root, env, label, processes, rate, servers, made, args))
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
    rate: float,
    servers: list[tuple[subprocess.Popen[bytes], int]],
    made: dict[str, str],
    args: argparse.Namespace,
) -> Row:
    # the subscribed host exists (subscriptions check it); the others need not
    token = made["access"]
    hosts = [made["host"]] + [str(uuid.uuid4()) for _ in range(args.hosts - 1)]
    events = max(int(rate * args.seconds), 1)
    watches = [Watch() for _ in servers]
    ready, stop = asyncio.Event(), asyncio.Event()
    ports = [port for _, port in servers]
    subscribed = hosts[0] if args.subscribe == "one-host" else None
    holder = asyncio.create_task(hold_sockets(ports, token, subscribed, watches, ready, stop))
    await asyncio.wait_for(ready.wait(), 60)
    command = [PYTHON, str(Path(__file__).resolve()), "publish", "--rate", str(rate)]
    command += ["--events", str(events), "--hosts", ",".join(hosts)]
    publisher = await asyncio.create_subprocess_exec(
        *taskset(args.generator_cpu, command),
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
            raw = await asyncio.wait_for(stdout.readline(), 300)
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
    window = MachineWindow(own=[p.pid for p in procs])
    before = [cpu_seconds(p) for p in procs]
    pub_before = pub_last = cpu_seconds(pub_proc)

    async def sample_publisher() -> None:
        nonlocal pub_last
        with contextlib.suppress(psutil.NoSuchProcess):
            while True:
                pub_last = cpu_seconds(pub_proc)
                await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample_publisher())
    started = time.monotonic()
    stdin.write(b"GO\n")
    await stdin.drain()
    done = await line("DONE")
    # the last events are read and dispatched (and, when subscribed, delivered)
    deadline = time.monotonic() + args.drain
    while subscribed and time.monotonic() < deadline:
        if all(w.last_seq == events - 1 for w in watches):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5 if subscribed else args.drain)
    elapsed = time.monotonic() - started
    spent = [
        cpu_seconds(p) - b - idle * elapsed
        for p, b, idle in zip(procs, before, idle_rates, strict=True)
    ]
    sampler.cancel()
    machine = window.report()
    stop.set()
    await holder
    await publisher.wait()
    first, last = float(done["first_publish"]), float(done["last_publish"])
    complete = [w for w in watches if w.last_seq == events - 1]
    return Row(
        revision=label,
        processes=processes,
        rate=rate,
        events=events,
        published_rate=float(done["published_rate"]),
        us_per_event=[s / events * 1e6 for s in spent],
        received_rate=[events / max(w.last_at - first, 1e-6) for w in complete],
        last_lag=[w.last_at - last for w in complete] if len(complete) == len(watches) else [],
        publisher_cpu_pct=(pub_last - pub_before) / elapsed * 100,
        machine=machine,
        delivered=[w.delivered for w in watches],
    )


# -- the publisher (run as ``cluster.py publish`` with the revision on PYTHONPATH) ------------


async def publish_main(args: argparse.Namespace) -> None:
    """Publish ``--events`` metrics reports at ``--rate`` through the revision's channel
    streams, the events that are due together in one round trip (as a server process's
    publish loop sends what queued up); print READY, wait for GO, print DONE."""
    import django

    django.setup()
    from django.conf import settings
    from loadgen import sample_metrics  # bench/, beside this file

    from hosts.events import HostMetricsReported
    from sysmanage.streams import RedisStreams

    hosts = args.hosts.split(",")
    rng = random.Random(7)
    messages = []
    for seq in range(args.events):
        # the last event goes to the first host, the one the sockets subscribe to
        host = hosts[0] if seq == args.events - 1 else hosts[seq % len(hosts)]
        metrics = {**sample_metrics(rng), "bench_seq": seq}
        event = HostMetricsReported(
            host_id=host, hostname=f"host-{host[:8]}", timestamp="", metrics=cast(Any, metrics)
        )
        message = event.to_message()
        messages.append((message["channel"], message["event"], message["data"], ""))
    streams = RedisStreams(settings.REDIS_URL or "")
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    if (await loop.run_in_executor(None, sys.stdin.readline)).strip() != "GO":
        raise SystemExit("expected GO")
    first = time.time()
    start = loop.time()
    sent = 0
    while sent < args.events:
        due = min(int((loop.time() - start) * args.rate) + 1, args.events, sent + 200)
        if due > sent:
            await streams.publish(messages[sent:due])
            sent = due
        else:
            await asyncio.sleep(start + sent / args.rate - loop.time())
    seconds = loop.time() - start
    last = time.time()
    await streams.close()
    done = {
        "first_publish": first,
        "last_publish": last,
        "published_rate": round(args.events / seconds, 1) if seconds > 0 else args.events,
    }
    print("DONE " + json.dumps(done), flush=True)


# -- where the time of one received event goes (``cluster.py breakdown``) -----------------------


def breakdown_main(args: argparse.Namespace) -> None:
    """In this process, on this checkout: the CPU of each step of receiving one event, per
    event, for replies of ``--per-read`` entries: the whole read (command, reply, entries),
    parsing the reply alone, routing and keeping the entries, and decoding a payload (what
    an event a local subscriber wants costs on top)."""
    import django

    sys.path.insert(0, str(REPO))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sysmanage.settings")
    os.environ["REDIS_URL"] = args.redis_url
    django.setup()
    from django.conf import settings

    settings.STREAM_KEY_PREFIX = f"bench-breakdown-{secrets.token_hex(4)}:stream"
    settings.STREAM_HISTORY = {"default": {"size": 100_000, "seconds": 600}}
    asyncio.run(_breakdown(args))


async def _breakdown(args: argparse.Namespace) -> None:
    import json as json_module

    from loadgen import sample_metrics

    from hosts.events import HostMetricsReported
    from sysmanage import resp, streams
    from sysmanage.hub import Hub
    from sysmanage.protocol import StreamPosition

    source = streams.RedisStreams(args.redis_url)
    events = args.events
    rng = random.Random(7)
    hosts = [str(uuid.uuid4()) for _ in range(100)]
    batch = []
    for seq in range(events):
        metrics = cast(Any, {**sample_metrics(rng), "bench_seq": seq})
        message = HostMetricsReported(
            host_id=hosts[seq % 100], hostname="h", timestamp="t", metrics=metrics
        ).to_message()
        batch.append((message["channel"], message["event"], message["data"], "t"))
    try:
        head = (await source.heads(["host_metrics"]))["host_metrics"]
        for start in range(0, events, 200):
            await source.publish(batch[start : start + 200])
        hub, recent = Hub(), streams.Recent()
        key = streams.stream_keys("host_metrics")[0].encode()
        for per_read in args.per_read:
            streams.READ_BATCH = per_read
            taken, began = 0, time.process_time()
            while taken < events:
                position = StreamPosition(head.epoch, head.offset + taken)
                for _, entries in await source.read_new({"host_metrics": position}, 10):
                    for entry in entries:
                        hub.dispatch_entry(entry)
                        recent.add(entry)
                    taken += len(entries)
            whole = (time.process_time() - began) / events * 1e6
            print(f"{per_read} events per read: {whole:.1f} µs per event, all of it")
        command = [b"XREAD", b"COUNT", b"25", b"STREAMS", key, b"0-0"]
        conn = resp.Connection(args.redis_url)
        await conn.execute([b"PING"])
        assert conn._writer is not None
        assert conn._reader is not None
        conn._writer.write(resp.pack(command))
        await asyncio.sleep(0.2)
        raw = await conn._reader.read(1 << 20)
        await conn.close()

        def per_entry(label: str, step: Any, reps: int = 2000) -> None:
            began = time.process_time()
            for _ in range(reps):
                step()
            print(f"  {label}: {(time.process_time() - began) / reps / 25 * 1e6:.2f} µs")

        def parse() -> Any:
            reply = resp.StreamsReply()
            reply.feed(raw)
            return reply.value

        print("per entry, replies of 25 entries:")
        per_entry("parse the reply (sysmanage.resp.StreamsReply)", parse)
        per_entry("parse it element by element (sysmanage.resp.parse)", lambda: resp.parse(raw))
        entries = parse()[0][1]
        per_entry("build the entries", lambda: streams.read_entries("host_metrics", entries))
        built = streams.read_entries("host_metrics", entries)
        per_entry("route (no local subscriber)", lambda: [hub.dispatch_entry(e) for e in built])

        def keep() -> None:
            for entry in built:
                recent.add(entry)

        per_entry("keep for resumes", keep)
        payloads = [fields[-1] for _, fields in entries]
        per_entry("decode the payload (JSON)", lambda: [json_module.loads(p) for p in payloads])
    finally:
        for channel_keys in [streams.stream_keys("host_metrics")]:
            await source.redis.delete(*channel_keys)
        await source.close()


# -- report -----------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    lines = [" | ".join(HEADER), " | ".join("---" for _ in HEADER)]
    lines += [" | ".join(row.cells()) for row in rows]
    return "\n".join(lines)


def placement(args: argparse.Namespace) -> Placement:
    """Servers on the last core, the load generator on the first (two cores or more)."""
    cores = sorted(os.sched_getaffinity(0))
    if args.no_pin or len(cores) < 2:
        return Placement(None, None)
    return Placement(servers=cores[-1], generator=cores[0])


def targets(rows: list[Row], args: argparse.Namespace) -> list[Target]:
    """The issue's targets, judged on this checkout's rows."""
    mine = [r for r in rows if r.revision == "current"]
    found = []
    for rate in args.rates:
        at = [r for r in mine if r.rate == rate]
        if at:
            worst = max(max(r.us_per_event) for r in at)
            found.append(
                Target(f"µs per received event per process at {rate:.0f}/s", round(worst), 50)
            )
    big = [r for r in mine if r.processes >= 4 and r.rate >= 5000]
    for row in big:
        # sustained: published at that rate, and every process had every event within a
        # second of the last one's publication (else: what the slowest process took in)
        took = row.published_rate if row.kept_up else min(row.received_rate, default=0.0)
        found.append(
            Target(
                f"{row.processes} processes sustain distinct events/s (each receives all)",
                round(took),
                5000,
                op=">=",
            )
        )
    return found


def ratios(rows: list[Row]) -> list[str]:
    """2 processes against 1, per revision and rate: the events/s each took in (the slower
    process; 1.0 when both kept up with the publisher), and what the servers' core could
    take in at the measured cost (1 / the sum of the processes' µs per event)."""
    lines = []
    for revision in dict.fromkeys(r.revision for r in rows):
        for rate in dict.fromkeys(r.rate for r in rows):
            one = [r for r in rows if (r.revision, r.rate, r.processes) == (revision, rate, 1)]
            two = [r for r in rows if (r.revision, r.rate, r.processes) == (revision, rate, 2)]
            if not one or not two:
                continue
            if all(r.received_rate for r in one + two):
                a = sum(min(r.received_rate) for r in one) / len(one)
                b = sum(min(r.received_rate) for r in two) / len(two)
                lines.append(
                    f"{revision} at {rate:.0f}/s: taken in by 2 processes {b:.0f}/s, "
                    f"by 1 {a:.0f}/s: ratio {b / a:.2f}"
                )
            a = sum(1e6 / max(sum(r.us_per_event), 1e-3) for r in one) / len(one)
            b = sum(1e6 / max(sum(r.us_per_event), 1e-3) for r in two) / len(two)
            lines.append(
                f"{revision} at {rate:.0f}/s: one core's capacity at the measured cost, "
                f"2 processes {b:.0f} events/s, 1 process {a:.0f}: ratio {b / a:.2f}"
            )
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    pub = commands.add_parser("publish", help="(internal) the publisher process")
    pub.add_argument("--rate", type=float, required=True)
    pub.add_argument("--events", type=int, required=True)
    pub.add_argument("--hosts", required=True)
    parts = commands.add_parser("breakdown", help="the cost of each step, in this process")
    parts.add_argument("--events", type=int, default=5000)
    parts.add_argument("--per-read", type=int, nargs="+", default=[1, 5, 25, 1000])
    parts.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rates", type=float, nargs="+", default=[1000.0])
    parser.add_argument("--seconds", type=float, default=10.0, help="publishing, per cell")
    parser.add_argument("--hosts", type=int, default=100, help="hosts the events are about")
    parser.add_argument("--subscribe", choices=("one-host", "none"), default="one-host")
    parser.add_argument("--rounds", type=int, default=1, help="repetitions of every cell")
    parser.add_argument("--drain", type=float, default=10.0, help="seconds after the last event")
    parser.add_argument(
        "--idle", type=float, default=3.0, help="seconds of idle CPU measured first, subtracted"
    )
    parser.add_argument("--no-pin", action="store_true", help="no taskset")
    parser.add_argument("--reference-ref", default=None, help="git revision to compare with")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres-url", default="postgres://postgres@127.0.0.1:5432/test")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.command == "publish":
        asyncio.run(publish_main(args))
        return 0
    if args.command == "breakdown":
        breakdown_main(args)
        return 0
    raise_fd_limit()
    where = placement(args)
    args.generator_cpu = where.generator
    if where.generator is not None:
        os.sched_setaffinity(0, {where.generator})  # this orchestrator and its sockets
    print(f"servers on core {where.servers}, publisher and sockets on core {where.generator}")
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
            for rate in args.rates:
                for processes in args.processes:
                    for label, root in revisions:
                        row = measure(root, label, processes, rate, args, where, work)
                        rows.append(row)
                        print(" | ".join(row.cells()), flush=True)
                        print(f"  {row.machine}; deliveries {row.delivered}", flush=True)
    print()
    print(table(rows))
    print()
    for text in ratios(rows):
        print(text)
    ok = print_targets(targets(rows, args))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
