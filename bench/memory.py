"""
Memory benchmark: what one server process spends per idle, authenticated socket.

::

    .venv/bin/python bench/memory.py --sockets 1000,5000
    .venv/bin/python bench/memory.py --sockets 19900 --kinds clients --servers real

For each socket count N and each kind of socket it starts a fresh server, opens N idle
sockets of that kind from separate load-generator processes, and reads the server's
resident memory (RSS) before and after:

``clients``
    ``/ws`` sockets opened with an access token, each subscribed to ``host_status``
    filtered on one host (a different host per socket, round robin) and to
    ``fleet_status``; the socket waits for both ``response`` messages (and takes the
    snapshots), then stays idle.
``agents``
    ``/ws/agent`` sockets of enrolled hosts, one per host: ``hello``, ``welcome``, idle.

The reference is a bare ``websockets`` server (``python bench/memory.py bare``) holding
the same sockets in the same run: it answers the same messages (a ``response`` per
``subscribe``, kept in an index by channel and host; a ``welcome`` per ``hello``, the
socket kept by its token), with websockets' defaults but no compression, as Daphne.
``--compare DIR`` also runs the real server from another checkout (``base``), to
measure a change against the code before it in one run.

Before the N sockets, ``--warmup`` sockets of the kind are opened and kept (the first
connections import and build what every later one shares); "KB/socket" is the RSS growth
from there to after the N sockets, over N.  With ``--inspect`` the real server runs
under a small wrapper (``python bench/memory.py inspect-serve …``) that writes, on
SIGUSR1, the count of garbage-collector-tracked objects by type; the benchmark then
prints the types that grew most per socket.  ``--tracemalloc`` adds the source lines
that allocated most between the two reads (this inflates RSS: its KB figures are not
comparable).

Every row carries the machine's load average and the CPU other processes used while
the sockets were held.  One process cannot hold more descriptors than its hard
``RLIMIT_NOFILE`` (printed); the load generator spreads the sockets over processes of
at most ``--per-worker`` sockets.  Needs nothing but loopback; SQLite and the in-memory
layer by default (``--redis-url`` for channels-redis).  Stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import math
import os
import queue
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from _common import (  # bench/ is on sys.path
    MachineWindow,
    Target,
    free_port,
    print_targets,
    raise_fd_limit,
    reference_worktree,
)
from websockets.asyncio.server import ServerConnection, serve
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
LOOPBACK = "127.0.0.1"
KINDS = ("clients", "agents")

#: Enrolls the hosts; makes the clients' user (staff, not a superuser, rights from a
#: group: what Django caches per user object is then what a real operator's would be);
#: prints the tokens, the host ids and an access token.
ENROLL = """
import json
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.db.models import Q
from hosts.services import host_register
from sysmanage.credentials import access_token_for
group = Group.objects.create(name="operators")
group.permissions.set(Permission.objects.filter(
    Q(codename__startswith="view_") | Q(codename__in=["run_command", "change_alert"])))
user = get_user_model().objects.create_user("bench", "bench@example.invalid", "x" * 20,
                                            is_staff=True)
user.groups.add(group)
pairs = [host_register(hostname=f"mem-{{i:05d}}") for i in range({count})]
print("ENROLLED " + json.dumps({{
    "tokens": [token for _, token in pairs],
    "host_ids": [str(host.id) for host, _ in pairs],
    "access": access_token_for(user),
}}))
"""


class BenchError(RuntimeError):
    """A run could not be carried out."""


# -- the load generator: one process holding many idle sockets ---------------------------


def client_requests(host_id: str) -> list[tuple[str, str]]:
    """What a ``/ws`` client sends once connected: each message and the id of its reply."""
    return [
        (
            json.dumps(
                {
                    "type": "subscribe",
                    "channel": "host_status",
                    "filters": {"host_id": host_id},
                    "id": "h",
                }
            ),
            "h",
        ),
        (json.dumps({"type": "subscribe", "channel": "fleet_status", "id": "f"}), "f"),
    ]


def agent_requests(index: int) -> list[tuple[str, str]]:
    """What an agent sends once connected: ``hello``, answered by ``welcome``."""
    hello = {
        "type": "hello",
        "data": {
            "hostname": f"mem-{index:05d}",
            "cpu_count": 4,
            "ip_addresses": ["192.0.2.10"],
            "os_name": "Debian GNU/Linux",
            "os_version": "12",
            "agent_version": "bench",
        },
    }
    return [(json.dumps(hello), "welcome")]


class IdleSocket(asyncio.Protocol):
    """One socket on websockets' Sans-I/O client: sends its requests one at a time, each
    after the previous reply, then stays idle (answering the server's pings)."""

    def __init__(self, url: str, headers: dict[str, str], requests: list[tuple[str, str]]):
        self.ws = ClientProtocol(parse_uri(url), max_size=2**22)
        self.headers = headers
        self.requests = list(requests)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the opening handshake."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        request = self.ws.connect()
        for name, value in self.headers.items():
            request.headers[name] = value
        self.ws.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        """Handle the handshake's answer and every frame (pings are answered by ``ws``)."""
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Response):
                if self.ws.handshake_exc is not None:
                    self._fail(f"handshake refused: {self.ws.handshake_exc}")
                else:
                    self._next()
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self._reply(bytes(event.data))
        self._flush()

    def eof_received(self) -> bool | None:
        """Let the protocol see the end of the stream."""
        self.ws.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Note a loss this process did not ask for."""
        if not self.closing:
            self.lost = True
        self._fail(f"connection lost: {exc}")

    def _reply(self, raw: bytes) -> None:
        if self.ready.done() or not self.requests:
            return
        message = json.loads(raw)
        if message.get("type") == "error":
            self._fail(f"refused: {message.get('data')}")
            return
        expected = self.requests[0][1]
        if message.get("type") == expected or (
            message.get("type") == "response" and message.get("id") == expected
        ):
            self.requests.pop(0)
            self._next()

    def _next(self) -> None:
        if self.requests:
            self.ws.send_text(self.requests[0][0].encode())
        elif not self.ready.done():
            self.ready.set_result(None)

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))

    def _flush(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        for data in self.ws.data_to_send():
            if data:
                self.transport.write(data)

    def close(self) -> None:
        """Send a close frame and drop the connection."""
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(InvalidState):
                self.ws.send_close()
                self._flush()
            self.transport.close()


def emit(tag: str, payload: dict[str, Any]) -> None:
    """One protocol line to the orchestrator."""
    sys.stdout.write(f"{tag} {json.dumps(payload)}\n")
    sys.stdout.flush()


async def hold(args: argparse.Namespace) -> None:
    """Open the sockets, report, hold them until told to close, report again."""
    setup = json.loads(Path(args.setup).read_text())
    loop = asyncio.get_running_loop()
    uri = parse_uri(args.url)
    gate = asyncio.Semaphore(args.concurrency)
    errors: collections.Counter[str] = collections.Counter()

    async def open_one(index: int) -> IdleSocket | None:
        if args.kind == "clients":
            url = f"{args.url}/ws?token={setup['access']}"
            host_ids = setup["host_ids"]
            headers: dict[str, str] = {}
            requests = client_requests(host_ids[index % len(host_ids)])
        else:
            url = f"{args.url}/ws/agent"
            headers = {"Authorization": f"Bearer {setup['tokens'][index]}"}
            requests = agent_requests(index)
        async with gate:
            try:
                async with asyncio.timeout(args.timeout):
                    _, protocol = await loop.create_connection(
                        lambda: IdleSocket(url, headers, requests), uri.host, uri.port
                    )
                    await protocol.ready
                return protocol
            except (OSError, TimeoutError) as exc:
                errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
                return None

    started = time.monotonic()
    opened = await asyncio.gather(*(open_one(args.first + i) for i in range(args.count)))
    held = [s for s in opened if s is not None]
    emit(
        "READY",
        {
            "opened": len(held),
            "failed": args.count - len(held),
            "seconds": round(time.monotonic() - started, 2),
            "errors": dict(errors.most_common(5)),
        },
    )
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if not line.startswith("CLOSE"):
        raise SystemExit(f"expected CLOSE, got {line!r}")
    lost = sum(s.lost for s in held)
    for s in held:
        s.close()
    await asyncio.sleep(0.5)
    emit("CLOSED", {"lost_while_held": lost})


# -- the reference: a bare websockets server ------------------------------------------------


class BareServer:
    """Answers what the load generator sends and keeps each socket as a server must: in a
    subscription index by channel and host, or by agent token."""

    def __init__(self) -> None:
        self.index: dict[str, dict[str | None, set[ServerConnection]]] = {}
        self.agents: dict[str, ServerConnection] = {}

    async def handle(self, conn: ServerConnection) -> None:
        """Serve one socket until it closes."""
        token = conn.request.headers.get("Authorization", "") if conn.request else ""
        subscribed: list[tuple[str, str | None]] = []
        try:
            async for raw in conn:
                message = json.loads(raw)
                if message.get("type") == "subscribe":
                    channel = str(message.get("channel"))
                    host_id = (message.get("filters") or {}).get("host_id")
                    self.index.setdefault(channel, {}).setdefault(host_id, set()).add(conn)
                    subscribed.append((channel, host_id))
                    data = {"action": "subscribe", "status": "subscribed", "channel": channel}
                    reply = {"type": "response", "channel": channel, "data": data}
                    await conn.send(json.dumps({**reply, "id": message.get("id")}))
                elif message.get("type") == "hello":
                    self.agents[token] = conn
                    await conn.send(json.dumps({"type": "welcome", "data": {}}))
        finally:
            for channel, host_id in subscribed:
                self.index[channel][host_id].discard(conn)
            if self.agents.get(token) is conn:
                del self.agents[token]


async def bare(port: int) -> None:
    """Serve on ``port`` until SIGTERM."""
    server = BareServer()
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.cancel)
    async with serve(server.handle, LOOPBACK, port, compression=None, backlog=4096):
        with contextlib.suppress(asyncio.CancelledError):
            await stop


# -- the inspecting wrapper of the real server ------------------------------------------


def where(traceback: Any) -> str:
    """Where an allocation happened: its innermost frame and, when tracemalloc kept more
    frames, the innermost ones outside asyncio, the standard library's internals and
    Twisted's reactor (``<`` reads "called from")."""
    frames = list(traceback)  # most recent call last
    inner = frames[-1]
    place = f"{inner.filename.rsplit('site-packages/', 1)[-1]}:{inner.lineno}"
    skip = ("asyncio/", "/python3.", "twisted/internet/", "daphne/server.py", "bench/")
    callers = [
        f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
        for f in reversed(frames[:-1])
        if not any(part in f.filename for part in skip)
    ]
    return " < ".join([place, *callers[:3]])


def inspect_serve(argv: list[str]) -> None:
    """Run ``sysmanage.serve`` with a SIGUSR1 handler writing object counts to the file
    named by ``BENCH_MEMORY_DUMP`` (a ``.N`` suffix per signal)."""
    target = os.environ["BENCH_MEMORY_DUMP"]
    dumps = {"n": 0}
    previous: dict[str, Any] = {}

    def dump(_signum: int, _frame: object) -> None:
        import tracemalloc

        counts: collections.Counter[str] = collections.Counter()
        sizes: collections.Counter[str] = collections.Counter()
        for o in gc.get_objects():
            name = f"{type(o).__module__}.{type(o).__qualname__}"
            counts[name] += 1
            sizes[name] += sys.getsizeof(o)
        result: dict[str, Any] = {
            "types": dict(counts),
            "sizes": dict(sizes),
            "tracked": sum(counts.values()),
            "blocks": sys.getallocatedblocks(),
        }
        if tracemalloc.is_tracing():
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            if "snapshot" in previous:
                frames = tracemalloc.get_traceback_limit()
                group = "traceback" if frames > 1 else "lineno"
                stats = snapshot.compare_to(previous["snapshot"], group)[:60]
                result["lines"] = [[where(s.traceback), s.size_diff, s.count_diff] for s in stats]
            previous["snapshot"] = snapshot
        dumps["n"] += 1
        path = Path(f"{target}.{dumps['n']}")
        path.with_suffix(".tmp").write_text(json.dumps(result))
        path.with_suffix(".tmp").rename(path)

    signal.signal(signal.SIGUSR1, dump)
    from sysmanage.serve import main as serve_main

    serve_main(argv)


# -- the orchestrator --------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """Terminate ``proc``, killing it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def tail(path: Path, lines: int = 20) -> str:
    """The end of a log file."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


@dataclass
class Child:
    """A load-generator process and the protocol lines it prints."""

    proc: subprocess.Popen[str]
    lines: queue.Queue[str | None]
    log: Path

    @classmethod
    def spawn(cls, command: list[str], env: dict[str, str], log: Path) -> Child:
        """Start ``command``, its stderr to ``log``, its stdout read line by line."""
        with log.open("w") as err:
            proc = subprocess.Popen(
                command,
                cwd=REPO,
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

    def expect(self, tag: str, timeout: float) -> dict[str, Any]:
        """Wait for the ``tag`` line and return its payload."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise BenchError(f"{self.log.name} exited before {tag}:\n{tail(self.log)}")
            head, _, payload = line.partition(" ")
            if head == tag:
                return dict(json.loads(payload or "{}"))
        raise BenchError(f"no {tag} from {self.log.name} within {timeout:.0f}s:\n{tail(self.log)}")

    def say(self, tag: str) -> None:
        """Send one protocol line."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{tag}\n")
        self.proc.stdin.flush()


@dataclass
class Row:
    """One run's figures."""

    server: str
    kind: str
    sockets: int
    opened: int
    failed: int
    lost: int
    connect_s: float
    rss_before_mb: float
    rss_after_mb: float
    kb_per_socket: float
    server_cpu_connect: float
    #: descriptors the server process held with every socket open
    server_fds: int
    load1: float
    #: the machine over the window the sockets were held (``MachineWindow.report``)
    machine: str
    growth: list[tuple[str, float, float]] = field(default_factory=list)
    lines: list[Any] = field(default_factory=list)


class Bench:
    """The temporary directory, database and processes of one benchmark invocation."""

    def __init__(self, options: argparse.Namespace, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.setup = workdir / "setup.json"
        self.runs = 0
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DJANGO_", "SYSMANAGE_", "DATABASE_URL", "REDIS_URL"))
            and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
        }
        self.env.update(
            {
                "DJANGO_SETTINGS_MODULE": "sysmanage.settings",
                "DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}",
                "SYSMANAGE_VAR_DIR": str(workdir / "var"),
                "DJANGO_SECRET_KEY": secrets.token_urlsafe(40),
                "JWT_ACCESS_TTL_SECONDS": "86400",
                "WS_MAX_SOCKETS_PER_USER": "0",
                "HOST_OFFLINE_AFTER_SECONDS": "86400",
                "LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(REPO),
            }
        )
        if options.redis_url:
            self.env["REDIS_URL"] = options.redis_url
            self.env["SYSMANAGE_REDIS_PREFIX"] = f"bench-memory-{secrets.token_hex(4)}"
        for item in options.server_env:
            name, _, value = item.partition("=")
            self.env[name] = value

    def prepare(self, hosts: int) -> None:
        """Migrate a fresh SQLite database, enroll ``hosts`` hosts, keep their tokens."""
        started = time.monotonic()
        manage = [PYTHON, str(REPO / "manage.py")]
        subprocess.run([*manage, "migrate", "-v0"], cwd=REPO, env=self.env, check=True, timeout=300)
        done = subprocess.run(
            [*manage, "shell", "-c", ENROLL.format(count=hosts)],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        found = [line for line in done.stdout.splitlines() if line.startswith("ENROLLED ")]
        if done.returncode != 0 or not found:
            raise BenchError(f"enrolment failed:\n{done.stderr[-2000:]}")
        self.setup.write_text(found[-1].removeprefix("ENROLLED "))
        print(f"database: {hosts} hosts enrolled in {time.monotonic() - started:.0f}s", flush=True)

    def start_server(self, kind: str) -> tuple[subprocess.Popen[bytes], str, Path]:
        """Start a server of ``kind`` (bare, real, base) on a free port; wait until it listens."""
        self.runs += 1
        port = free_port()
        log = self.workdir / f"{self.runs:02d}-{kind}-server.log"
        env = dict(self.env)
        root = REPO
        if kind == "bare":
            command = [PYTHON, str(Path(__file__).resolve()), "bare", "--port", str(port)]
        else:
            if kind == "base":
                root = self.options.compare
                env["PYTHONPATH"] = str(root)
            daphne = ["-b", LOOPBACK, "-p", str(port), "sysmanage.asgi:application"]
            if self.options.inspect:
                env["BENCH_MEMORY_DUMP"] = str(self.workdir / f"{self.runs:02d}-objects")
                if self.options.tracemalloc:
                    env["PYTHONTRACEMALLOC"] = str(self.options.tracemalloc)
                command = [PYTHON, str(Path(__file__).resolve()), "inspect-serve", *daphne]
            else:
                command = [PYTHON, "-m", "sysmanage.serve", *daphne]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"{kind} server exited:\n{tail(log)}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5):
                return proc, f"ws://{LOOPBACK}:{port}", log
            time.sleep(0.2)
        stop_process(proc)
        raise BenchError(f"{kind} server did not listen within 60s:\n{tail(log)}")

    def holders(self, kind: str, url: str, first: int, count: int, tag: str) -> list[Child]:
        """Start load-generator processes holding ``count`` sockets from index ``first``."""
        workers = max(1, math.ceil(count / self.options.per_worker))
        children = []
        for w in range(workers):
            start = first + w * count // workers
            size = first + (w + 1) * count // workers - start
            command = [
                PYTHON,
                str(Path(__file__).resolve()),
                "hold",
                "--kind",
                kind,
                "--url",
                url,
                "--setup",
                str(self.setup),
                "--first",
                str(start),
                "--count",
                str(size),
                "--concurrency",
                str(self.options.concurrency),
                "--timeout",
                str(self.options.connect_timeout),
            ]
            log = self.workdir / f"{self.runs:02d}-{tag}-{w}.log"
            children.append(Child.spawn(command, self.env, log))
        return children

    def dump_objects(self, proc: subprocess.Popen[bytes], number: int) -> dict[str, Any]:
        """Ask the inspecting wrapper for its object counts; return them."""
        path = Path(f"{self.workdir / f'{self.runs:02d}-objects'}.{number}")
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 600  # a deep tracemalloc snapshot takes minutes
        while not path.exists():
            if time.monotonic() > deadline:
                raise BenchError("the server wrote no object counts")
            time.sleep(0.2)
        return dict(json.loads(path.read_text()))

    def run(self, server_kind: str, kind: str, sockets: int) -> Row:
        """One server, ``--warmup`` then ``sockets`` idle sockets of ``kind``, RSS before
        and after."""
        options = self.options
        self.wait_until_quiet()
        proc, url, log = self.start_server(server_kind)
        server = psutil.Process(proc.pid)
        children: list[Child] = []
        inspect = options.inspect and server_kind != "bare"
        try:
            warm = self.holders(kind, url, 0, options.warmup, "warmup")
            children += warm
            for child in warm:
                child.expect("READY", options.connect_timeout + 60)
            self.settle(server)
            before = self.dump_objects(proc, 1) if inspect else {}
            rss_before = server.memory_info().rss
            cpu_before = server.cpu_times()
            started = time.monotonic()
            window = MachineWindow(own=[proc.pid])
            held = self.holders(kind, url, options.warmup, sockets, "hold")
            children += held
            reports = [
                c.expect("READY", options.connect_timeout * sockets / options.concurrency + 120)
                for c in held
            ]
            connect_s = time.monotonic() - started
            cpu_after = server.cpu_times()
            self.settle(server)
            rss_after = server.memory_info().rss
            server_fds = server.num_fds()
            after = self.dump_objects(proc, 2) if inspect else {}
            machine = window.report()
            for child in children:
                child.say("CLOSE")
            lost = sum(int(c.expect("CLOSED", 60)["lost_while_held"]) for c in children)
            if proc.poll() is not None:
                raise BenchError(f"{server_kind} server died:\n{tail(log)}")
        finally:
            for child in children:
                stop_process(child.proc, grace=5)
            stop_process(proc)
        opened = sum(int(r["opened"]) for r in reports)
        for report in reports:
            if report["errors"]:
                print(f"  load generator errors: {report['errors']}", flush=True)
        busy = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
        row = Row(
            server=server_kind,
            kind=kind,
            sockets=sockets,
            opened=opened,
            failed=sum(int(r["failed"]) for r in reports),
            lost=lost,
            connect_s=round(connect_s, 1),
            rss_before_mb=round(rss_before / 2**20, 1),
            rss_after_mb=round(rss_after / 2**20, 1),
            kb_per_socket=round((rss_after - rss_before) / 1024 / max(opened, 1), 1),
            server_cpu_connect=round(100 * busy / max(connect_s, 1e-6), 1),
            server_fds=server_fds,
            load1=round(os.getloadavg()[0], 2),
            machine=machine,
        )
        if inspect:
            row.growth = growth(before, after, opened, options.top)
            row.lines = after.get("lines", [])[: options.top]
            total = sum(after["sizes"].values()) - sum(before["sizes"].values())
            row.growth.insert(
                0,
                (
                    "(all tracked objects)",
                    round((after["tracked"] - before["tracked"]) / max(opened, 1), 2),
                    round(total / max(opened, 1)),
                ),
            )
        return row

    def settle(self, server: psutil.Process) -> None:
        """Wait ``--settle`` seconds, then until the server's CPU stays under 10% for a
        second (at most 60 s more)."""
        time.sleep(self.options.settle)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.cpu_percent(interval=1.0) > 10:
            pass

    def wait_until_quiet(self) -> None:
        """Wait (at most ``--quiet-wait``) until other processes use at most
        ``--quiet-below`` % of one core."""
        deadline = time.monotonic() + self.options.quiet_wait
        while True:
            busy = psutil.cpu_percent(interval=1.0) * (psutil.cpu_count() or 1)
            if busy <= self.options.quiet_below or time.monotonic() >= deadline:
                if busy > self.options.quiet_below:
                    print(f"  (machine {busy:.0f}% busy; measuring anyway)", flush=True)
                return


def growth(
    before: dict[str, Any], after: dict[str, Any], sockets: int, top: int
) -> list[tuple[str, float, float]]:
    """The object types whose own size (``sys.getsizeof``) grew most: objects and bytes
    per socket, largest first."""
    per = max(sockets, 1)
    rows = [
        (
            name,
            round((after["types"][name] - before["types"].get(name, 0)) / per, 2),
            round((size - before["sizes"].get(name, 0)) / per),
        )
        for name, size in after["sizes"].items()
    ]
    rows.sort(key=lambda row: -row[2])
    return [row for row in rows[:top] if row[2] > 0]


def table(rows: list[Row]) -> Iterator[str]:
    """The rows as a Markdown table."""
    head = [
        "server",
        "sockets",
        "kind",
        "opened",
        "failed",
        "lost",
        "connect s",
        "RSS before MB",
        "RSS after MB",
        "KB/socket",
        "srv% connecting",
        "server fds",
        "load1",
    ]
    yield "| " + " | ".join(head) + " |"
    yield "|" + "|".join("---:" for _ in head) + "|"
    for r in rows:
        cells = [
            r.server,
            r.sockets,
            r.kind,
            r.opened,
            r.failed,
            r.lost,
            r.connect_s,
            r.rss_before_mb,
            r.rss_after_mb,
            r.kb_per_socket,
            r.server_cpu_connect,
            r.server_fds,
            r.load1,
        ]
        yield "| " + " | ".join(str(c) for c in cells) + " |"


def versus_bare(rows: list[Row]) -> Iterator[str]:
    """Each real (and base) row against the bare server's row of the same size and kind
    in this run: KB per socket more, and the ratio."""
    bare = {(r.kind, r.sockets): r for r in rows if r.server == "bare"}
    for r in rows:
        reference = bare.get((r.kind, r.sockets))
        if r.server == "bare" or reference is None or reference.kb_per_socket <= 0:
            continue
        yield (
            f"{r.server} {r.sockets} {r.kind}: {r.kb_per_socket} KB per socket against bare "
            f"{reference.kb_per_socket} KB: {r.kb_per_socket - reference.kb_per_socket:+.1f} KB, "
            f"{r.kb_per_socket / reference.kb_per_socket:.2f}x"
        )


def targets(rows: list[Row], options: argparse.Namespace) -> list[Target]:
    """The issue's targets for the real server's rows: KB per idle socket of each kind,
    every socket opened and kept, and how many idle authenticated sockets one process
    held at once (the warm-up sockets included)."""
    limits = {"clients": options.client_kb, "agents": options.agent_kb}
    found: list[Target] = []
    for r in rows:
        if r.server != "real":
            continue
        label = f"{r.sockets} idle {r.kind}"
        found.append(Target(f"{label}, KB per socket", r.kb_per_socket, limits[r.kind], " KB"))
        found.append(Target(f"{label}, failed or lost", r.failed + r.lost, 0))
    real = [r for r in rows if r.server == "real"]
    if real:
        most = max(real, key=lambda r: r.opened)
        held = most.opened + options.warmup
        found.append(
            Target(
                f"idle authenticated sockets held by one process ({most.kind})",
                held,
                options.hold_target,
                op=">=",
            )
        )
    return found


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The orchestrator's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sockets",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1000],
        help="socket counts, comma-separated (1000,5000,19900)",
    )
    parser.add_argument(
        "--kinds",
        type=lambda s: [k for k in s.split(",") if k in KINDS],
        default=list(KINDS),
        help="clients,agents",
    )
    parser.add_argument(
        "--servers",
        type=lambda s: [k for k in s.split(",") if k in ("bare", "real", "base")],
        default=["bare", "real"],
        help="bare,real (and base with --compare), in this order",
    )
    parser.add_argument("--compare", type=Path, help="a checkout to run as the 'base' server")
    parser.add_argument(
        "--reference-ref", help="a git revision to check out and run as the 'base' server"
    )
    parser.add_argument("--warmup", type=int, default=20, help="sockets opened first and kept")
    parser.add_argument("--per-worker", type=int, default=8000, help="sockets per load process")
    parser.add_argument("--concurrency", type=int, default=32, help="handshakes per load process")
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before reading RSS")
    parser.add_argument("--redis-url", default="", help="channels-redis instead of in-memory")
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="NAME=VALUE", help="server setting"
    )
    parser.add_argument("--inspect", action="store_true", help="object counts by type")
    parser.add_argument(
        "--tracemalloc",
        type=int,
        nargs="?",
        const=1,
        default=0,
        metavar="FRAMES",
        help="with --inspect: allocating lines (FRAMES > 1: grouped by call path)",
    )
    parser.add_argument("--top", type=int, default=25, help="types (lines) listed by --inspect")
    parser.add_argument("--client-kb", type=float, default=25.0, help="target per client socket")
    parser.add_argument("--agent-kb", type=float, default=30.0, help="target per agent socket")
    parser.add_argument(
        "--hold-target", type=int, default=20000, help="target: sockets one process holds"
    )
    parser.add_argument("--quiet-below", type=float, default=30.0, help="%% of one core")
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="seconds")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    options = parser.parse_args(argv)
    if options.compare is not None and options.reference_ref:
        parser.error("--compare and --reference-ref exclude each other")
    if "base" in options.servers and options.compare is None and not options.reference_ref:
        parser.error("--servers base needs --compare DIR or --reference-ref REF")
    if (options.compare is not None or options.reference_ref) and "base" not in options.servers:
        options.servers.append("base")
    return options


def descriptor_limit() -> int:
    """Raise this process's descriptor limit (inherited by the servers and load generators
    it starts) as far as the machine allows; return it."""
    raise_fd_limit()
    return min(resource.getrlimit(resource.RLIMIT_NOFILE))


def orchestrate(argv: list[str]) -> int:
    """Run every (size, kind, server) combination, against a reference revision's server
    when asked; print the table, the comparison with bare and the targets."""
    options = parse_args(argv)
    if not options.reference_ref:
        return measure(options)
    with reference_worktree(options.reference_ref) as (tree, revision):
        print(f"reference ('base'): {options.reference_ref} at {revision}", flush=True)
        options.compare = tree
        return measure(options)


def measure(options: argparse.Namespace) -> int:
    """Run every (size, kind, server) combination; print the table and the targets."""
    limit = descriptor_limit()
    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    bench = Bench(options, workdir)
    rows: list[Row] = []
    status = 0
    print(
        f"machine: {psutil.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, "
        f"python {sys.version.split()[0]}, descriptors per process {limit}; work dir {workdir}",
        flush=True,
    )
    try:
        biggest = max(options.sockets) + options.warmup
        bench.prepare(biggest if "agents" in options.kinds else min(biggest, 200))
        for n in options.sockets:
            for kind in options.kinds:
                for server in options.servers:
                    row = bench.run(server, kind, n)
                    rows.append(row)
                    print(
                        f"  {server:4} {kind:7} {n:6}: {row.kb_per_socket} KB/socket "
                        f"({row.opened} opened, {row.failed} failed, {row.lost} lost, "
                        f"{row.connect_s}s), server fds {row.server_fds}",
                        flush=True,
                    )
                    print(f"      {row.machine}", flush=True)
                    for name, objects, size in row.growth:
                        print(f"      {objects:8.2f} objects {size:7.0f} B per socket  {name}")
                    for line in row.lines:
                        print(f"      {line[1] / 1024:9.0f} KB {line[2]:8d} blocks  {line[0]}")
    except (BenchError, subprocess.SubprocessError) as exc:
        print(f"benchmark stopped: {exc}", file=sys.stderr)
        status = 1
    finally:
        if options.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if rows:
        print()
        for line in table(rows):
            print(line)
        print()
        for line in versus_bare(rows):
            print(line)
        print()
        if not print_targets(targets(rows, options)):
            status = status or 2
        if options.json is not None:
            options.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return status


def main(argv: list[str]) -> int:
    """Dispatch on the role: the orchestrator by default, else ``hold``, ``bare`` or
    ``inspect-serve`` (started by the orchestrator)."""
    role = argv[0] if argv else ""
    if role == "hold":
        parser = argparse.ArgumentParser(prog="memory.py hold")
        parser.add_argument("--kind", choices=KINDS, required=True)
        parser.add_argument("--url", required=True)
        parser.add_argument("--setup", required=True)
        parser.add_argument("--first", type=int, default=0)
        parser.add_argument("--count", type=int, required=True)
        parser.add_argument("--concurrency", type=int, default=32)
        parser.add_argument("--timeout", type=float, default=60.0)
        descriptor_limit()
        asyncio.run(hold(parser.parse_args(argv[1:])))
        return 0
    if role == "bare":
        descriptor_limit()
        port = int(argv[argv.index("--port") + 1])
        asyncio.run(bare(port))
        return 0
    if role == "inspect-serve":
        inspect_serve(argv[1:])
        return 0
    return orchestrate(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
