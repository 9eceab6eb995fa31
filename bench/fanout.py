"""
Fan-out benchmark: the real server (Daphne + hub + Redis layer) against a bare
``websockets`` broadcast server, driven by the same load generator.

One command runs everything and stops by itself::

    .venv/bin/python bench/fanout.py --subscribers 500 --events 200 --rate 100

For each subscriber count it runs, each time on a freshly started server:

1. ``nominal``: both servers at ``--rate`` events/s;
2. ``saturation``: both servers at ``--saturation-rate`` events/s (far above what either
   delivers, so deliveries/s is the server's ceiling);
3. ``half``: both servers at half the event rate the real server sustained in (2)
   (its deliveries/s divided by the subscriber count), where p99 latency is judged.

The load generator (``bench/loadgen.py``) runs as two processes, both separate from
the server: one holding every subscriber, one publisher; the real server gets its
events through Redis exactly as it would from another server process.  Server RSS is
read before and after the subscribers connect; CPU time of the server, of the load
generator and of the whole machine is read over the publish-and-deliver window, so a
reader can tell which side was the bottleneck, how much server CPU one delivery costs,
and whether something else was using the machine.

``--reference-ref REV`` also measures the real server of another revision in the same
run, to see what a change costs::

    .venv/bin/python bench/fanout.py --subscribers 100,500 --reference-ref e07fd36

The revision is checked out into a temporary ``git worktree`` (removed at the end) with
a database and a Redis prefix of its own; its server and its own load generator run
from there (each version's publisher sends events the way that version's servers read
them).  The new and the reference server take turns, the order swapped at every step,
so that the machine's noise falls on both alike; a second table gives new/reference
for deliveries/s, server CPU per delivery and latency, judged against
``--history-budget``.

Needs Redis on 127.0.0.1:6379 (``--redis-url``); targets only loopback addresses.
See docs/benchmarks.md for how to read the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
from _common import (  # bench/ is on sys.path when run
    MachineWindow,
    Target,
    print_targets,
    reference_worktree,
)

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PYTHON = sys.executable
LOOPBACK = "127.0.0.1"

#: Creates the benchmark's user and enrolls its hosts in the fresh database; prints
#: each host's id, name and agent token.
SETUP_SCRIPT = """
import json, os
from django.contrib.auth import get_user_model
from hosts.services import host_register
get_user_model().objects.create_user(
    username="bench", password=os.environ["BENCH_PASSWORD"], is_staff=True)
hosts = []
for i in range(int(os.environ["BENCH_HOSTS"])):
    host, token = host_register(hostname=f"bench-host-{i:03d}")
    hosts.append({"host_id": str(host.id), "hostname": host.hostname, "token": token})
print("HOSTS", json.dumps(hosts))
"""


class BenchError(RuntimeError):
    """A run could not be carried out (a process failed or timed out)."""


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[Any], timeout: float) -> None:
    """Return once ``port`` accepts connections; fail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5):
            return
        time.sleep(0.1)
    raise BenchError(f"nothing listened on port {port} within {timeout:.0f}s")


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """Terminate ``proc`` (and kill it if it lingers); bounded by ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def events_for(deliveries: int, subscribers: int, hosts: int) -> int:
    """Events of a run that makes about ``deliveries`` deliveries: a multiple of
    ``hosts`` (each host's agent sends as many), at least ten per host."""
    per_host = max(10, round(deliveries / subscribers))
    return per_host * hosts


GC_PAUSE = re.compile(r"paused the process for ([\d.]+) ms")


def gc_pauses(log: Path) -> list[float]:
    """The collection pauses a server logged so far (``sysmanage.gcwatch``), ms."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return [float(found) for found in GC_PAUSE.findall(text)]


def wait_until_quiet(limit: float, wait: float) -> float:
    """Wait up to ``wait`` seconds until the machine's CPU use (% of one core, all cores
    summed) is at most ``limit``; return the last reading."""
    deadline = time.monotonic() + wait
    while True:
        busy = psutil.cpu_percent(interval=1.0) * (psutil.cpu_count() or 1)
        if busy <= limit or time.monotonic() >= deadline:
            return round(busy, 1)


class RedisUsage:
    """CPU time the Redis server spent over a window, in all and per command (from
    ``INFO cpu`` and ``INFO commandstats``, to the microsecond).  Redis is shared: what
    other clients of it did meanwhile is counted too."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=5)
        self.start = self._sample()

    def _sample(self) -> tuple[float, dict[str, tuple[int, int]]]:
        cpu = self.client.info("cpu")
        commands = {
            name.removeprefix("cmdstat_"): (int(stats["calls"]), int(stats["usec"]))
            for name, stats in self.client.info("commandstats").items()
        }
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), commands

    def used(self) -> tuple[float, dict[str, tuple[int, int]]]:
        """CPU seconds since the window opened, and (calls, microseconds) per command."""
        cpu0, commands0 = self.start
        cpu1, commands1 = self._sample()
        self.client.close()
        delta = {}
        for name, (calls, usec) in commands1.items():
            calls0, usec0 = commands0.get(name, (0, 0))
            if calls > calls0:
                delta[name] = (calls - calls0, usec - usec0)
        return cpu1 - cpu0, delta


def raise_open_file_limit() -> None:
    """Let this process and its children hold thousands of sockets."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@dataclass
class Server:
    """A started server under test."""

    kind: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    token: str = ""


class CpuWindow:
    """CPU seconds used by some processes and by the whole machine over a window."""

    def __init__(self, procs: dict[str, psutil.Process]) -> None:
        self.procs = procs
        self.start = self._sample()
        #: the length of the window, seconds (set by :meth:`percentages`)
        self.span = 0.0

    def _sample(self) -> tuple[float, dict[str, float], float]:
        machine = psutil.cpu_times()
        busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        used: dict[str, float] = {}
        for name, proc in self.procs.items():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                used[name] = times.user + times.system
        return time.monotonic(), used, busy

    def percentages(self) -> dict[str, float]:
        """Percent of one core used since the window opened, per process and ``machine``."""
        t0, used0, busy0 = self.start
        t1, used1, busy1 = self._sample()
        span = self.span = max(t1 - t0, 1e-6)
        result = {
            name: 100.0 * (used1.get(name, used0[name]) - used0[name]) / span for name in used0
        }
        result["machine"] = 100.0 * (busy1 - busy0) / span
        return {k: round(v, 1) for k, v in result.items()}


@dataclass
class Build:
    """One version of the real server: the checkout it runs from, its environment (own
    database and Redis prefix) and the benchmark host in its database."""

    kind: str
    root: Path
    revision: str
    env: dict[str, str]
    #: the JSON file listing the enrolled hosts (bench/loadgen.py ``--hosts-file``)
    hosts_file: Path | None = None


def git(*args: str) -> str:
    """Run git in this repository; return its output."""
    done = subprocess.run(
        ["git", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


class Bench:
    """Owns the temporary directory, the databases and every process of a benchmark."""

    def __init__(
        self, options: argparse.Namespace, workdir: Path, reference: tuple[Path, str] | None
    ) -> None:
        self.options = options
        self.workdir = workdir
        self.prefix = f"sysmanage-bench-{uuid.uuid4().hex[:12]}"
        self.password = secrets.token_urlsafe(16)
        self.runs = 0
        self.secret_key = secrets.token_urlsafe(50)
        self.builds = {"real": self._build("real", REPO, git("rev-parse", "--short", "HEAD"))}
        if reference is not None:
            self.builds["ref"] = self._build("ref", *reference)

    def _build(self, kind: str, root: Path, revision: str) -> Build:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "sysmanage.settings",
            "DATABASE_URL": f"sqlite:///{self.workdir / f'{kind}.sqlite3'}",
            "SYSMANAGE_VAR_DIR": str(self.workdir / f"{kind}-var"),
            "DJANGO_SECRET_KEY": self.secret_key,
            "REDIS_URL": self.options.redis_url,
            "SYSMANAGE_REDIS_PREFIX": f"{self.prefix}-{kind}",
            "JWT_ACCESS_TTL_SECONDS": "7200",
            # Every subscriber socket of the benchmark is the same user's.
            "WS_MAX_SOCKETS_PER_USER": "0",
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
            "BENCH_PASSWORD": self.password,
            "BENCH_HOSTS": str(self.options.hosts),
            # One agent per host sends every report of its host: above the per-agent
            # rate limit at saturation, which the benchmark does not measure.
            "AGENT_RATE_LIMIT_PER_SECOND": "1000000",
            "AGENT_RATE_LIMIT_BURST": "1000000",
            "GC_PAUSE_LOG_MS": str(self.options.gc_log_ms),
            "PYTHONUNBUFFERED": "1",
        }
        for name in (
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
        ):
            env.pop(name, None)
        return Build(kind, root, revision, env)

    # -- setup ----------------------------------------------------------------------------

    def prepare_databases(self) -> None:
        """Migrate each build's fresh SQLite database (with its own code) and create the
        user and the host."""
        for build in self.builds.values():
            manage = [PYTHON, str(build.root / "manage.py")]
            self._run(build, [*manage, "migrate", "--noinput", "-v", "0"], timeout=300)
            output = self._run(build, [*manage, "shell", "-c", SETUP_SCRIPT], timeout=300)
            hosts = next(
                (json.loads(line[6:]) for line in output.splitlines() if line.startswith("HOSTS ")),
                None,
            )
            if not hosts:
                raise BenchError(f"setup printed no hosts:\n{output}")
            build.hosts_file = self.workdir / f"{build.kind}-hosts.json"
            build.hosts_file.write_text(json.dumps(hosts))
            # The bare server takes an agent's token for its host id.
            bare = [{**h, "token": h["host_id"]} for h in hosts]
            (self.workdir / "bare-hosts.json").write_text(json.dumps(bare))
            (self.workdir / "bare-1-hosts.json").write_text(json.dumps(bare[:1]))

    def _run(self, build: Build, command: list[str], timeout: float) -> str:
        done = subprocess.run(
            command,
            cwd=build.root,
            env=build.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"{' '.join(command[:3])} failed:\n{done.stderr[-3000:]}")
        return done.stdout

    def build_for(self, kind: str) -> Build:
        """The build a server of ``kind`` runs (``bare`` runs from this checkout)."""
        return self.builds["ref" if kind == "ref" else "real"]

    # -- servers --------------------------------------------------------------------------

    def start_server(self, kind: str) -> Server:
        """Start a fresh server of ``kind`` (``bare``, ``real`` or ``ref``) on a free port."""
        self.runs += 1
        busy = self.wait_until_quiet()
        if busy > self.options.quiet_below:
            print(
                f"  (machine still {busy:.0f}% busy with other processes; measuring anyway)",
                flush=True,
            )
        build = self.build_for(kind)
        port = free_port()
        log = self.workdir / f"{self.runs:02d}-{kind}-server.log"
        if kind == "bare":
            command = [PYTHON, str(BENCH / "bare_server.py"), "--port", str(port)]
        else:
            command = [
                PYTHON,
                "-m",
                "sysmanage.serve",
                "-b",
                LOOPBACK,
                "-p",
                str(port),
                self.options.asgi_app,
            ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command,
                cwd=build.root,
                env=build.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server(kind, proc, f"ws://{LOOPBACK}:{port}", log)
        try:
            wait_for_port(port, proc, timeout=60)
            if kind != "bare":
                server.token = self._token(port)
        except BaseException:
            stop_process(proc)
            raise
        return server

    def _token(self, port: int) -> str:
        body = json.dumps({"username": "bench", "password": self.password}).encode()
        request = urllib.request.Request(
            f"http://{LOOPBACK}:{port}/api/token/",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=30) as response:
            return str(json.load(response)["access"])

    # -- one run --------------------------------------------------------------------------

    def run(
        self,
        kind: str,
        label: str,
        subscribers: int,
        rate: float,
        round_: int = 1,
        path: str = "e2e",
        hosts: int | None = None,
    ) -> Row:
        """Start a server, drive it with the load generator once, stop everything.

        ``path`` is how events reach the server: ``e2e`` from agents on ``/ws/agent``,
        ``inject`` straight into its channel streams (the bare server: ``/publish``).
        ``hosts=1`` puts every subscriber on one host (the calibration run).
        """
        options = self.options
        build = self.build_for(kind)
        hosts_file = self.hosts_file(kind, hosts == 1)
        server = self.start_server(kind)
        logs = self.workdir / f"{self.runs:02d}-{kind}"
        hosts = hosts or options.hosts
        events = events_for(options.deliveries, subscribers, hosts)
        deadline = options.connect_timeout + events / rate + options.drain_timeout + 120
        loadgen = [PYTHON, str(BENCH / "loadgen.py")]
        shared = [
            "--mode",
            "bare" if kind == "bare" else "real",
            "--url",
            server.url,
            "--events",
            str(events),
            "--hosts-file",
            str(hosts_file),
            "--deadline",
            str(deadline),
            "--connect-timeout",
            str(options.connect_timeout),
            "--drain-timeout",
            str(options.drain_timeout),
        ]
        server_ps = psutil.Process(server.proc.pid)
        children: list[Child] = []
        try:
            time.sleep(options.settle)
            rss_before = server_ps.memory_info().rss
            subs = Child.spawn(
                [
                    *loadgen,
                    "subscribe",
                    *shared,
                    "--subscribers",
                    str(subscribers),
                    "--client",
                    options.client,
                    "--token",
                    server.token,
                ],
                build.root,
                build.env,
                Path(f"{logs}-subscribers.log"),
            )
            children.append(subs)
            subs.expect("READY", options.connect_timeout + 30)
            role = "agents" if path == "e2e" else "publish"
            pub = Child.spawn(
                [*loadgen, role, *shared, "--rate", str(rate)],
                build.root,
                build.env,
                Path(f"{logs}-{role}.log"),
            )
            children.append(pub)
            pub.expect("READY", options.connect_timeout + 30)
            time.sleep(options.settle)
            rss_after = server_ps.memory_info().rss
            gc_before = gc_pauses(server.log)
            profiler = self._start_profiler(server, f"{path}-{label}", subscribers, round_)
            machine = MachineWindow(own=[server.proc.pid])
            cpu = CpuWindow(
                {
                    "server": server_ps,
                    "subscribers": psutil.Process(subs.proc.pid),
                    "publisher": psutil.Process(pub.proc.pid),
                }
            )
            redis_usage = RedisUsage(options.redis_url)
            pub.say("GO", {})
            done = pub.expect("DONE", events / rate + options.drain_timeout + 120)
            subs.say("PUBLISHED", done)
            subs.expect("DRAINED", deadline)
            usage = cpu.percentages()
            redis_seconds, redis_commands = redis_usage.used()
            usage["redis"] = round(100.0 * redis_seconds / cpu.span, 1)
            window = machine.report()
            if path == "e2e":  # the agents' refusals, read once the window closed
                pub.say("REPORT", {})
                done.update(pub.expect("ERRORS", options.drain_timeout + 30))
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                children.append(Child(profiler, queue.Queue(), self.workdir / "py-spy.log"))
            result = subs.expect("RESULT", 30)
            for child in children:
                child.proc.wait(30)
            if server.proc.poll() is not None:
                raise BenchError(f"{kind} server died:\n{tail(server.log)}")
            pauses = gc_pauses(server.log)[len(gc_before) :]
        finally:
            for child in children:
                stop_process(child.proc, grace=5)
            stop_process(server.proc)
        result["published_rate"] = done["published_rate"]
        result["publish_errors"] = int(done.get("errors", 0))
        result["redis_seconds"] = redis_seconds
        result["window_seconds"] = cpu.span
        result["redis_commands"] = redis_commands
        result["rate"] = rate
        result["path"] = path if hosts != 1 else "calib"
        result["hosts"] = hosts
        result["machine"] = window
        result["gc_max_ms"] = max(pauses, default=None)
        result["gc_over"] = sum(1 for p in pauses if p > options.gc_pause_target)
        return Row.build(kind, label, result, rss_before, rss_after, usage, round_)

    def hosts_file(self, kind: str, alone: bool) -> Path:
        """The hosts file of a server of ``kind`` (the first host ``alone``: calibration)."""
        if kind == "bare":
            return self.workdir / ("bare-1-hosts.json" if alone else "bare-hosts.json")
        found = self.build_for(kind).hosts_file
        assert found is not None  # prepare_databases wrote it
        assert not alone  # one host alone: the bare server's calibration only
        return found

    def _start_profiler(
        self, server: Server, label: str, subscribers: int, round_: int
    ) -> subprocess.Popen[str] | None:
        """Sample the server with py-spy over the publish window, if ``--profile`` asks."""
        directory: Path | None = self.options.profile
        if directory is None or server.kind not in self.options.profile_servers:
            return None
        directory.mkdir(parents=True, exist_ok=True)
        output = directory / f"{server.kind}-{label}-{subscribers}-r{round_}.txt"
        py_spy = Path(PYTHON).parent / "py-spy"
        with (self.workdir / "py-spy.log").open("a") as log:
            proc = subprocess.Popen(
                [
                    str(py_spy),
                    "record",
                    "--pid",
                    str(server.proc.pid),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(output),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        time.sleep(1.0)  # py-spy attaches before the first event
        return proc

    def wait_until_quiet(self) -> float:
        """Wait (bounded) until other processes leave the CPUs idle; return their busy %."""
        return wait_until_quiet(self.options.quiet_below, self.options.quiet_wait)

    def cleanup_redis(self) -> None:
        """Delete the keys this benchmark's channel layers and streams left in Redis (a
        unique prefix per build, all starting with :attr:`prefix`)."""
        with contextlib.suppress(redis.RedisError):
            client = redis.Redis.from_url(self.options.redis_url, socket_timeout=5)
            keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


@dataclass
class Child:
    """A load generator process and the protocol lines it prints (see bench/loadgen.py)."""

    proc: subprocess.Popen[str]
    lines: queue.Queue[str | None]
    log: Path

    @classmethod
    def spawn(cls, command: list[str], cwd: Path, env: dict[str, str], log: Path) -> Child:
        """Start ``command`` in ``cwd`` with ``env``, its stderr in ``log`` and its stdout
        read line by line."""
        with log.open("w") as err:
            proc = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        return cls(proc, lines, log)

    def say(self, tag: str, payload: dict[str, Any]) -> None:
        """Send one protocol line to the process."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{tag} {json.dumps(payload)}\n")
        self.proc.stdin.flush()

    def expect(self, tag: str, timeout: float) -> dict[str, Any]:
        """Wait for the process's ``tag`` line and return its JSON payload."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(
                    f"no {tag} from {self.log.name} within {timeout:.0f}s:\n{tail(self.log)}"
                )
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise BenchError(f"{self.log.name}: exited before {tag}:\n{tail(self.log)}")
            head, _, payload = line.partition(" ")
            if head == tag:
                return dict(json.loads(payload or "{}"))


# -- results ----------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table."""

    server: str
    label: str
    subscribers: int
    events: int
    rate: float
    published_rate: float
    deliveries_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    lost: int
    mean_bytes: float | None
    server_cpu: float
    server_us_per_delivery: float | None
    loadgen_cpu: float
    other_cpu: float
    kb_per_conn: float
    rss_before_mb: float
    rss_after_mb: float
    connect_seconds: float
    ratio: float | None = None
    closed_early: int = 0
    duplicates: int = 0
    round: int = 1
    redis_cpu: float | None = None
    redis_us_per_event: float | None = None
    #: the publisher process's CPU per event (what publishing costs the process that
    #: publishes: in a deployment, a server process)
    publisher_us_per_event: float | None = None
    #: the five commands Redis spent most time on: calls, microseconds per event
    redis_commands: dict[str, str] = field(default_factory=dict)
    #: how events reached the server: ``e2e`` (agents), ``inject`` (the streams), ``calib``
    path: str = "e2e"
    hosts: int = 1
    #: reports or events the server refused (``error`` replies to the agents)
    publish_errors: int = 0
    #: the longest collection pause the server logged over the window (ms; None: none
    #: over ``--gc-log-ms``), and how many exceeded ``--gc-pause-target``
    gc_max_ms: float | None = None
    gc_over: int = 0
    #: the machine over the window (``_common.MachineWindow``)
    machine: str = ""

    @property
    def publisher_bound(self) -> bool:
        """Whether the server delivered (nearly) everything the publisher offered: then
        deliveries/s is the publisher's rate times the subscribers, not the server's
        ceiling."""
        return self.deliveries_per_s >= 0.9 * self.published_rate * self.subscribers

    @classmethod
    def build(
        cls,
        kind: str,
        label: str,
        result: dict[str, Any],
        rss_before: int,
        rss_after: int,
        usage: dict[str, float],
        round_: int = 1,
    ) -> Row:
        """Combine the load generator's result with the orchestrator's measurements."""
        subscribers = int(result["subscribers"])
        events = max(int(result["events"]), 1)
        loadgen = round(usage.get("subscribers", 0.0) + usage.get("publisher", 0.0), 1)
        return cls(
            server=kind,
            label=label,
            subscribers=subscribers,
            events=int(result["events"]),
            rate=float(result["rate"]),
            published_rate=float(result["published_rate"]),
            deliveries_per_s=float(result["deliveries_per_s"]),
            p50_ms=result["p50_ms"],
            p99_ms=result["p99_ms"],
            lost=int(result["lost"]),
            mean_bytes=result["mean_bytes"],
            server_cpu=usage.get("server", 0.0),
            loadgen_cpu=loadgen,
            # server CPU seconds over the window / deliveries in it
            server_us_per_delivery=round(
                usage.get("server", 0.0)
                * float(result["window_seconds"])
                * 1e4
                / int(result["received"]),
                2,
            )
            if int(result["received"]) > 0
            else None,
            other_cpu=max(
                0.0,
                round(
                    usage["machine"] - usage.get("server", 0.0) - loadgen - usage.get("redis", 0.0),
                    1,
                ),
            ),
            redis_cpu=usage.get("redis"),
            redis_us_per_event=round(float(result["redis_seconds"]) * 1e6 / events, 1),
            publisher_us_per_event=round(
                usage.get("publisher", 0.0) * float(result["window_seconds"]) * 1e4 / events, 1
            ),
            redis_commands={
                name: f"{calls} calls, {usec / events:.1f} us/event"
                for name, (calls, usec) in sorted(
                    result["redis_commands"].items(), key=lambda item: -item[1][1]
                )[:5]
            },
            kb_per_conn=round((rss_after - rss_before) / 1024 / max(subscribers, 1), 1),
            rss_before_mb=round(rss_before / 2**20, 1),
            rss_after_mb=round(rss_after / 2**20, 1),
            connect_seconds=float(result["connect_seconds"]),
            closed_early=int(result.get("closed_early", 0)),
            duplicates=int(result.get("duplicates", 0)),
            round=round_,
            path=str(result.get("path", "e2e")),
            hosts=int(result.get("hosts", 1)),
            publish_errors=int(result.get("publish_errors", 0)),
            gc_max_ms=result.get("gc_max_ms"),
            gc_over=int(result.get("gc_over", 0)),
            machine=str(result.get("machine", "")),
        )


COLUMNS: list[tuple[str, str, int]] = [
    ("round", "#", 2),
    ("path", "path", 6),
    ("server", "server", 6),
    ("label", "run", 10),
    ("subscribers", "subs", 5),
    ("hosts", "hosts", 5),
    ("events", "events", 6),
    ("rate", "rate/s", 7),
    ("published_rate", "pub/s", 7),
    ("deliveries_per_s", "deliv/s", 8),
    ("p50_ms", "p50 ms", 7),
    ("p99_ms", "p99 ms", 7),
    ("lost", "lost", 6),
    ("gc_max_ms", "gc ms", 5),
    ("mean_bytes", "msg B", 5),
    ("server_cpu", "srv%", 5),
    ("server_us_per_delivery", "srv us/del", 10),
    ("loadgen_cpu", "gen%", 5),
    ("publisher_us_per_event", "pub us/ev", 9),
    ("redis_cpu", "rds%", 5),
    ("redis_us_per_event", "rds us/ev", 9),
    ("other_cpu", "oth%", 5),
    ("kb_per_conn", "KB/conn", 7),
    ("ratio", "x/bare", 6),
]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


def table(rows: list[Row]) -> str:
    """The results as a Markdown table (readable as plain text too)."""
    head = "| " + " | ".join(title.rjust(width) for _, title, width in COLUMNS) + " |"
    rule = "|" + "|".join("-" * (width + 1) + ":" for _, _, width in COLUMNS) + "|"
    body = [
        "| " + " | ".join(_cell(getattr(row, key)).rjust(width) for key, _, width in COLUMNS) + " |"
        for row in rows
    ]
    return "\n".join([head, rule, *body])


def add_ratios(rows: list[Row]) -> None:
    """Set x/bare deliveries/s on each real and reference row that has a bare run of the
    same kind in its round."""
    bare = {(r.round, r.path, r.subscribers, r.label): r for r in rows if r.server == "bare"}
    for row in rows:
        match = bare.get((row.round, row.path, row.subscribers, row.label))
        if row.server != "bare" and match is not None and match.deliveries_per_s > 0:
            row.ratio = round(row.deliveries_per_s / match.deliveries_per_s, 2)


def _twin(rows: list[Row], row: Row, server: str) -> Row | None:
    """The run of ``server`` with the same round, subscriber count and kind as ``row``."""
    return next(
        (
            r
            for r in rows
            if r.server == server
            and r.round == row.round
            and r.path == row.path
            and r.label == row.label
            and r.subscribers == row.subscribers
        ),
        None,
    )


def targets(rows: list[Row], options: argparse.Namespace) -> Iterator[Target]:
    """The issue's targets, one per real run that judges one (e2e rows; inject rows are
    shown for comparison only), and the load generator's calibration."""
    for row in rows:
        if row.path == "calib":
            yield Target(
                f"load generator takes from the bare server ({row.subscribers} subscribers "
                "on one host)",
                row.deliveries_per_s,
                options.calibration_target,
                " deliveries/s",
                ">=",
            )
            continue
        if row.server != "real" or row.path != "e2e":
            continue
        n = row.subscribers
        if row.label == "saturation" and row.ratio is not None:
            yield Target(
                f"{n} subscribers: real/bare deliveries/s at saturation",
                row.ratio,
                options.ratio_target,
                "",
                ">=",
            )
        if row.label == "half" and row.p99_ms is not None:
            yield Target(
                f"{n} subscribers: p99 at half the saturated rate ({row.rate:g} events/s)",
                row.p99_ms,
                options.p99_target,
                " ms",
            )
        yield Target(f"{n} subscribers, {row.label}: lost", row.lost, 0)
        if row.label == "half":  # at saturation the backlog grows the heap without bound
            yield Target(
                f"{n} subscribers, half: collection pauses over {options.gc_pause_target:g} ms",
                row.gc_over,
                0,
            )


def cost_lines(rows: list[Row]) -> Iterator[str]:
    """Server CPU per delivery, real against bare, per path and subscriber count."""
    for row in rows:
        if row.server != "real" or row.label != "saturation":
            continue
        bare = _twin(rows, row, "bare")
        if bare is not None and bare.server_us_per_delivery and row.server_us_per_delivery:
            yield (
                f"{row.path} {row.subscribers} subscribers: server CPU per delivery at "
                f"saturation real {row.server_us_per_delivery:.1f} us, bare "
                f"{bare.server_us_per_delivery:.1f} us (bare/real "
                f"{bare.server_us_per_delivery / row.server_us_per_delivery:.2f})"
            )


# -- new against reference -------------------------------------------------------------------


def _ratio(new: float | None, ref: float | None) -> float | None:
    if new is None or ref is None or ref == 0:
        return None
    return round(new / ref, 2)


#: (title, figure of a row) of the comparison table, each shown new, reference, new/ref
COMPARED: list[tuple[str, str]] = [
    ("deliv/s", "deliveries_per_s"),
    ("srv us/del", "server_us_per_delivery"),
    ("p50 ms", "p50_ms"),
    ("p99 ms", "p99_ms"),
    ("rds us/ev", "redis_us_per_event"),
    ("pub us/ev", "publisher_us_per_event"),
]


def pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
    """Each new-server run with the reference run of the same round, size and kind."""
    found = []
    for row in rows:
        if row.server == "real":
            ref = _twin(rows, row, "ref")
            if ref is not None:
                found.append((row, ref))
    return found


def comparison_table(matched: list[tuple[Row, Row]]) -> str:
    """New against reference, side by side, with the ratio new/reference of each figure."""
    head = ["#", "subs", "run", "rate/s"]
    for title, _ in COMPARED:
        head += [f"{title} new", f"{title} ref", "new/ref"]
    head += ["lost new/ref", "srv% new/ref", "pub-bound new/ref"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" for _ in head) + "|",
    ]
    for new, ref in matched:
        cells = [str(new.round), str(new.subscribers), new.label, _cell(new.rate)]
        for _, key in COMPARED:
            a, b = getattr(new, key), getattr(ref, key)
            cells += [_cell(a), _cell(b), _cell(_ratio(a, b))]
        cells += [
            f"{new.lost}/{ref.lost}",
            f"{_cell(new.server_cpu)}/{_cell(ref.server_cpu)}",
            "/".join("yes" if r.publisher_bound else "no" for r in (new, ref)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_verdicts(matched: list[tuple[Row, Row]], budget: float) -> Iterator[str]:
    """Per subscriber count, at saturation: what the new version keeps of the reference's
    fan-out throughput, by deliveries/s and by server CPU per delivery (the figure that
    contention distorts least), against ``budget`` (the share it may cost)."""
    floor = 1.0 - budget
    sizes = sorted({new.subscribers for new, _ in matched})
    for n in sizes:
        saturated = [(a, b) for a, b in matched if a.subscribers == n and a.label == "saturation"]
        by_rate = [
            r
            for r in (_ratio(a.deliveries_per_s, b.deliveries_per_s) for a, b in saturated)
            if r is not None
        ]
        by_cpu = [
            r
            for r in (
                _ratio(b.server_us_per_delivery, a.server_us_per_delivery) for a, b in saturated
            )
            if r is not None
        ]
        for what, ratios in (
            ("deliveries/s new/ref", by_rate),
            ("deliveries per server CPU second new/ref (ref us/del / new us/del)", by_cpu),
        ):
            if not ratios:
                continue
            middle = statistics.median(ratios)
            ok = "met" if middle >= floor else "NOT met"
            shown = ", ".join(f"{r:.2f}" for r in ratios)
            yield (
                f"{n} subscribers, saturation: {what} {middle:.2f} (median of {shown}; "
                f"target >= {floor:.2f}, history costing at most {budget:.0%}): {ok}"
            )
        bound = sum(1 for a, b in saturated if a.publisher_bound or b.publisher_bound)
        if bound:
            yield (
                f"{n} subscribers, saturation: in {bound} of {len(saturated)} pairs a "
                "server delivered all its publisher offered, so deliveries/s measures the "
                "publishers there, not the servers; judge by CPU per delivery"
            )


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Fan-out benchmark: real server vs. bare websockets broadcast."
    )
    parser.add_argument(
        "--subscribers",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[500],
        help="subscriber counts, comma-separated (500,1000)",
    )
    parser.add_argument(
        "--deliveries",
        type=int,
        default=1_000_000,
        help="deliveries per run: each run sends this many events times H/N",
    )
    parser.add_argument(
        "--hosts",
        type=int,
        default=4,
        help="hosts the events come from; subscriber i watches host i mod H, so each "
        "event goes to N/H subscribers",
    )
    parser.add_argument(
        "--paths",
        type=lambda s: [p for p in s.split(",") if p in ("e2e", "inject")],
        default=["e2e", "inject"],
        help="how events reach the servers: e2e (agents on /ws/agent), inject (straight "
        "into the channel streams; the bare server's /publish)",
    )
    parser.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="skip the load generator's calibration run",
    )
    parser.add_argument("--calibration-target", type=float, default=100_000.0)
    parser.add_argument(
        "--saturation-rate",
        type=float,
        default=20000.0,
        help="event rate of the saturation run, events/s",
    )
    parser.add_argument(
        "--client",
        choices=("raw", "standard"),
        default="raw",
        help="subscriber implementation (see bench/loadgen.py)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=5.0,
        help="a run ends this long after the last delivery seen",
    )
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="pause before reading RSS and starting to publish, seconds",
    )
    parser.add_argument(
        "--servers",
        default=None,
        type=lambda s: set(s.split(",")) & {"bare", "real", "ref"},
        help="servers to run: bare,real,ref (default bare,real, and ref with --reference-ref)",
    )
    parser.add_argument(
        "--reference-ref",
        metavar="REV",
        help="also run the real server of git revision REV (and its load generator), "
        "from a temporary worktree, alternating with this one",
    )
    parser.add_argument(
        "--history-budget",
        type=float,
        default=0.10,
        help="share of the reference's fan-out throughput the new version may cost",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the whole set of runs this many times",
    )
    parser.add_argument(
        "--asgi-app",
        default="sysmanage.asgi:application",
        help="application Daphne serves (to compare an experimental build; "
        "PYTHONPATH is passed on)",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--ratio-target", type=float, default=0.8)
    parser.add_argument("--p99-target", type=float, default=50.0, help="milliseconds")
    parser.add_argument(
        "--gc-pause-target", type=float, default=50.0, help="longest collection pause, ms"
    )
    parser.add_argument(
        "--gc-log-ms",
        type=float,
        default=5.0,
        help="the servers log collection pauses from this long (GC_PAUSE_LOG_MS)",
    )
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=20.0,
        help="before each run, wait until the machine's CPU use (%% of one "
        "core, all cores summed) is at most this",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="wait at most this many seconds for a quiet machine",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record py-spy samples of the server over each publish window "
        "into DIR (collapsed stacks, one file per run)",
    )
    parser.add_argument(
        "--profile-servers",
        default="real",
        type=lambda s: set(s.split(",")),
        help="which servers to profile (bare, real, ref)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (database and logs)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the whole benchmark and print the table; 0 when every run completed, else 1."""
    options = parse_args(argv)
    if not options.redis_url.startswith(("redis://127.", "redis://localhost")):
        raise SystemExit("--redis-url must point to a loopback address")
    if options.servers is None:
        options.servers = {"bare", "real"} | ({"ref"} if options.reference_ref else set())
    if "ref" in options.servers and not options.reference_ref:
        raise SystemExit("--servers ref needs --reference-ref")
    if not options.servers:
        raise SystemExit("--servers names none of bare, real, ref")
    if not options.paths:
        raise SystemExit("--paths names none of e2e, inject")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_open_file_limit()
    try:
        redis.Redis.from_url(options.redis_url, socket_timeout=5).ping()
    except redis.RedisError as exc:
        raise SystemExit(f"Redis is not reachable at {options.redis_url}: {exc}") from None

    workdir = Path(tempfile.mkdtemp(prefix="sysmanage-bench-"))
    rows: list[Row] = []
    status = 0
    try:
        with contextlib.ExitStack() as stack:
            reference = None
            if options.reference_ref:
                reference = stack.enter_context(reference_worktree(options.reference_ref))
            bench = Bench(options, workdir, reference)
            try:
                run_all(bench, rows)
            except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
                print(f"benchmark stopped: {exc}", file=sys.stderr)
                status = 1
            finally:
                bench.cleanup_redis()
    except BenchError as exc:  # the reference could not be checked out
        print(f"benchmark stopped: {exc}", file=sys.stderr)
        status = 1
    finally:
        if options.keep:
            print(f"kept {workdir} (the reference worktree is removed all the same)")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        report(options, rows)
    return status


def run_all(bench: Bench, rows: list[Row]) -> None:
    """Every run, appended to ``rows`` as it completes.

    First the calibration (the bare server, every subscriber on one host, at
    saturation); then per round, subscriber count and path: saturation, then half of
    the rate the new server (else the reference, else bare) sustained there.  The new
    and the reference server alternate: their order is swapped at every step and every
    round.
    """
    options = bench.options
    names = {"real": "new", "ref": "reference"}
    print(
        f"machine: {psutil.cpu_count()} CPUs, python {sys.version.split()[0]}; "
        f"work dir {bench.workdir}; "
        + ", ".join(f"{names[k]} {b.revision} ({b.root})" for k, b in bench.builds.items()),
        flush=True,
    )
    print(f"load: {machine_load()}", flush=True)
    bench.prepare_databases()
    if options.calibrate:
        n = max(options.subscribers)
        rows.append(bench.run("bare", "saturation", n, options.saturation_rate, 0, "e2e", 1))
        _progress(rows[-1])
    pair = [k for k in ("real", "ref") if k in options.servers]
    lead = ["bare"] if "bare" in options.servers else []
    step = 0

    def order(round_: int) -> list[str]:
        """The servers of the next step: the new/reference order swapped at every step,
        and at every round (so each step has each order in turn)."""
        nonlocal step
        step += 1
        return lead + (pair if (step + round_) % 2 == 0 else pair[::-1])

    for round_ in range(1, options.rounds + 1):
        step = 0
        for n in options.subscribers:
            for path in options.paths:
                for kind in order(round_):
                    rows.append(
                        bench.run(kind, "saturation", n, options.saturation_rate, round_, path)
                    )
                    _progress(rows[-1])
                judged = (pair or lead)[0]
                saturated = (
                    rows[-1]
                    if rows[-1].server == judged
                    else next(
                        r
                        for r in reversed(rows)
                        if r.server == judged and r.label == "saturation" and r.path == path
                    )
                )
                half = round(saturated.deliveries_per_s / (n / options.hosts) / 2, 1)
                if half <= 0:
                    raise BenchError(f"the {judged} server delivered nothing at saturation")
                for kind in reversed(order(round_)):
                    rows.append(bench.run(kind, "half", n, half, round_, path))
                    _progress(rows[-1])
    print(f"load: {machine_load()}", flush=True)


def report(options: argparse.Namespace, rows: list[Row]) -> None:
    """Print the tables and the verdicts; write the JSON file if asked."""
    add_ratios(rows)
    if rows:
        print()
        print(table(rows))
        print()
        for line in cost_lines(rows):
            print(line)
        print()
        print_targets(targets(rows, options))
        matched = pairs(rows)
        if matched:
            print()
            print("new against reference:")
            print()
            print(comparison_table(matched))
            print()
            for line in comparison_verdicts(matched, options.history_budget):
                print(line)
    if options.json is not None and rows:
        options.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


def machine_load() -> str:
    """The load average and the processes busiest over the next second (what else runs)."""
    procs = list(psutil.process_iter(["name", "cmdline"]))
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.cpu_percent(None)
    time.sleep(1.0)
    busy = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            used = proc.cpu_percent(None)
            if used >= 5.0 and proc.pid != os.getpid():
                command = " ".join(proc.info["cmdline"] or [proc.info["name"] or "?"])
                busy.append((used, f"{used:.0f}% {command[:60]}"))
    one, five, fifteen = os.getloadavg()
    top = "; ".join(text for _, text in sorted(busy, reverse=True)[:5]) or "nothing above 5%"
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}; busiest: {top}"


def _progress(row: Row) -> None:
    print(
        f"  {row.path:6} {row.server:4} {row.label:10} {row.subscribers:5} subs "
        f"({row.hosts} hosts) @ {row.rate:g}/s: "
        f"{row.deliveries_per_s:.0f} deliveries/s, p99 {row.p99_ms} ms, lost {row.lost}, "
        f"refused {row.publish_errors}, longest collection {row.gc_max_ms} ms, "
        f"server CPU {row.server_cpu}% ({row.server_us_per_delivery} us/delivery), "
        f"load generator CPU {row.loadgen_cpu}%, Redis {row.redis_cpu}% "
        f"({row.redis_us_per_event} us/event: "
        + "; ".join(f"{k} {v}" for k, v in row.redis_commands.items())
        + f"), others {row.other_cpu}%",
        flush=True,
    )
    print(f"    {row.machine}", flush=True)
    if row.closed_early or row.duplicates:
        print(
            f"  WARNING: {row.closed_early} connections closed by the server, "
            f"{row.duplicates} duplicate deliveries",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
