"""
Fleet runs under faults, on real servers on PostgreSQL and Redis:

* the channel layer (a private ``redis-server``, SIGKILLed and started again empty) is
  lost for a few seconds while a run spans it, over simulated agents (that reconnect)
  of both server processes: the run ends as it would have, every host has an outcome
  with a reason and ran once, and a subscriber on either process that stays connected
  gets the final progress (after the ``events_missed`` notice, it subscribes again, as
  the protocol says, and gets the run's state);
* the database (reached through a :class:`~tests.integration.relay.CuttableRelay`: the
  machine's PostgreSQL is shared and never stopped) is cut for a few seconds while the
  commands of the first batch are with the agent program: the run waits for it, the
  results that came meanwhile are stored once it is back, the run succeeds (no host
  timed out or skipped) and says so, the server logs no traceback and runs the next one;
* a burst of 200 fleet-run requests from one user: each is answered, a response or
  ``RATE_LIMITED`` (``FLEET_RUNS_MAX_RUNNING_PER_USER``), pings are answered meanwhile,
  and no host gets more than that many of the user's commands at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import websockets

from tests.integration import harness
from tests.integration.client import WsClient, api, ws_connect
from tests.integration.conftest import POSTGRES_ADMIN_URL, REDIS_TEST_URL, require_pg_redis
from tests.integration.relay import CuttableRelay
from tests.integration.test_agent_e2e import AGENT_SETTINGS, AgentProcess
from tests.integration.test_ws_redis_restart import REDIS_SERVER, PrivateRedis, events_missed

pytestmark = [pytest.mark.integration, pytest.mark.postgres_redis]

#: How long each simulated agent takes to run a command.
RUN_SECONDS = 1.0
#: How long the channel layer or the database is away.
OUTAGE_SECONDS = 4.0
#: How long a run under a fault may take to end, at most.
END_BOUND = 60.0
#: Runs say they are alive every second; the sweep (every second) marks one silent for
#: ten seconds interrupted: longer than the outages, so that a live run is not taken
#: for a dead one.
RUN_SETTINGS = {
    **AGENT_SETTINGS,
    "FLEET_RUN_HEARTBEAT_SECONDS": "1",
    "FLEET_RUN_STALE_SECONDS": "10",
    "MAINTENANCE_SWEEP_SECONDS": "1",
}


@dataclass
class Ledger:
    """What the simulated agents did: each command's start and end by host, and how many
    commands each host and the whole fleet ran at once at most."""

    running: dict[str, int] = field(default_factory=dict)
    most_per_host: int = 0
    total: int = 0
    most: int = 0
    commands: int = 0
    spans: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    connects: dict[str, int] = field(default_factory=dict)


async def agent(url: str, name: str, token: str, ledger: Ledger, stop: asyncio.Event) -> None:
    """One simulated agent, connected until ``stop``: it reconnects a moment after its
    connection ends or is refused; commands are answered after ``RUN_SECONDS`` with exit
    code 0 (1 on the hosts whose names the command holds)."""
    headers = {"Authorization": f"Bearer {token}"}
    while not stop.is_set():
        with contextlib.suppress(OSError, websockets.WebSocketException, TimeoutError):
            async with websockets.connect(
                url, additional_headers=headers, proxy=None, open_timeout=5
            ) as ws:
                await serve(ws, name, ledger, stop)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def serve(ws: Any, name: str, ledger: Ledger, stop: asyncio.Event) -> None:
    await ws.send(json.dumps({"type": "hello", "data": {"hostname": name, "cpu_count": 1}}))
    if json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] != "welcome":
        return
    ledger.connects[name] = ledger.connects.get(name, 0) + 1

    async def beat() -> None:
        while not stop.is_set():
            with contextlib.suppress(websockets.WebSocketException):
                await ws.send(json.dumps({"type": "heartbeat", "data": {}}))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1)
        await ws.close()

    beating = asyncio.ensure_future(beat())
    running: set[asyncio.Task[None]] = set()
    try:
        async for raw in ws:
            message = json.loads(raw)
            if message.get("type") == "run_command":
                task = asyncio.ensure_future(run(ws, name, message["data"], ledger))
                running.add(task)
                task.add_done_callback(running.discard)
    finally:
        beating.cancel()
        for task in running:
            task.cancel()


async def run(ws: Any, name: str, data: dict[str, Any], ledger: Ledger) -> None:
    ledger.commands += 1
    ledger.running[name] = ledger.running.get(name, 0) + 1
    ledger.most_per_host = max(ledger.most_per_host, ledger.running[name])
    ledger.total += 1
    ledger.most = max(ledger.most, ledger.total)
    started = time.monotonic()
    try:
        await asyncio.sleep(RUN_SECONDS)
    finally:
        ledger.running[name] -= 1
        ledger.total -= 1
    ledger.spans.setdefault(name, []).append((started, time.monotonic()))
    result = {
        "execution_id": data["execution_id"],
        "status": "completed",
        "exit_code": 1 if name in data["command"].split() else 0,
        "stdout": f"{name}\n",
        "stderr": "",
        "execution_time": RUN_SECONDS,
    }
    with contextlib.suppress(websockets.WebSocketException):
        await ws.send(json.dumps({"type": "command_result", "data": result}))


ENROLL = """
import json
from hosts import services
from hosts.models import HostGroup
group = HostGroup.objects.filter(name=%r).first() or services.host_group_create(name=%r)
out = {}
for name in %r:
    host, token = services.host_register(hostname=name, groups=[group])
    out[name] = [str(host.id), token]
print("ENROLLED " + json.dumps(out))
"""


def enroll(d: harness.Deployment, names: list[str], group: str = "fleet") -> dict[str, list[str]]:
    """The hosts ``names``, enrolled in ``group``: ``{name: [host_id, token]}``."""
    said = harness.manage_shell(d.env, ENROLL % (group, group, names))
    line = next(x for x in said.splitlines() if x.startswith("ENROLLED "))
    return dict(json.loads(line[len("ENROLLED ") :]))


async def all_online(
    d: harness.Deployment, count: int, group: str = "fleet", timeout: float = 30
) -> None:
    """Wait until the ``count`` hosts of ``group`` are online."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hosts = await api(
            "GET", d.server.base_url, f"/api/hosts/?group={group}", token=d.token("admin")
        )
        items = hosts.body.get("results", []) if hosts.status == 200 else []
        if sum(1 for h in items if h["status"] == "online") == count:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"not all {count} hosts online after {timeout}s")


@contextlib.asynccontextmanager
async def fleet(
    d: harness.Deployment, enrolled: dict[str, list[str]], group: str = "fleet"
) -> AsyncIterator[Ledger]:
    """The enrolled agents connected, in turn to each server, and online while the block
    runs."""
    ledger, stop = Ledger(), asyncio.Event()
    urls = [s.ws_url.replace("/ws", "/ws/agent") for s in d.servers]
    tasks = [
        asyncio.ensure_future(agent(urls[i % len(urls)], name, token, ledger, stop))
        for i, (name, (_, token)) in enumerate(sorted(enrolled.items()))
    ]
    try:
        await all_online(d, len(enrolled), group)
        yield ledger
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_ended(d: harness.Deployment, run_id: str, timeout: float) -> dict[str, Any]:
    """The run as ``GET /api/fleet-runs/<id>/`` shows it once it is no longer running
    (the database may be away meanwhile: such answers are retried)."""
    deadline = time.monotonic() + timeout
    shown = None
    while time.monotonic() < deadline:
        shown = await api(
            "GET", d.server.base_url, f"/api/fleet-runs/{run_id}/", token=d.token("admin")
        )
        if shown.status == 200 and shown.body["state"] != "running":
            return dict(shown.body)
        await asyncio.sleep(0.5)
    raise AssertionError(f"run {run_id} still not ended after {timeout}s: {shown}")


def check_outcomes(run: dict[str, Any], names: list[str]) -> None:
    """Every host has a final status, and one that did not succeed says why; the counts
    add up."""
    hosts = {h["hostname"]: h for h in run["hosts"]}
    assert sorted(hosts) == sorted(names), hosts
    for host in hosts.values():
        assert host["status"] in ("succeeded", "failed", "skipped"), host
        if host["status"] != "succeeded":
            assert host["reason"], host
        assert host["finished_at"], host
    counts = run["counts"]
    assert counts["queued"] == counts["running"] == 0, counts
    for status in ("succeeded", "failed", "skipped"):
        assert counts[status] == sum(1 for h in hosts.values() if h["status"] == status), run


def start_message(command: str, group: str = "fleet", **data: Any) -> dict[str, Any]:
    return {
        "type": "command",
        "channel": "command_execution",
        "data": {"targets": {"groups": [group]}, "command": command, **data},
    }


async def follow(watcher: WsClient, run_id: str, timeout: float) -> dict[str, Any]:
    """Follow the run's progress until its final event; if events were missed meanwhile
    (the ``events_missed`` notice), subscribe again for a fresh snapshot as the protocol
    says.  Returns ``{"final": event or None, "missed": notices, "snapshot": run or
    None}``."""
    seen: dict[str, Any] = {"final": None, "missed": [], "snapshot": None, "events": 0}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = await watcher.recv(timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
        if events_missed(message):
            seen["missed"].append(message["data"])
            await watcher.send(
                {
                    "type": "subscribe",
                    "channel": "command_execution",
                    "filters": {"run_id": run_id},
                    "id": f"again-{len(seen['missed'])}",
                }
            )
            continue
        if message["type"] == "status" and message["channel"] == "command_execution":
            seen["snapshot"] = message["data"].get("fleet_run")
            if seen["snapshot"] and seen["snapshot"]["state"] != "running":
                return seen
            continue
        if message["type"] == "event" and message["data"].get("run_id") == run_id:
            seen["events"] += 1
            if message["data"]["final"]:
                seen["final"] = message["data"]
                return seen
    return seen


# -- 1. the channel layer lost mid-run ------------------------------------------------


@pytest.fixture(scope="module")
def redis_cluster(
    launch_pg_redis: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PrivateRedis, harness.Deployment]]:
    """Two servers on PostgreSQL and a private Redis the test kills and starts again."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")
    redis = PrivateRedis(tmp_path_factory.mktemp("fleet-faults-redis"))
    redis.start()
    try:
        with launch_pg_redis("fleet-faults-redis", REDIS_URL=redis.url, **RUN_SETTINGS) as d:
            yield redis, d
    finally:
        redis.kill()


async def test_a_run_across_a_channel_layer_outage_ends_with_every_host_accounted_for(
    redis_cluster,
):
    redis, d = redis_cluster
    names = [f"rl-{i}" for i in range(6)]
    enrolled = enroll(d, names)
    a, b = d.servers
    async with (
        fleet(d, enrolled) as ledger,
        ws_connect(a.ws_url, token=d.token("admin")) as requester,
        ws_connect(a.ws_url, token=d.token("admin")) as near,
        ws_connect(b.ws_url, token=d.token("admin")) as far,
    ):
        reply = await requester.request(
            start_message("check rl-5", batch_size=2, timeout=15), timeout=10
        )
        assert reply["type"] == "response", reply
        run_id = reply["data"]["run_id"]
        for watcher in (near, far):
            await watcher.subscribe("command_execution", {"run_id": run_id})
        # the first batch is running: the layer goes away for a few seconds
        deadline = time.monotonic() + 10
        while not ledger.commands and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert ledger.commands, "no host started"
        await asyncio.to_thread(redis.kill)
        await asyncio.sleep(OUTAGE_SECONDS)
        redis.start()
        followed = await asyncio.gather(
            follow(near, run_id, END_BOUND), follow(far, run_id, END_BOUND)
        )
        shown = await run_ended(d, run_id, END_BOUND)
    print(f"\nrun {shown['state']} ({shown['reason']!r}), counts {shown['counts']}")
    for where, seen in zip(("same process", "other process"), followed, strict=True):
        final = seen["final"]
        print(
            f"subscriber on the {where}: {seen['events']} progress events, "
            f"final {final and final['state']}, {len(seen['missed'])} events_missed, "
            f"snapshot {seen['snapshot'] and seen['snapshot']['state']}"
        )
    for host in shown["hosts"]:
        print(f"  {host['hostname']}: {host['status']} {host['reason']!r}")
    check_outcomes(shown, names)
    # Nothing was lost or run twice: the commands crossed between the processes through
    # the database while the layer was away, and each host ran once.
    assert (shown["state"], shown["counts"]["succeeded"], shown["counts"]["failed"]) == (
        "failed",
        5,
        1,
    ), shown
    assert {name: len(spans) for name, spans in ledger.spans.items()} == dict.fromkeys(names, 1)
    # Every subscriber that stayed connected learnt how the run ended: from its final
    # event, or, told that events were missed, from the snapshot it asked for again.
    for seen in followed:
        ended = seen["final"] or seen["snapshot"]
        assert ended is not None, seen
        if seen["final"] is None:
            assert seen["missed"], seen
        assert ended["state"] == shown["state"], (ended, shown)


# -- 2. the database lost mid-run -------------------------------------------------------


@dataclass
class Outage:
    deployment: harness.Deployment
    relay: CuttableRelay


@pytest.fixture(scope="module")
def db_outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    """One server on a fresh PostgreSQL database reached through a relay the test cuts,
    and a Redis prefix of its own on the shared Redis."""
    require_pg_redis()
    work = tmp_path_factory.mktemp("fleet-faults-db")
    database = harness.create_postgres_database(POSTGRES_ADMIN_URL)
    prefix = f"sysmanage-it-fleet-faults-{time.time_ns()}"
    relay = CuttableRelay(urlsplit(POSTGRES_ADMIN_URL).port or 5432)
    servers: list[harness.DaphneServer] = []
    try:
        settings = {
            **harness.COMMON_SETTINGS,
            "DJANGO_SECRET_KEY": harness.new_secret(),
            "SYSMANAGE_VAR_DIR": str(work / "var"),
            **RUN_SETTINGS,
        }
        direct = harness.with_database(POSTGRES_ADMIN_URL, database)
        seed = harness.seed_database(harness.server_env(DATABASE_URL=direct, **settings))
        relayed = urlsplit(direct)._replace(netloc=f"postgres@127.0.0.1:{relay.start()}")
        env = harness.server_env(
            DATABASE_URL=relayed.geturl(),
            REDIS_URL=REDIS_TEST_URL,
            SYSMANAGE_REDIS_PREFIX=prefix,
            **settings,
        )
        servers = harness.start_servers([("fleet-faults-db", env)], work)
        yield Outage(harness.Deployment(env=env, seed=seed, servers=servers, work_dir=work), relay)
    finally:
        for server in servers:
            server.stop()
        relay.close()
        harness.drop_postgres_database(POSTGRES_ADMIN_URL, database)
        harness.delete_redis_keys(REDIS_TEST_URL, prefix)


@contextlib.contextmanager
def real_agents(
    d: harness.Deployment, enrolled: dict[str, list[str]], work: Path
) -> Iterator[list[AgentProcess]]:
    """The agent program for each enrolled host (named as enrolled), while the block runs."""
    agents = []
    for name, (_, token) in sorted(enrolled.items()):
        config = work / f"{name}.toml"
        config.write_text(f'hostname = "{name}"\n')
        agents.append(
            AgentProcess(
                d.server.base_url,
                token,
                work / f"{name}-state",
                work / f"{name}.log",
                config=config,
                log_level="INFO",
            ).start()
        )
    try:
        yield agents
    finally:
        for process in agents:
            process.stop()


async def test_a_run_across_a_database_outage_ends_and_the_next_one_runs(db_outage, tmp_path):
    d, relay = db_outage.deployment, db_outage.relay
    names = [f"db-{i}" for i in range(6)]
    enrolled = enroll(d, names)
    d.token("admin")  # obtained while the database is there
    with real_agents(d, enrolled, tmp_path):
        await all_online(d, len(names))
        async with (
            ws_connect(d.server.ws_url, token=d.token("admin")) as requester,
            ws_connect(d.server.ws_url, token=d.token("admin")) as watcher,
        ):
            reply = await requester.request(start_message("sleep 2", batch_size=2, timeout=15))
            assert reply["type"] == "response", reply
            run_id = reply["data"]["run_id"]
            await watcher.subscribe("command_execution", {"run_id": run_id})
            await watcher.expect(
                lambda m: m["type"] == "event" and m["data"]["started"], 10, what="a start"
            )
            # the first batch's commands are with their agents, whose results come while
            # the database is away
            await asyncio.sleep(1)
            cut_at = time.monotonic()
            relay.cut("refuse")
            try:
                await asyncio.sleep(OUTAGE_SECONDS)
            finally:
                relay.restore()
            shown = await run_ended(d, run_id, END_BOUND)
            ended_after = time.monotonic() - cut_at
            followed = await follow(watcher, run_id, 10)
        print(
            f"\nrun {shown['state']} ({shown['reason']!r}) {ended_after:.1f}s after the cut, "
            f"counts {shown['counts']}"
        )
        for host in shown["hosts"]:
            print(f"  {host['hostname']}: {host['status']} {host['reason']!r}")
        check_outcomes(shown, names)
        # The run rode out the outage: the results that came meanwhile were stored once
        # the database was back (the agents send them again after SERVICE_UNAVAILABLE),
        # the next batches waited for it, and its end was recorded and published.
        assert shown["state"] == "succeeded", shown
        assert ended_after < OUTAGE_SECONDS + 10, ended_after
        told = followed["final"] or followed["snapshot"]
        assert told is not None, followed
        assert told["state"] == "succeeded", followed

        # The server serves on: a new run on every host succeeds.
        await all_online(d, len(names))
        async with ws_connect(d.server.ws_url, token=d.token("admin")) as again:
            reply = await again.request(start_message("true", batch_size=6, timeout=15))
        assert reply["type"] == "response", reply
        after = await run_ended(d, reply["data"]["run_id"], 30)
    assert after["state"] == "succeeded", after


# -- 3. a burst of runs from one user ---------------------------------------------------

#: Fleet-run requests in the burst, and the sockets (of one user) they come on: fifty a
#: socket stays under the message rate limit (bursts of 60), so each reaches the server.
FLOOD = 200
FLOOD_SOCKETS = 4
#: How long a ping may take while the burst is handled.
PING_BOUND = 2.0
#: FLEET_RUNS_MAX_RUNNING_PER_USER, by default.
RUNNING_LIMIT = 10


async def test_a_burst_of_runs_from_one_user_is_answered_and_bounded(redis_cluster):
    _, d = redis_cluster
    names = [f"fl-{i}" for i in range(5)]
    enrolled = enroll(d, names, "flood")
    server = d.servers[0]
    pings: list[float] = []
    async with contextlib.AsyncExitStack() as stack:
        ledger = await stack.enter_async_context(fleet(d, enrolled, "flood"))
        sockets = [
            await stack.enter_async_context(ws_connect(server.ws_url, token=d.token("admin")))
            for _ in range(FLOOD_SOCKETS)
        ]
        pinger = await stack.enter_async_context(ws_connect(server.ws_url, token=d.token("admin")))
        done = asyncio.Event()

        async def ping_meanwhile() -> None:
            while not done.is_set():
                began = time.monotonic()
                await pinger.ping(timeout=30)
                pings.append(time.monotonic() - began)
                await asyncio.sleep(0.2)

        pinging = asyncio.ensure_future(ping_meanwhile())
        began = time.monotonic()
        per_socket = FLOOD // FLOOD_SOCKETS
        for number, client in enumerate(sockets):
            frames = [
                json.dumps(
                    {
                        **start_message("flood", "flood", batch_size=5, timeout=30),
                        "id": f"flood-{number}-{i}",
                    }
                )
                for i in range(per_socket)
            ]
            await client.send_many(frames)

        async def answers(number: int, client: WsClient) -> list[dict[str, Any]]:
            return [
                await client.expect(
                    lambda m, i=i: m.get("id") == f"flood-{number}-{i}", 60, what=f"answer {i}"
                )
                for i in range(per_socket)
            ]

        replies = [
            r
            for got in await asyncio.gather(*(answers(n, c) for n, c in enumerate(sockets)))
            for r in got
        ]
        answered = time.monotonic() - began
        started = [r["data"]["run_id"] for r in replies if r["type"] == "response"]
        refused = [r["data"] for r in replies if r["type"] == "error"]
        ended = [await run_ended(d, run_id, 120) for run_id in started]
        finished = time.monotonic() - began
        done.set()
        await pinging
    codes: dict[str, int] = {}
    for error in refused:
        codes[error["code"]] = codes.get(error["code"], 0) + 1
    states: dict[str, int] = {}
    for run in ended:
        states[run["state"]] = states.get(run["state"], 0) + 1
    print(
        f"\n{FLOOD} requests answered in {answered:.1f}s: {len(started)} runs, refused {codes}; "
        f"all ended in {finished:.1f}s {states}; slowest ping {max(pings):.2f}s of {len(pings)}; "
        f"commands {ledger.commands}, at once at most {ledger.most} "
        f"({ledger.most_per_host} on one host)"
    )
    assert len(replies) == FLOOD
    assert max(pings) < PING_BOUND, pings
    # Each refusal says why, in the protocol's format, on the request's channel.
    for reply in replies:
        if reply["type"] == "error":
            assert reply["channel"] == "command_execution", reply
            assert reply["data"]["code"] == "RATE_LIMITED", reply
            assert reply["data"]["limit"] == RUNNING_LIMIT, reply
            assert "fleet runs running at once" in reply["data"]["message"], reply
        else:
            assert reply["type"] == "response", reply
    # At most RUNNING_LIMIT runs at once: each host had at most that many commands of
    # them at once, not one per request; and every run that started ran to its end.
    assert refused
    assert started
    assert ledger.most_per_host <= RUNNING_LIMIT, ledger.most_per_host
    assert states == {"succeeded": len(started)}, states
