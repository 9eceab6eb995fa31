"""
Every host's live metrics on one socket, against a real server: agents on ``/ws/agent``
report several times a second, and a staff client subscribed to ``host_metrics`` with
``host_id: "*"`` gets about one summary a second listing each host's latest report --
not a frame per report -- bounded in hosts, saying when it left some out.  Others are
refused with ``SUBSCRIPTION_FAILED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import websockets

from tests.integration import harness
from tests.integration.client import WsClient, ws_connect
from tests.integration.harness import Deployment

pytestmark = pytest.mark.integration

#: hosts in a summary, at most (the smallest byte bound, 64 KiB, holds more)
MAX_HOSTS = 25
HOSTS = 60
#: seconds between two reports of one agent
REPORT_EVERY = 0.25

REGISTER = """
import json
from hosts.services import host_register
print(json.dumps([
    [str(host.pk), token]
    for host, token in (host_register(hostname=f"fleet-metrics-{{i:03d}}") for i in range({count}))
]))
"""


@pytest.fixture(scope="module")
def fleet(launch_sqlite: Any) -> Iterator[tuple[Deployment, list[tuple[str, str]]]]:
    """One server whose summaries hold at most MAX_HOSTS hosts, and HOSTS enrolled hosts
    (their ids and agent tokens)."""
    with launch_sqlite("fleetmetrics", WS_FLEET_METRICS_MAX_HOSTS=str(MAX_HOSTS)) as deployment:
        out = harness.manage_shell(deployment.env, REGISTER.format(count=HOSTS))
        hosts = [tuple(pair) for pair in json.loads(out.strip().splitlines()[-1])]
        yield deployment, hosts  # type: ignore[misc]


async def run_agent(
    url: str, host: tuple[str, str], stop: asyncio.Event, sent: list[float]
) -> None:
    """One agent: ``hello``, then a report every REPORT_EVERY seconds whose CPU figure
    counts up (so that the latest one is known), until ``stop``."""
    host_id, token = host
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}, proxy=None
    ) as ws:
        await ws.send(json.dumps({"type": "hello", "data": {"hostname": host_id, "cpu_count": 2}}))
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        count = 0
        while not stop.is_set():
            count += 1
            metrics = {"cpu_usage": float(count), "memory_usage": 10.0}
            await ws.send(json.dumps({"type": "metrics", "data": {"metrics": metrics}}))
            sent.append(float(count))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REPORT_EVERY)
        await ws.send(json.dumps({"type": "heartbeat", "data": {}}))


async def collect(client: WsClient, seconds: float) -> list[dict[str, Any]]:
    """The ``host_metrics`` events the client gets within ``seconds``."""
    events, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = await client.recv(left)
        except TimeoutError:
            break
        if message["type"] == "event" and message["channel"] == "host_metrics":
            events.append(message)
    return events


async def watch_fleet(
    deployment: Deployment, hosts: list[tuple[str, str]], seconds: float
) -> tuple[list[dict[str, Any]], int, dict[str, Any]]:
    """Subscribe a staff client to every host, run one agent per host for ``seconds``;
    return the summaries received, how many reports were sent, and the snapshot."""
    server = deployment.server
    async with ws_connect(server.ws_url, token=deployment.token("admin")) as client:
        _, snapshot = await client.subscribe_with_status("host_metrics", {"host_id": "*"})
        stop, sent = asyncio.Event(), []
        agents = [
            asyncio.ensure_future(run_agent(f"{server.ws_url}/agent", host, stop, sent))
            for host in hosts
        ]
        try:
            events = await collect(client, seconds)
        finally:
            stop.set()
            await asyncio.gather(*agents)
        events += await collect(client, 2.5)  # the reports still due
    return events, len(sent), snapshot


async def test_staff_get_one_summary_a_second_with_each_hosts_latest_report(
    fleet: tuple[Deployment, list[tuple[str, str]]],
) -> None:
    deployment, hosts = fleet
    watched = hosts[:10]
    events, reports, snapshot = await watch_fleet(deployment, watched, seconds=4.0)
    assert snapshot["data"]["truncated"] is False
    assert reports >= 10 * 4 / REPORT_EVERY * 0.8, reports  # about 160 reports
    # one frame a second (the window plus the wait for the last), not one per report
    assert 3 <= len(events) <= 8, [e["timestamp"] for e in events]
    for event in events:
        assert "offset" not in event  # a summary has no place on the stream
        data = event["data"]
        listed = [h["host_id"] for h in data["hosts"]]
        assert len(listed) == len(set(listed))  # each host once, with its latest report
        assert data["count"] == len(listed)
        assert data["truncated"] is False
    latest: dict[str, float] = {}
    for event in events:
        for item in event["data"]["hosts"]:
            assert latest.get(item["host_id"], 0.0) < item["metrics"]["cpu_usage"]
            latest[item["host_id"]] = item["metrics"]["cpu_usage"]
    assert set(latest) == {host_id for host_id, _ in watched}
    # reports coalesced: every summary lists a host at most once however often it reported
    listed_total = sum(len(e["data"]["hosts"]) for e in events)
    assert listed_total < reports / 2, (listed_total, reports)

    # a new subscriber starts from the snapshot: the latest report of each of them
    async with ws_connect(deployment.server.ws_url, token=deployment.token("admin")) as client:
        _, snapshot = await client.subscribe_with_status("host_metrics", {"host_id": "*"})
    shown = {h["host_id"]: h["metrics"]["cpu_usage"] for h in snapshot["data"]["hosts"]}
    assert {h: shown[h] for h in latest} == latest


async def test_a_summary_is_bounded_and_says_so(
    fleet: tuple[Deployment, list[tuple[str, str]]],
) -> None:
    deployment, hosts = fleet
    events, _, _ = await watch_fleet(deployment, hosts, seconds=4.0)
    assert 3 <= len(events) <= 9, [e["timestamp"] for e in events]
    truncated = [e for e in events if e["data"]["truncated"]]
    assert truncated, "60 hosts reporting: summaries of 25 must leave some out"
    for event in events:
        data = event["data"]
        assert len(data["hosts"]) <= MAX_HOSTS
        assert data["count"] >= len(data["hosts"])
        assert data["truncated"] == (data["count"] > len(data["hosts"]))
    # the hosts left out lead the next summary: every host is shown in turn
    assert {h["host_id"] for e in events for h in e["data"]["hosts"]} == {h for h, _ in hosts}


async def test_others_are_refused_with_subscription_failed(
    fleet: tuple[Deployment, list[tuple[str, str]]],
) -> None:
    deployment, hosts = fleet
    async with ws_connect(deployment.server.ws_url, token=deployment.token("viewer")) as client:
        error = await client.request(
            {"type": "subscribe", "channel": "host_metrics", "filters": {"host_id": "*"}}
        )
        assert error["type"] == "error"
        assert error["channel"] == "subscription"
        assert error["data"]["code"] == "SUBSCRIPTION_FAILED"
        assert error["data"]["requested_channel"] == "host_metrics"
        # one host at a time stays open to everyone
        await client.subscribe("host_metrics", {"host_id": hosts[0][0]})
