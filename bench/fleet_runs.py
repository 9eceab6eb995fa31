"""
A fleet-wide command over many agents, against the same commands sent one host at a time.

::

    .venv/bin/python bench/fleet_runs.py --agents 1000 --batch-size 50 --delay 0.2
    .venv/bin/python bench/fleet_runs.py --postgres --repeat 1 --no-count-queries

Starts a fresh server as it ships (``python -m sysmanage.serve``; SQLite, in-memory layer;
``--postgres`` for a fresh PostgreSQL database), enrolls ``--agents`` hosts and connects
one simulated agent per host (``bench/agents.py``'s), each answering ``run_command`` with
a result after ``--delay`` seconds.  Then, on that server, in turn (the order reversed
every other round):

* **fleet**: one ``/ws`` client (the user's path) sends one ``command`` on
  ``command_execution`` with ``targets`` matching every host and ``batch_size``; once
  the ``response`` names the run, N sockets subscribe with its ``run_id`` (one row per
  count in ``--subscribers``), and ``--unfiltered`` sockets subscribed to the whole
  channel beforehand watch every host's own execution events too;
* **single** (the reference): the same commands sent as one-host ``command`` s from one
  client, ``batch_size`` at a time, the next batch when the whole batch has answered,
  as the fleet runner does; the unfiltered subscribers watch these as well.

Per run: time to the ``response``, to the first and the last host's result (as the
first unfiltered subscriber sees each host's final event), the whole run (to the run's
final progress; for the reference, to the last answer), the server's CPU seconds over it
and per host, the load generator's CPU, progress frames per ``run_id`` subscriber (and
per second: coalesced, not one per host), the frames per unfiltered subscriber, and the
machine's load (``_common.MachineWindow``).  With ``--count-queries`` (the default) one
more round runs on the same database with the server started by ``bench/_querycount.py``
(the same server, its SQL statements counted), for the statements per host: less what
the server executes meanwhile anyway (metrics reports, heartbeats, sweeps), measured over
an ``--idle`` window with no command running.

The per-socket message rate limit (``WS_RATE_LIMIT_PER_SECOND``, 20/s) is lifted for the
run: with it, the one-host-at-a-time reference could not send more than 20 commands a
second from one socket.  Targets only loopback; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
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
from _common import MachineWindow, free_port, raise_fd_limit
from agent_storm import create_database, drop_database
from agents import PYTHON, REPO, Behaviour, Tally, prepare, run_agent, server_env, settle

#: Every enrolled host's name contains it (``agent-00042``): the run's target filter.
TARGET = {"filter": {"search": "agent-"}}


@dataclass
class Watch:
    """What one subscriber socket received since it subscribed."""

    started: float = 0.0
    progress: int = 0
    host_events: int = 0
    #: perf_counter times of the hosts' final events (unfiltered) or of the progress
    #: frames that carried results (``run_id``)
    results: list[float] = field(default_factory=list)
    hosts_in_progress: int = 0
    final_at: float | None = None
    final: dict[str, Any] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Subscriber:
    """A staff ``/ws`` socket counting what it receives on ``command_execution``."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.watch = Watch()
        self.run_id: str | None = None
        self.task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, url: str, access: str) -> Subscriber:
        ws = await websockets.connect(
            url,
            additional_headers={"Authorization": f"Bearer {access}"},
            max_size=None,
            open_timeout=60,
            proxy=None,
        )
        return cls(ws)

    async def subscribe(self, run_id: str | None) -> None:
        """Subscribe (to the run's progress, or to the whole channel) and start counting."""
        filters = {"run_id": run_id} if run_id else {}
        self.run_id = run_id
        await self.ws.send(
            json.dumps(
                {
                    "type": "subscribe",
                    "channel": "command_execution",
                    "filters": filters,
                    "id": "sub",
                }
            )
        )
        while True:
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), 60))
            if reply.get("id") == "sub" and reply.get("type") in ("response", "error"):
                break
        if reply["type"] != "response":
            raise RuntimeError(f"subscribe refused: {reply}")
        self.watch = Watch(started=time.perf_counter())
        self.task = asyncio.ensure_future(self._read())

    def reset(self) -> None:
        """Count from now on (the unfiltered subscribers, between runs)."""
        self.watch = Watch(started=time.perf_counter())

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                message = json.loads(raw)
                if message.get("type") != "event":
                    continue
                data, watch = message["data"], self.watch
                now = time.perf_counter()
                if "run_id" in data:
                    watch.progress += 1
                    if data["results"]:
                        watch.results.append(now)
                        watch.hosts_in_progress += len(data["results"])
                    if data["final"]:
                        watch.final_at, watch.final = now, data
                        watch.done.set()
                    continue
                watch.host_events += 1
                if data.get("final"):
                    watch.results.append(now)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        if self.task is not None:
            self.task.cancel()


async def request(ws: Any, message: dict[str, Any]) -> dict[str, Any]:
    """Send ``message`` and return the answer with its id (other frames are skipped)."""
    await ws.send(json.dumps(message))
    while True:
        reply = json.loads(await asyncio.wait_for(ws.recv(), 600))
        if reply.get("id") == message["id"]:
            return reply


class Counter:
    """The server's CPU, this process's CPU, the machine, and (when counting) the
    server's SQL statements, over one run."""

    def __init__(self, server: psutil.Process, counts: Path | None) -> None:
        self.server, self.counts = server, counts
        self.machine = MachineWindow(own=[server.pid])
        self.queries0 = self._queries()
        self.cpu0 = sum(server.cpu_times()[:2])
        self.me0 = sum(psutil.Process().cpu_times()[:2])
        self.started = time.monotonic()

    def _queries(self) -> dict[str, int]:
        if self.counts is None:
            return {}
        before = self.counts.stat().st_mtime_ns if self.counts.exists() else 0
        os.kill(self.server.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.counts.exists() and self.counts.stat().st_mtime_ns != before:
                return dict(json.loads(self.counts.read_text()))
            time.sleep(0.02)
        raise RuntimeError("the server did not write its query counts")

    def finish(self) -> dict[str, Any]:
        cpu = sum(self.server.cpu_times()[:2]) - self.cpu0
        me = sum(psutil.Process().cpu_times()[:2]) - self.me0
        queries = self._queries()
        spent = {k: v - self.queries0.get(k, 0) for k, v in queries.items()}
        return {
            "window_s": time.monotonic() - self.started,
            "server_cpu": cpu,
            "loadgen_cpu": me,
            "queries": {k: v for k, v in spent.items() if v},
            "machine": self.machine.report(),
        }


async def fleet(
    url: str,
    access: str,
    server: psutil.Process,
    watchers: list[Subscriber],
    followers: int,
    batch: int,
    counts: Path | None,
) -> dict[str, Any]:
    """One fleet run; its figures."""
    subscribers = [await Subscriber.connect(url, access) for _ in range(followers)]
    requester = await Subscriber.connect(url, access)
    for watcher in watchers:
        watcher.reset()
    counter = Counter(server, counts)
    started = time.perf_counter()
    message = {
        "type": "command",
        "channel": "command_execution",
        "id": "fleet",
        "data": {
            "targets": TARGET,
            "command": "true",
            "timeout": 30,
            "batch_size": batch,
        },
    }
    reply = await request(requester.ws, message)
    responded = time.perf_counter()
    if reply["type"] != "response":
        raise RuntimeError(f"fleet run refused: {reply}")
    run_id = reply["data"]["run_id"]
    await asyncio.gather(*(s.subscribe(run_id) for s in subscribers))
    await asyncio.wait_for(asyncio.gather(*(s.watch.done.wait() for s in subscribers)), 900)
    ended = min(s.watch.final_at or 0.0 for s in subscribers)
    await asyncio.sleep(0.5)  # the last hosts' own events, to the unfiltered subscribers
    figures = counter.finish()
    final = subscribers[0].watch.final or {}
    first = subscribers[0].watch
    figures.update(
        kind="fleet",
        batch=batch,
        followers=followers,
        hosts=reply["data"]["total"],
        response_s=responded - started,
        run_s=ended - started,
        state=final.get("state"),
        counts=final.get("counts"),
        hosts_in_progress=first.hosts_in_progress,
        progress=[s.watch.progress for s in subscribers],
        progress_spans=[(s.watch.final_at or 0.0) - s.watch.started for s in subscribers],
        **_watched(watchers, started),
    )
    if not watchers and first.results:
        figures.update(first_s=first.results[0] - started, last_s=first.results[-1] - started)
    await asyncio.gather(*(s.close() for s in [*subscribers, requester]))
    return figures


async def single(
    url: str,
    access: str,
    server: psutil.Process,
    watchers: list[Subscriber],
    ids: list[str],
    batch: int,
    counts: Path | None,
) -> dict[str, Any]:
    """The reference: the same commands as one-host commands from one client, in batches."""
    requester = await Subscriber.connect(url, access)
    for watcher in watchers:
        watcher.reset()
    counter = Counter(server, counts)
    started = time.perf_counter()
    answered: list[float] = []
    outcomes: dict[str, int] = {}
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        for offset, host_id in enumerate(chunk):
            message = {
                "type": "command",
                "channel": "command_execution",
                "id": f"c{start + offset}",
                "data": {"host_id": host_id, "command": "true", "timeout": 30},
            }
            await requester.ws.send(json.dumps(message))
        waiting = {f"c{start + offset}" for offset in range(len(chunk))}
        while waiting:
            reply = json.loads(await asyncio.wait_for(requester.ws.recv(), 120))
            if reply.get("id") in waiting:
                waiting.discard(reply["id"])
                answered.append(time.perf_counter())
                status = reply["data"].get("status") if reply["type"] == "response" else "error"
                outcomes[str(status)] = outcomes.get(str(status), 0) + 1
    ended = time.perf_counter()
    await asyncio.sleep(0.5)
    figures = counter.finish()
    figures.update(
        kind="single",
        batch=batch,
        followers=0,
        hosts=len(ids),
        response_s=answered[0] - started,
        run_s=ended - started,
        state="all answered",
        counts=outcomes,
        progress=[],
        progress_spans=[],
        **_watched(watchers, started),
    )
    await requester.close()
    return figures


def _watched(watchers: list[Subscriber], started: float) -> dict[str, Any]:
    """What the unfiltered subscribers saw: the first and last host result (the first
    subscriber's view), the per-host events and progress frames each got."""
    if not watchers:
        return {"watcher_events": [], "watcher_progress": []}
    results = watchers[0].watch.results
    return {
        "first_s": results[0] - started if results else None,
        "last_s": results[-1] - started if results else None,
        "results_seen": len(results),
        "watcher_events": [w.watch.host_events for w in watchers],
        "watcher_progress": [w.watch.progress for w in watchers],
    }


async def connect_agents(
    args: argparse.Namespace, base: str, data: dict[str, Any]
) -> tuple[Tally, list[asyncio.Task[None]]]:
    """One simulated agent per host, all connected and the server settled."""
    tally = Tally()
    how = Behaviour(args.interval, 30.0, 20.0, 300.0, answer_delay=args.delay)
    agents = []
    for index, token in enumerate(data["tokens"]):
        url = f"ws://{base}/ws/agent"
        agents.append(asyncio.ensure_future(run_agent(url, token, index, how, tally)))
        if index % 50 == 49:
            await asyncio.sleep(0.05)
    while tally.connected + tally.errors < len(agents):
        await asyncio.sleep(0.5)
    await settle(f"ws://{base}/ws", data["access"], 180)
    await asyncio.sleep(3)
    await settle(f"ws://{base}/ws", data["access"], 180)
    return tally, agents


async def measure(
    args: argparse.Namespace,
    base: str,
    data: dict[str, Any],
    ids: list[str],
    server: psutil.Process,
    counts: Path | None,
    rounds: int,
) -> list[dict[str, Any]]:
    """Connect the agents; run every kind of run ``rounds`` times, the order reversed
    every other round."""
    url, access = f"ws://{base}/ws", data["access"]
    tally, agents = await connect_agents(args, base, data)
    print(f"  {tally.connected} of {len(agents)} agents connected", flush=True)
    watchers = [await Subscriber.connect(url, access) for _ in range(args.unfiltered)]
    await asyncio.gather(*(w.subscribe(None) for w in watchers))
    idle = await idle_statements(server, counts, args.idle) if counts is not None else 0.0
    plan: list[tuple[str, int, int]] = []
    for batch in args.batch_size:
        plan += [("fleet", batch, n) for n in args.subscribers] + [("single", batch, 0)]
    rows = []
    for number in range(rounds):
        for kind, batch, followers in plan if number % 2 == 0 else plan[::-1]:
            if kind == "fleet":
                row = await fleet(url, access, server, watchers, followers, batch, counts)
            else:
                row = await single(url, access, server, watchers, ids, batch, counts)
            row.update(round=number, connected=tally.connected, answered=tally.answered, idle=idle)
            rows.append(row)
            print(f"  {line(row)}\n    {row['machine']}", flush=True)
            await asyncio.sleep(2.0)
    await asyncio.gather(*(w.close() for w in watchers))
    tally.stop.set()
    await asyncio.wait(agents, timeout=30)
    return rows


def line(row: dict[str, Any]) -> str:
    """One run in a line."""
    hosts = max(row["hosts"], 1)
    text = (
        f"{row['kind']:>6} batch {row['batch']:>3} subs {row['followers']:>2}: "
        f"response {1e3 * row['response_s']:7.1f} ms, first result "
        f"{_ms(row.get('first_s'))}, last {_ms(row.get('last_s'))}, run "
        f"{row['run_s']:6.2f} s, server CPU {row['server_cpu']:5.2f} s "
        f"({1e3 * row['server_cpu'] / hosts:.2f} ms/host), gen CPU {row['loadgen_cpu']:5.2f} s"
    )
    if row["progress"]:
        per_s = [n / span for n, span in zip(row["progress"], row["progress_spans"], strict=True)]
        text += (
            f", progress frames per run_id subscriber {min(row['progress'])}-"
            f"{max(row['progress'])} ({statistics.mean(per_s):.2f}/s), "
            f"{row['hosts_in_progress']} hosts in them, {row['state']} {row['counts']}"
        )
    else:
        text += f", answers {row['counts']}"
    if row["watcher_events"]:
        text += (
            f"; unfiltered subscribers: {statistics.mean(row['watcher_events']):.0f} host "
            f"events + {statistics.mean(row['watcher_progress']):.0f} progress each"
        )
    if row["queries"]:
        total = sum(row["queries"].values())
        run = total - row["idle"] * row["window_s"]
        text += (
            f"; SQL {total} ({total / hosts:.1f}/host: {row['queries']}); less the idle "
            f"rate over the window: {run / hosts:.1f}/host"
        )
    return text


async def idle_statements(server: psutil.Process, counts: Path, seconds: float) -> float:
    """The server's SQL statements per second with the agents connected and no command
    running (metrics reports, heartbeats, the periodic sweeps), to subtract."""
    counter = Counter(server, counts)
    await asyncio.sleep(seconds)
    figures = counter.finish()
    rate = sum(figures["queries"].values()) / figures["window_s"]
    print(f"  idle: {rate:.1f} SQL statements/s {figures['queries']}", flush=True)
    return rate


def _ms(seconds: float | None) -> str:
    return "    -   " if seconds is None else f"{1e3 * seconds:7.1f} ms"


def start(env: dict[str, str], port: int, log: Path, counted: bool) -> subprocess.Popen[bytes]:
    """The server as it ships, or (``counted``) through ``bench/_querycount.py``."""
    entry = [str(REPO / "bench" / "_querycount.py")] if counted else ["-m", "sysmanage.serve"]
    with log.open("ab") as handle:
        proc = subprocess.Popen(
            [PYTHON, *entry, "-b", "127.0.0.1", "-p", str(port), "sysmanage.asgi:application"],
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


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def host_ids(env: dict[str, str]) -> list[str]:
    """Every enrolled host's id, by hostname (the fleet run's order)."""
    code = (
        "import json; from hosts.models import Host; "
        "print(json.dumps([str(h) for h in Host.objects.order_by('hostname')"
        ".values_list('id', flat=True)]))"
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


def summarise(rows: list[dict[str, Any]]) -> None:
    """Medians per kind of run, and the fleet run against the reference."""
    print("medians per kind of run (s; server CPU in ms per host):")
    kinds = sorted({(r["kind"], r["batch"], r["followers"]) for r in rows})
    for kind, batch, followers in kinds:
        same = [
            r for r in rows if (r["kind"], r["batch"], r["followers"]) == (kind, batch, followers)
        ]
        hosts = same[0]["hosts"] or 1

        def med(key: str, rows: list[dict[str, Any]] = same) -> float:
            values = [r[key] for r in rows if r.get(key) is not None]
            return statistics.median(values) if values else float("nan")

        cpu = statistics.median(r["server_cpu"] for r in same) * 1e3 / hosts
        print(
            f"  {kind:>6} batch {batch} subs {followers}: runs {len(same)}, response "
            f"{med('response_s'):.3f}, first {med('first_s'):.3f}, last {med('last_s'):.3f}, "
            f"run {med('run_s'):.2f}, server CPU {cpu:.2f} ms/host"
        )


def main() -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument(
        "--batch-size",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[50],
        help="hosts at once (comma-separated to measure several)",
    )
    parser.add_argument(
        "--delay", type=float, default=0.2, help="seconds an agent takes to answer a command"
    )
    parser.add_argument(
        "--subscribers",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[1, 20],
        help="run_id subscribers per fleet run, one fleet run per count (comma-separated)",
    )
    parser.add_argument(
        "--unfiltered", type=int, default=5, help="subscribers to all of command_execution"
    )
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between metrics")
    parser.add_argument("--repeat", type=int, default=2, help="rounds on the shipped server")
    parser.add_argument(
        "--idle", type=float, default=20.0, help="seconds of the idle window when counting"
    )
    parser.add_argument(
        "--count-queries",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one more round with the server's SQL statements counted",
    )
    parser.add_argument("--postgres", action="store_true", help="a fresh PostgreSQL database")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    if min(args.subscribers) < 1:
        parser.error("--subscribers: at least one run_id subscriber per fleet run")
    raise_fd_limit()
    scratch = Path(tempfile.mkdtemp(prefix="bench-fleet-runs-"))
    env = server_env(scratch, None, None)
    env.update(WS_RATE_LIMIT_PER_SECOND="1000", WS_RATE_LIMIT_BURST="1000")
    database = None
    if args.postgres:
        database, env["DATABASE_URL"] = create_database(args.postgres_url)
    rows: list[dict[str, Any]] = []
    counted: list[dict[str, Any]] = []
    try:
        data = prepare(REPO, env, args.agents)
        ids = host_ids(env)
        for counting in [False, True] if args.count_queries else [False]:
            port, log = free_port(), scratch / "server.log"
            counts = scratch / "queries.json" if counting else None
            if counts is not None:
                env["BENCH_QUERY_COUNT_FILE"] = str(counts)
            proc = start(env, port, log, counting)
            try:
                server = psutil.Process(proc.pid)
                print("counting SQL statements:" if counting else "the server as it ships:")
                found = asyncio.run(
                    measure(
                        args,
                        f"127.0.0.1:{port}",
                        data,
                        ids,
                        server,
                        counts,
                        1 if counting else args.repeat,
                    )
                )
                (counted if counting else rows).extend(found)
            finally:
                stop(proc)
    finally:
        if database is not None:
            drop_database(args.postgres_url, database)
        shutil.rmtree(scratch, ignore_errors=True)
    store = "PostgreSQL" if args.postgres else "SQLite"
    print(
        f"fleet runs benchmark ({store}, in-memory layer, {args.agents} agents answering "
        f"after {args.delay}s, batch {args.batch_size}, {args.unfiltered} unfiltered "
        f"subscribers, {os.cpu_count()} cores)"
    )
    summarise(rows)
    ok = all(
        r["kind"] != "fleet" or (r["counts"] or {}).get("succeeded") == args.agents for r in rows
    ) and all(r["kind"] != "single" or r["counts"] == {"completed": args.agents} for r in rows)
    print("every host succeeded in every run" if ok else "SOME HOSTS DID NOT SUCCEED")
    return 0 if ok and rows else 1


if __name__ == "__main__":
    sys.exit(main())
