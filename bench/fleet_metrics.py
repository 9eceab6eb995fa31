"""
Every host's metrics on one socket: what ``host_metrics`` with ``host_id: "*"`` costs.

::

    .venv/bin/python bench/fleet_metrics.py --agents 1000 --subscribers 1,10,30 --duration 20

Starts a fresh server (SQLite, in-memory layer; ``--redis-url`` for Redis), enrolls
``--agents`` hosts and connects one simulated agent per host reporting metrics every
``--interval`` seconds (``bench/agents.py``'s agents).  Then, on that same server, it
measures windows of ``--duration`` seconds in a symmetric order (none, each count of
subscribers, the per-host way, then back again):

* **none**: no one watches every host: the server's CPU for ingest alone;
* **N all-hosts subscribers**: N staff sockets subscribed with ``host_id: "*"``: the
  summaries each gets per second, their bytes per second, hosts per summary, the largest
  summary, and the server CPU above the mean of the *none* windows;
* **per-host** (``--per-host-viewers``, 0 to skip): what one viewer of the whole fleet
  costs without it: one socket per host, each subscribed to that host.

Every window prints the machine's load and other processes' CPU beside its figures
(``_common.MachineWindow``), and the run ends with the targets met or missed.  Targets
only loopback; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import websockets
from _common import MachineWindow, Target, free_port, print_targets, raise_fd_limit
from agents import (
    REPO,
    Behaviour,
    Tally,
    host_ids,
    prepare,
    run_agent,
    server_env,
    settle,
    start_server,
)

#: The summary bounds of the server (its defaults; ``WS_FLEET_METRICS_MAX_*``).
MAX_BYTES = 512 * 1024
#: Targets: about one summary a second per subscriber, each host of a 1,000-host fleet
#: reporting every second in it, and a bounded server cost per subscriber.
FRAMES_PER_S = (0.9, 1.1)
COVERAGE = 0.95
CPU_PER_SUBSCRIBER_PCT = 0.5


@dataclass
class Watch:
    """What one all-hosts subscriber received in a window."""

    frames: int = 0
    bytes: int = 0
    hosts: list[int] = field(default_factory=list)
    largest: int = 0
    truncated: int = 0


async def all_hosts_subscriber(url: str, access: str) -> Any:
    """A staff socket subscribed to every host, its snapshot read."""
    ws = await websockets.connect(
        url,
        additional_headers={"Authorization": f"Bearer {access}"},
        max_size=None,
        open_timeout=60,
        proxy=None,
    )
    await ws.send(
        json.dumps({"type": "subscribe", "channel": "host_metrics", "filters": {"host_id": "*"}})
    )
    reply = json.loads(await ws.recv())
    if reply.get("type") != "response":
        raise RuntimeError(f"subscribe refused: {reply}")
    snapshot = json.loads(await ws.recv())
    if snapshot.get("type") != "status":
        raise RuntimeError(f"no snapshot: {snapshot}")
    return ws


class Reader:
    """Reads one client socket from the moment it subscribed, counting what arrives
    (``reset`` at the start of a window); looks inside the summaries if it inspects."""

    def __init__(self, ws: Any, inspect: bool) -> None:
        self.ws = ws
        self.inspect = inspect
        self.watch = Watch()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                watch = self.watch
                watch.frames += 1
                watch.bytes += len(raw)
                watch.largest = max(watch.largest, len(raw))
                if self.inspect:
                    data = json.loads(raw)["data"]
                    watch.hosts.append(len(data["hosts"]))
                    watch.truncated += data["truncated"]

    def reset(self) -> None:
        """Count from now on."""
        self.watch = Watch()

    async def close(self) -> None:
        """Close the socket and stop reading."""
        with contextlib.suppress(Exception):
            await self.ws.close()
        self.task.cancel()


async def per_host_viewer(url: str, access: str, ids: list[str]) -> list[Any]:
    """One viewer of the whole fleet without summaries: a socket per host."""

    async def one(host_id: str) -> Any:
        ws = await websockets.connect(
            url,
            additional_headers={"Authorization": f"Bearer {access}"},
            max_size=None,
            open_timeout=120,
            proxy=None,
        )
        await ws.send(
            json.dumps(
                {"type": "subscribe", "channel": "host_metrics", "filters": {"host_id": host_id}}
            )
        )
        await ws.recv()
        return ws

    sockets = []
    for start in range(0, len(ids), 100):  # a ramp: the handshakes read the database
        sockets += await asyncio.gather(*(one(h) for h in ids[start : start + 100]))
    return sockets


async def window(
    server: psutil.Process, seconds: float, readers: list[Reader], tally: Tally
) -> dict[str, Any]:
    """Measure one window: the server's CPU, the frames each reader gets, the reports."""
    machine = MachineWindow(own=[server.pid])
    for reader in readers:
        reader.reset()
    cpu0, sent0, t0 = sum(server.cpu_times()[:2]), tally.sent, time.monotonic()
    me0 = sum(psutil.Process().cpu_times()[:2])
    await asyncio.sleep(seconds)
    watches = [reader.watch for reader in readers]
    span = time.monotonic() - t0
    cpu = sum(server.cpu_times()[:2]) - cpu0
    me = sum(psutil.Process().cpu_times()[:2]) - me0
    return {
        "seconds": span,
        "server_pct": 100 * cpu / span,
        "loadgen_pct": 100 * me / span,
        "reports_per_s": (tally.sent - sent0) / span,
        "watches": watches,
        "machine": machine.report(),
    }


async def measure(
    args: argparse.Namespace,
    base: str,
    data: dict[str, Any],
    ids: list[str],
    server: psutil.Process,
) -> list[dict[str, Any]]:
    """Connect the agents, then measure each phase in a symmetric order."""
    agent_url, client_url = f"ws://{base}/ws/agent", f"ws://{base}/ws"
    tally = Tally()
    how = Behaviour(args.interval, 30.0, 20.0, 300.0)
    agents = []
    for index, token in enumerate(data["tokens"]):
        agents.append(asyncio.ensure_future(run_agent(agent_url, token, index, how, tally)))
        if index % 50 == 49:
            await asyncio.sleep(0.05)
    while tally.connected + tally.errors < len(agents):
        await asyncio.sleep(0.5)
    await settle(client_url, data["access"], 180)
    await asyncio.sleep(args.interval * 2)
    await settle(client_url, data["access"], 180)
    phases: list[tuple[str, int]] = [("none", 0)]
    phases += [("all-hosts", n) for n in args.subscribers]
    if args.per_host_viewers:
        phases.append(("per-host", args.per_host_viewers))
    order = phases + phases[::-1]
    rows = []
    for kind, count in order:
        readers = []
        if kind == "all-hosts":
            for index in range(count):
                ws = await all_hosts_subscriber(client_url, data["access"])
                readers.append(Reader(ws, inspect=index == 0))
        elif kind == "per-host":
            for _ in range(count):
                sockets = await per_host_viewer(client_url, data["access"], ids)
                readers += [Reader(ws, inspect=False) for ws in sockets]
        await asyncio.sleep(2.0)  # past the snapshot and the first summary
        row = await window(server, args.duration, readers, tally)
        row.update(kind=kind, count=count, connected=tally.connected)
        rows.append(row)
        print(f"  {kind} x{count}: server {row['server_pct']:.1f}% | {row['machine']}", flush=True)
        await asyncio.gather(*(reader.close() for reader in readers))
        await asyncio.sleep(1.0)
    tally.stop.set()
    await asyncio.wait(agents, timeout=30)
    return rows


def summarise(rows: list[dict[str, Any]], agents: int) -> list[Target]:
    """Print one line per window and the cost per phase; return the targets."""
    base = statistics.mean(r["server_pct"] for r in rows if r["kind"] == "none")
    print(
        f"{'phase':>14} {'srv%':>6} {'+srv%':>6} {'gen%':>5} {'rep/s':>6} {'frames/s':>9} "
        f"{'KB/s':>7} {'hosts/frame':>11} {'max KB':>7} {'trunc':>5}  machine"
    )
    targets: list[Target] = []
    for row in rows:
        watches: list[Watch] = row["watches"]
        span = row["seconds"]
        label = f"{row['kind']} x{row['count']}" if row["count"] else "none"
        extra = row["server_pct"] - base
        if row["kind"] == "all-hosts":
            frames = statistics.mean(w.frames for w in watches) / span
            kbs = statistics.mean(w.bytes for w in watches) / span / 1024
            inspected = watches[0]
            hosts = statistics.mean(inspected.hosts) if inspected.hosts else 0.0
            largest = max(w.largest for w in watches) / 1024
            trunc = str(inspected.truncated)
        elif row["kind"] == "per-host":
            frames = sum(w.frames for w in watches) / span / row["count"]
            kbs = sum(w.bytes for w in watches) / span / 1024 / row["count"]
            hosts, largest, trunc = 1.0, max(w.largest for w in watches) / 1024, "-"
        else:
            frames = kbs = hosts = largest = 0.0
            trunc = "-"
        row.update(frames_per_s=frames, kb_per_s=kbs, hosts_per_frame=hosts, largest_kb=largest)
        print(
            f"{label:>14} {row['server_pct']:6.1f} {extra:+6.1f} {row['loadgen_pct']:5.0f} "
            f"{row['reports_per_s']:6.0f} {frames:9.2f} {kbs:7.0f} {hosts:11.0f} "
            f"{largest:7.1f} {trunc:>5}  {row['machine']}"
        )
    print(f"  +srv%: server CPU above the mean of the 'none' windows ({base:.1f}% of a core)")
    for count in sorted({r["count"] for r in rows if r["kind"] == "all-hosts"}):
        same = [r for r in rows if r["kind"] == "all-hosts" and r["count"] == count]
        extra = statistics.mean(r["server_pct"] for r in same) - base
        frames = statistics.mean(r["frames_per_s"] for r in same)
        coverage = statistics.mean(r["hosts_per_frame"] for r in same) / agents
        print(
            f"  {count} all-hosts subscriber(s): {frames:.2f} summaries/s each, "
            f"{statistics.mean(r['kb_per_s'] for r in same):.0f} KB/s each, "
            f"server +{extra:.2f}% of a core ({extra / count:.3f}% per subscriber)"
        )
        targets += [
            Target(
                f"summaries/s per subscriber, {count} subscribers",
                round(frames, 2),
                FRAMES_PER_S[1],
            ),
            Target(
                f"summaries/s per subscriber, {count} subscribers (at least)",
                round(frames, 2),
                FRAMES_PER_S[0],
                op=">=",
            ),
            Target(
                f"hosts per summary / hosts reporting each second, {count} subscribers",
                round(coverage, 3),
                COVERAGE,
                op=">=",
            ),
            Target(
                f"largest summary, {count} subscribers",
                round(max(r["largest_kb"] for r in same), 1),
                MAX_BYTES / 1024 + 1,
                " KB",
            ),
        ]
    top = max((r["count"] for r in rows if r["kind"] == "all-hosts"), default=0)
    if top:
        same = [r for r in rows if r["kind"] == "all-hosts" and r["count"] == top]
        per = (statistics.mean(r["server_pct"] for r in same) - base) / top
        targets.append(
            Target(
                f"server CPU per all-hosts subscriber at {top}",
                round(per, 3),
                CPU_PER_SUBSCRIBER_PCT,
                "% of a core",
            )
        )
    per_host = [r for r in rows if r["kind"] == "per-host"]
    if per_host:
        extra = statistics.mean(r["server_pct"] for r in per_host) - base
        viewers = per_host[0]["count"]
        print(
            f"  without summaries, {viewers} viewer(s) of every host with a socket per host: "
            f"{statistics.mean(r['frames_per_s'] for r in per_host):.0f} frames/s each, "
            f"server +{extra:.1f}% of a core ({extra / viewers:.2f}% per viewer)"
        )
    return targets


def hub_costs(hosts: int, rounds: int) -> dict[str, float]:
    """In this process, the hub's own costs: a metrics event dispatched with and without
    the summaries kept (µs), and one summary of ``hosts`` hosts framed (ms), full and
    trimmed to CPU and memory."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sysmanage.settings")
    os.environ.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(40))
    sys.path.insert(0, str(REPO))
    import django

    django.setup()
    from sysmanage.hub import Hub  # imported here: Django must be set up first

    class Sink:
        """A subscriber that drops what it is given."""

        user_id: str | None = "u"
        session_tag: str | None = None
        rights: frozenset[str] = frozenset()
        host_scope: frozenset[str] | None = None  # sees every host

        def deliver(self, frame: Any) -> None:
            pass

        def close_from_hub(self, code: int, error: Any) -> None:
            pass

    payloads = [
        {
            "host_id": f"00000000-0000-0000-0000-{i:012d}",
            "hostname": f"agent-{i:05d}",
            "timestamp": "2026-12-05T11:00:00.000Z",
            "metrics": {
                "cpu_usage": 12.5,
                "memory_usage": 40.1,
                "disk_usage": {"/": 40.2, "/var": 51.7},
                "load_average": [0.5, 0.4, 0.3],
            },
            "cpu_count": 4,
        }
        for i in range(hosts)
    ]

    def dispatch_us(hub: Hub) -> float:
        started = time.perf_counter()
        for _ in range(rounds):
            for data in payloads:
                hub.dispatch("host_metrics", data, "2026-12-05T11:00:00.000Z")
        return 1e6 * (time.perf_counter() - started) / (rounds * hosts)

    bare = Hub()
    bare.summaries = {}
    kept = Hub()
    figures = {"dispatch_us_without": dispatch_us(bare), "dispatch_us_with": dispatch_us(kept)}
    for label, filters in (
        ("full", {"host_id": "*"}),
        ("cpu+memory", {"host_id": "*", "metrics": ("cpu", "memory")}),
    ):
        hub = Hub()
        hub.subscribe(Sink(), "host_metrics", filters)
        spent = 0.0
        for _ in range(rounds):
            for data in payloads:
                hub.dispatch("host_metrics", data, None)
            started = time.perf_counter()
            hub.send_summaries(max_hosts=2000, max_bytes=MAX_BYTES)
            spent += time.perf_counter() - started
        figures[f"summary_ms_{label}"] = 1e3 * spent / rounds
    return figures


def main() -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between reports")
    parser.add_argument(
        "--subscribers",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[1, 10, 30],
        help="counts of all-hosts subscribers to measure, comma-separated",
    )
    parser.add_argument(
        "--per-host-viewers",
        type=int,
        default=1,
        help="viewers of every host with a socket per host, for comparison (0: skip)",
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per window")
    parser.add_argument("--redis-url", default=None)
    parser.add_argument(
        "--hub-rounds", type=int, default=50, help="rounds of the in-process hub figures"
    )
    args = parser.parse_args()
    raise_fd_limit()
    costs = hub_costs(args.agents, args.hub_rounds)
    scratch = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    env = server_env(scratch, args.redis_url, None)
    # The per-host viewer holds a socket per host, far past the per-user cap (50): that
    # cap alone refuses such a view in production.
    env["WS_MAX_SOCKETS_PER_USER"] = "0"
    if args.redis_url:
        env["SYSMANAGE_REDIS_PREFIX"] = f"bench-fleet-{secrets.token_hex(4)}"
    proc = None
    try:
        data = prepare(REPO, env, args.agents)
        ids = host_ids(REPO, env, args.agents)
        port = free_port()
        log = scratch / "server.log"
        proc = start_server(REPO, env, port, log)
        server = psutil.Process(proc.pid)
        rows = asyncio.run(measure(args, f"127.0.0.1:{port}", data, ids, server))
    finally:
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(Exception):
                proc.wait(10)
            proc.kill()
        shutil.rmtree(scratch, ignore_errors=True)
    layer = "redis" if args.redis_url else "in-memory"
    print(
        f"fleet metrics benchmark ({layer} layer, {args.agents} agents reporting every "
        f"{args.interval}s, {args.duration:.0f}s windows, {os.cpu_count()} cores)"
    )
    targets = summarise(rows, args.agents)
    print(
        f"  in the hub (this process, {args.hub_rounds} rounds of {args.agents} hosts): a "
        f"metrics event dispatched {costs['dispatch_us_without']:.2f} µs without keeping "
        f"the hosts' latest, {costs['dispatch_us_with']:.2f} µs with; one summary of "
        f"{args.agents} hosts framed in {costs['summary_ms_full']:.2f} ms (all metrics), "
        f"{costs['summary_ms_cpu+memory']:.2f} ms (cpu and memory)"
    )
    targets.append(
        Target(
            "hub cost of keeping each host's latest, per metrics event",
            round(costs["dispatch_us_with"] - costs["dispatch_us_without"], 2),
            2.0,
            " µs",
        )
    )
    connected = min(r["connected"] for r in rows)
    print(f"  agents connected throughout: {connected} of {args.agents}")
    ok = print_targets(targets)
    return 0 if ok and connected == args.agents else 1


if __name__ == "__main__":
    sys.exit(main())
