"""
Fleet runs end to end: a command on a host group of twenty simulated agents (speaking
the agent protocol, each in this process) and one host that never connects, through a
real server, in batches of five, stopped by its failure limit; its progress followed
over the WebSocket API with the ``run_id`` filter; refused for a user without the right.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import websockets

from tests.integration import harness
from tests.integration.client import api, ws_connect
from tests.integration.test_agent_e2e import AGENT_SETTINGS, wait_status

pytestmark = pytest.mark.integration

AGENTS = 20
#: sorted before ``fr-00``: in the first batch, and never connected
OFFLINE = "fr-0-offline"
#: how long each simulated agent takes to run a command
RUN_SECONDS = 0.3

ENROLL = """
import json
from hosts import services
group = services.host_group_create(name="fleet")
out = {}
for name in [%s]:
    host, token = services.host_register(hostname=name, groups=[group])
    out[name] = [str(host.id), token]
print("ENROLLED " + json.dumps(out))
"""


@dataclass
class Ledger:
    """What the simulated agents did: each command's start and end, and how many ran
    at once at most."""

    running: int = 0
    most: int = 0
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)


async def agent(url: str, name: str, token: str, ledger: Ledger, stop: asyncio.Event) -> None:
    """One simulated agent: hello, heartbeats, and commands answered after
    ``RUN_SECONDS``; a command fails (exit code 1) on the hosts whose names it holds."""
    headers = {"Authorization": f"Bearer {token}"}
    async with websockets.connect(url, additional_headers=headers, proxy=None) as ws:
        await ws.send(json.dumps({"type": "hello", "data": {"hostname": name, "cpu_count": 1}}))
        assert json.loads(await ws.recv())["type"] == "welcome"

        async def beat() -> None:
            while not stop.is_set():
                await ws.send(json.dumps({"type": "heartbeat", "data": {}}))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1)

        beating = asyncio.ensure_future(beat())
        try:
            async for raw in ws:
                message = json.loads(raw)
                if message.get("type") == "run_command":
                    await run(ws, name, message["data"], ledger)
                elif message.get("type") == "package_operation":
                    await install(ws, name, message["data"])
        except websockets.ConnectionClosed:
            pass
        finally:
            beating.cancel()


async def run(ws: Any, name: str, data: dict[str, Any], ledger: Ledger) -> None:
    if data["command"] == "hang":
        ledger.spans[name] = (time.monotonic(), time.monotonic())
        await asyncio.sleep(3600)  # never answers
    ledger.running += 1
    ledger.most = max(ledger.most, ledger.running)
    started = time.monotonic()
    await asyncio.sleep(RUN_SECONDS)
    ledger.running -= 1
    ledger.spans[name] = (started, time.monotonic())
    code = 1 if name in data["command"].split() else 0
    result = {
        "execution_id": data["execution_id"],
        "status": "completed",
        "exit_code": code,
        "stdout": f"{name}\n",
        "stderr": "",
        "execution_time": RUN_SECONDS,
    }
    await ws.send(json.dumps({"type": "command_result", "data": result}))


async def install(ws: Any, name: str, data: dict[str, Any]) -> None:
    """A package operation: fails on ``fr-02`` (no such package there), else completes."""
    ref = data["operation_id"]
    await ws.send(
        json.dumps(
            {
                "type": "package_progress",
                "data": {"operation_id": ref, "progress": 50, "message": "unpacking"},
            }
        )
    )
    failed = name == "fr-02"
    result = {
        "operation_id": ref,
        "status": "failed" if failed else "completed",
        "exit_code": 100 if failed else 0,
        "output": "",
        "message": "Unable to locate package" if failed else "installed",
    }
    await ws.send(json.dumps({"type": "package_result", "data": result}))


@pytest.fixture(scope="module")
def deployment(launch_sqlite: Any) -> Iterator[harness.Deployment]:
    """One server on SQLite with short agent intervals."""
    with launch_sqlite("fleet-runs", **AGENT_SETTINGS) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def enrolled(deployment: harness.Deployment) -> dict[str, list[str]]:
    """``fr-00`` … ``fr-19`` and the offline host, enrolled in group ``fleet``."""
    names = [f"fr-{i:02d}" for i in range(AGENTS)] + [OFFLINE]
    said = harness.manage_shell(deployment.env, ENROLL % ", ".join(repr(n) for n in names))
    line = next(x for x in said.splitlines() if x.startswith("ENROLLED "))
    return dict(json.loads(line[len("ENROLLED ") :]))


@contextlib.asynccontextmanager
async def fleet(d: harness.Deployment, enrolled: dict[str, list[str]]) -> AsyncIterator[Ledger]:
    """The twenty agents connected (and online) while the block runs."""
    ledger, stop = Ledger(), asyncio.Event()
    url = d.server.ws_url.replace("/ws", "/ws/agent")
    tasks = [
        asyncio.ensure_future(agent(url, name, token, ledger, stop))
        for name, (_, token) in enrolled.items()
        if name != OFFLINE
    ]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            hosts = await api(
                "GET", d.server.base_url, "/api/hosts/?group=fleet", token=d.token("admin")
            )
            items = hosts.body.get("results", hosts.body)
            if sum(1 for h in items if h["status"] == "online") == AGENTS:
                break
            await asyncio.sleep(0.3)
        else:
            raise AssertionError("the agents did not all come online")
        yield ledger
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_fleet_run_in_batches_stopped_by_its_failure_limit(deployment, enrolled):
    d = deployment
    failing = "fr-01 fr-03 fr-06"
    async with (
        fleet(d, enrolled) as ledger,
        ws_connect(d.server.ws_url, token=d.token("admin")) as requester,
        ws_connect(d.server.ws_url, token=d.token("admin")) as watcher,
    ):
        reply = await requester.request(
            {
                "type": "command",
                "channel": "command_execution",
                "data": {
                    "targets": {"groups": ["FLEET"]},
                    "command": f"check {failing}",
                    "timeout": 10,
                    "batch_size": 5,
                    "failure_limit": 3,
                },
            }
        )
        assert reply["type"] == "response", reply
        run_id = reply["data"]["run_id"]
        assert reply["data"]["total"] == AGENTS + 1
        assert reply["data"]["state"] == "running"
        await watcher.subscribe("command_execution", {"run_id": run_id})
        events = []
        while True:
            message = await watcher.recv(timeout=30)
            if message["type"] == "status":
                assert message["data"]["fleet_run"]["run_id"] == run_id
                continue
            assert message["type"] == "event", message
            # The run_id filter keeps each host's own command events away.
            assert message["data"].get("run_id") == run_id, message
            events.append(message["data"])
            if message["data"]["final"]:
                break

    last = events[-1]
    assert last["state"] == "stopped"
    assert last["counts"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 6,
        "failed": 3,
        "skipped": 12,
    }
    # Batches of five: never more at once, and the second batch began once the first
    # (four online hosts) had ended; the hosts after the second batch never ran.
    assert ledger.most <= 5
    first = [ledger.spans[f"fr-{i:02d}"] for i in range(4)]
    second = [ledger.spans[f"fr-{i:02d}"] for i in range(4, 9)]
    assert min(start for start, _ in second) >= max(end for _, end in first)
    assert not any(f"fr-{i:02d}" in ledger.spans for i in range(9, AGENTS))
    # Coalesced: far fewer frames than host changes (two per host that ran).
    assert len(events) < 2 * 9
    # Each host that ran was said to start (once), in the event of its result or before.
    started = {h["hostname"]: i for i, e in enumerate(events) for h in e["started"]}
    ended = {r["hostname"]: i for i, e in enumerate(events) for r in e["results"]}
    assert set(started) == set(ledger.spans), (started, ledger.spans)
    assert sum(len(e["started"]) for e in events) == len(started)
    assert all(started[name] <= ended[name] for name in started)

    shown = await api(
        "GET", d.server.base_url, f"/api/fleet-runs/{run_id}/", token=d.token("admin")
    )
    assert shown.status == 200, shown
    hosts = {h["hostname"]: h for h in shown.body["hosts"]}
    assert hosts[OFFLINE]["status"] == "skipped"
    assert "unknown" in hosts[OFFLINE]["reason"] or "offline" in hosts[OFFLINE]["reason"]
    assert hosts["fr-06"]["status"] == "failed"
    assert hosts["fr-06"]["exit_code"] == 1
    assert (
        hosts["fr-12"] | {"status": "skipped", "reason": "failure limit reached"} == hosts["fr-12"]
    )
    assert hosts["fr-00"]["status"] == "succeeded"
    assert shown.body["requested_by"] == "admin"
    assert shown.body["target"] == {"groups": ["FLEET"], "host_ids": []}


async def test_fleet_run_refused_without_the_right_on_every_host(deployment, enrolled):
    d = deployment
    async with ws_connect(d.server.ws_url, token=d.token("viewer")) as client:
        reply = await client.request(
            {
                "type": "command",
                "channel": "command_execution",
                "data": {"targets": {"groups": ["fleet"]}, "command": "uptime"},
            }
        )
        # a reboot is not a command_execution run: said so, before any right is looked at
        misplaced = await client.request(
            {
                "type": "command",
                "channel": "command_execution",
                "data": {"targets": {"groups": ["fleet"]}, "kind": "reboot"},
            }
        )
    assert misplaced["data"]["code"] == "INVALID_COMMAND", misplaced
    assert "runs go on package_operations" in misplaced["data"]["message"]
    assert reply["type"] == "error", reply
    assert reply["data"]["code"] == "PERMISSION_DENIED", reply
    assert f"{AGENTS + 1} of the {AGENTS + 1} targeted hosts" in reply["data"]["message"]
    listed = await api("GET", d.server.base_url, "/api/fleet-runs/", token=d.token("admin"))
    assert all(run["command"] != "uptime" for run in listed.body["results"])


async def test_package_fleet_run_over_rest_goes_on_without_its_requester(deployment, enrolled):
    d = deployment
    fleet_ids = [host_id for name, (host_id, _) in enrolled.items() if name != OFFLINE]
    async with fleet(d, enrolled):
        started = await api(
            "POST",
            d.server.base_url,
            "/api/fleet-runs/",
            token=d.token("admin"),
            json_body={
                "kind": "package",
                "targets": {"host_ids": fleet_ids[:10]},
                "operation": "install",
                "package": "nginx",
                "batch_size": 4,
                "timeout": 20,
            },
        )
        assert started.status == 202, started
        run_id = started.body["run_id"]
        assert started.body["kind"] == "package"
        assert started.body["command"] == "install nginx"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            shown = await api(
                "GET", d.server.base_url, f"/api/fleet-runs/{run_id}/", token=d.token("admin")
            )
            if shown.body["state"] != "running":
                break
            await asyncio.sleep(0.3)
    assert shown.body["state"] == "failed", shown.body
    assert shown.body["counts"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 9,
        "failed": 1,
        "skipped": 0,
    }
    hosts = {h["hostname"]: h for h in shown.body["hosts"]}
    assert hosts["fr-02"]["status"] == "failed"
    assert hosts["fr-02"]["reason"] == "Unable to locate package"
    operation = await api(
        "GET",
        d.server.base_url,
        f"/api/package-operations/{hosts['fr-03']['operation_id']}/",
        token=d.token("admin"),
    )
    assert operation.body["status"] == "completed"
    assert operation.body["package"] == "nginx"


async def test_with_offline_wait_a_host_that_returns_runs_then(deployment, enrolled):
    d = deployment
    targets = [enrolled["fr-00"][0], enrolled[OFFLINE][0]]
    ledger, stop = Ledger(), asyncio.Event()
    url = d.server.ws_url.replace("/ws", "/ws/agent")
    async with fleet(d, enrolled):
        started = await api(
            "POST",
            d.server.base_url,
            "/api/fleet-runs/",
            token=d.token("admin"),
            json_body={
                "targets": {"host_ids": targets},
                "command": "hostname",
                "offline": "wait",
                "offline_wait": 60,
            },
        )
        assert started.status == 202, started
        run_id = started.body["run_id"]
        await asyncio.sleep(1.5)
        shown = await api(
            "GET", d.server.base_url, f"/api/fleet-runs/{run_id}/", token=d.token("admin")
        )
        assert shown.body["state"] == "running"
        assert shown.body["counts"]["queued"] == 1  # waiting for the host to return
        returned = asyncio.ensure_future(agent(url, OFFLINE, enrolled[OFFLINE][1], ledger, stop))
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                shown = await api(
                    "GET", d.server.base_url, f"/api/fleet-runs/{run_id}/", token=d.token("admin")
                )
                if shown.body["state"] != "running":
                    break
                await asyncio.sleep(0.3)
        finally:
            stop.set()
            returned.cancel()
            await asyncio.gather(returned, return_exceptions=True)
    assert shown.body["state"] == "succeeded", shown.body
    assert OFFLINE in ledger.spans
    assert {h["hostname"]: h["status"] for h in shown.body["hosts"]} == {
        "fr-00": "succeeded",
        OFFLINE: "succeeded",
    }


@pytest.fixture(scope="module")
def killable(launch_sqlite: Any) -> Iterator[harness.Deployment]:
    """A server of its own, to be killed: its runs say they are alive every second and
    are interrupted after three seconds of silence."""
    with launch_sqlite(
        "fleet-runs-killed",
        **AGENT_SETTINGS,
        FLEET_RUN_HEARTBEAT_SECONDS="1",
        FLEET_RUN_STALE_SECONDS="3",
        MAINTENANCE_SWEEP_SECONDS="1",
    ) as deployment:
        yield deployment


async def test_a_run_whose_server_was_killed_is_marked_interrupted(killable):
    d = killable
    said = harness.manage_shell(d.env, ENROLL % "'k-0', 'k-1'")
    line = next(x for x in said.splitlines() if x.startswith("ENROLLED "))
    enrolled = json.loads(line[len("ENROLLED ") :])
    ledger, stop = Ledger(), asyncio.Event()
    url = d.server.ws_url.replace("/ws", "/ws/agent")
    agents = [
        asyncio.ensure_future(agent(url, name, token, ledger, stop))
        for name, (_, token) in enrolled.items()
    ]
    try:
        for host_id, _ in enrolled.values():
            await wait_status(d, host_id, "online")
        started = await api(
            "POST",
            d.server.base_url,
            "/api/fleet-runs/",
            token=d.token("admin"),
            json_body={
                "targets": {"groups": ["fleet"]},
                "command": "hang",
                "batch_size": 1,
                "timeout": 600,
            },
        )
        assert started.status == 202, started
        run_id = started.body["run_id"]
        deadline = time.monotonic() + 10
        while "k-0" not in ledger.spans and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert "k-0" in ledger.spans
        d.server.kill()
        d.server.start().wait_ready()
        # The agents come back, as they do after a restart (and with the first socket,
        # the process starts its maintenance).
        agents += [
            asyncio.ensure_future(agent(url, name, token, ledger, stop))
            for name, (_, token) in enrolled.items()
        ]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            shown = await api(
                "GET", d.server.base_url, f"/api/fleet-runs/{run_id}/", token=d.token("admin")
            )
            if shown.status == 200 and shown.body["state"] != "running":
                break
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        for task in agents:
            task.cancel()
        await asyncio.gather(*agents, return_exceptions=True)
    assert shown.body["state"] == "interrupted", shown.body
    assert shown.body["reason"] == "The server process running it stopped"
    assert [(h["hostname"], h["status"], h["reason"]) for h in shown.body["hosts"]] == [
        ("k-0", "skipped", "The server process running it stopped"),
        ("k-1", "skipped", "The server process running it stopped"),
    ]


@pytest.fixture(scope="module")
def cluster(launch_pg_redis: Any) -> Iterator[harness.Deployment]:
    """Two servers on PostgreSQL and Redis, with short agent intervals."""
    with launch_pg_redis("fleet-runs-pg", **AGENT_SETTINGS) as deployment:
        yield deployment


@pytest.mark.postgres_redis
async def test_a_run_on_one_server_reaches_agents_of_the_other(cluster):
    d = cluster
    names = [f"pg-{i}" for i in range(10)]
    said = harness.manage_shell(d.env, ENROLL % ", ".join(repr(n) for n in names))
    line = next(x for x in said.splitlines() if x.startswith("ENROLLED "))
    enrolled = json.loads(line[len("ENROLLED ") :])
    a, b = d.servers
    ledger, stop = Ledger(), asyncio.Event()
    # even hosts on server a, odd ones on server b
    agents = [
        asyncio.ensure_future(
            agent(
                (a if i % 2 == 0 else b).ws_url.replace("/ws", "/ws/agent"),
                name,
                enrolled[name][1],
                ledger,
                stop,
            )
        )
        for i, name in enumerate(names)
    ]
    try:
        for host_id, _ in enrolled.values():
            await wait_status(d, host_id, "online")
        async with (
            ws_connect(a.ws_url, token=d.token("admin")) as requester,
            ws_connect(b.ws_url, token=d.token("admin")) as watcher,
        ):
            reply = await requester.request(
                {
                    "type": "command",
                    "channel": "command_execution",
                    "data": {
                        "targets": {"groups": ["fleet"]},
                        "command": "check pg-4 pg-5",
                        "batch_size": 3,
                        "failure_limit": "20%",
                    },
                }
            )
            assert reply["type"] == "response", reply
            run_id = reply["data"]["run_id"]
            await watcher.subscribe("command_execution", {"run_id": run_id})
            while True:
                message = await watcher.recv(timeout=30)
                if message["type"] == "event" and message["data"].get("final"):
                    break
    finally:
        stop.set()
        for task in agents:
            task.cancel()
        await asyncio.gather(*agents, return_exceptions=True)
    final = message["data"]
    # batches pg-0..2, pg-3..5 (two failures: 20% of 10), then the rest skipped
    assert final["state"] == "stopped"
    assert final["counts"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 4,
        "failed": 2,
        "skipped": 4,
    }
    assert sorted(ledger.spans) == names[:6]
