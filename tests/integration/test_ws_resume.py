"""
Resuming streams on real servers: a client that was away gets every event it missed,
exactly once and in order, or is told it cannot and gets the state instead.

Each test compares the resuming client with an observer that stayed connected with the
same subscriptions: on every channel, the two must have seen the same events (same
offsets, same payloads) over the period both cover.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.integration import harness
from tests.integration.client import WsClient, api, next_id, obtain_tokens, ws_connect
from tests.integration.conftest import REDIS_TEST_URL
from tests.integration.test_agent_e2e import AGENT_SETTINGS, run, running_agent

pytestmark = pytest.mark.integration

#: How long the resuming client stays away.
AWAY_SECONDS = 5.0


class Tracker:
    """A client socket read without pause in the background: its events by channel, and
    the last position it saw on each channel (what it resumes from)."""

    def __init__(self, ws: WsClient) -> None:
        self.ws = ws
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.positions: dict[str, dict[str, Any]] = {}
        self.others: list[dict[str, Any]] = []
        self.replies: dict[str, dict[str, Any]] = {}
        #: the ``status`` snapshots that followed subscribe responses
        self.snapshots: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                message = await self.ws.recv(timeout=3600)
                if message["type"] == "event":
                    self.events.setdefault(message["channel"], []).append(message)
                    self.positions[message["channel"]] = {
                        "epoch": message["epoch"],
                        "offset": message["offset"],
                    }
                elif message["type"] == "status" and message.get("id") is not None:
                    self.snapshots.append(message)
                elif message.get("id") is not None:
                    self.replies[message["id"]] = message
                    position = message["data"].get("position")
                    if message["type"] == "response" and position:
                        # a position from before the replay must not overwrite a later one
                        known = self.positions.get(message["channel"])
                        if known is None or known["epoch"] != position["epoch"]:
                            self.positions[message["channel"]] = position
                else:
                    self.others.append(message)
                self._arrived.set()

    async def reply(self, id_: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while id_ not in self.replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no reply to {id_} within {timeout}s")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._arrived.wait()
        return self.replies.pop(id_)

    async def subscribe(
        self, channel: str, filters: dict[str, Any] | None, since: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "subscribe", "channel": channel, "id": next_id()}
        if filters:
            message["filters"] = filters
        if since is not None:
            message["since"] = since
        await self.ws.send(message)
        reply = await self.reply(message["id"])
        assert reply["type"] == "response", reply
        return reply

    async def wait_for(self, channel: str, predicate: Any, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not any(predicate(m) for m in self.events.get(channel, ())):
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching {channel} event within {timeout}s")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def tracked(url: str, token: str) -> AsyncIterator[Tracker]:
    async with ws_connect(url, token=token) as ws:
        tracker = Tracker(ws)
        try:
            yield tracker
        finally:
            await tracker.stop()


def compare(observer: Tracker, resumer: Tracker, channel: str, away_from: int) -> int:
    """Check that ``resumer`` saw exactly ``observer``'s events of ``channel`` over the
    period both cover; return how many of them happened while it was away."""
    seen = [(m["epoch"], m["offset"]) for m in resumer.events.get(channel, [])]
    assert len(seen) == len(set(seen)), f"{channel}: an event arrived twice: {seen}"
    assert seen == sorted(seen), f"{channel}: events out of order: {seen}"
    reference = observer.events.get(channel, [])
    assert reference, f"the observer saw no {channel} event"
    last = min(seen[-1][1] if seen else 0, reference[-1]["offset"])
    first = resumer.events[channel][0]["offset"] if seen else 0
    expected = [m for m in reference if first <= m["offset"] <= last]
    got = [m for m in resumer.events.get(channel, []) if m["offset"] <= last]
    assert [m["offset"] for m in got] == [m["offset"] for m in expected], channel
    assert [m["data"] for m in got] == [m["data"] for m in expected], channel
    return sum(1 for m in expected if m["offset"] > away_from)


async def not_recovered_and_rebuilt(
    tracker: Tracker, reply: dict[str, Any], since: dict[str, Any]
) -> None:
    """A resume of ``host_status`` from ``since`` was refused (a new epoch), nothing was
    replayed, and the snapshot followed the response."""
    assert reply["data"]["recovered"] is False
    assert reply["data"]["position"]["epoch"] != since["epoch"]
    deadline = time.monotonic() + 10
    while not tracker.snapshots:
        assert time.monotonic() < deadline, "no snapshot after recovered: false"
        await asyncio.sleep(0.05)
    (snapshot,) = tracker.snapshots
    assert snapshot["type"] == "status"
    assert snapshot["id"] == reply["id"]
    assert snapshot["channel"] == "host_status"


async def raise_alert(base_url: str, token: str, title: str) -> str:
    response = await api(
        "POST",
        base_url,
        "/api/alerts/",
        token=token,
        json_body={"severity": "warning", "category": "disk_space", "title": title},
    )
    assert response.status == 201, response
    return str(response.body["id"])


# -- one server, SQLite, the in-memory streams, real agents --------------------------------


@pytest.fixture(scope="module")
def deployment(launch_sqlite: Any) -> Iterator[harness.Deployment]:
    with launch_sqlite("resume", **AGENT_SETTINGS) as deployment:
        yield deployment


async def test_a_client_away_for_five_seconds_misses_nothing(deployment, tmp_path: Path):
    server = deployment.server
    token = deployment.token("admin")
    async with (
        running_agent(deployment, tmp_path, "resume-1") as (enrolled, _agent),
        tracked(server.ws_url, token) as observer,
        ws_connect(server.ws_url, token=token) as commander,
    ):
        host_id = enrolled["host_id"]
        subscriptions = {
            "host_status": None,
            "host_metrics": {"host_id": host_id},
            "system_alerts": None,
            "command_execution": {"host_id": host_id},
            "package_operations": {"host_id": host_id},
        }
        for channel, filters in subscriptions.items():
            await observer.subscribe(channel, filters)
        async with tracked(server.ws_url, token) as first:
            for channel, filters in subscriptions.items():
                await first.subscribe(channel, filters)
            await first.wait_for("host_metrics", lambda m: True)
            await raise_alert(server.base_url, token, "before")
            await first.wait_for("system_alerts", lambda m: m["data"]["title"] == "before")
        positions = dict(first.positions)
        away = {channel: p["offset"] for channel, p in positions.items()}

        # Away for five seconds: metrics keep coming, and every kind of event happens.
        left = time.monotonic()
        reply = await run(commander, host_id, "echo resumed", wait=20)
        assert reply["type"] == "response", reply
        package = await commander.request(
            {
                "type": "command",
                "channel": "package_operations",
                "data": {
                    "host_id": host_id,
                    "operation": "remove",
                    "package": "sysmanage-resume-no-such-package",
                },
            },
            timeout=20,
        )
        assert package["type"] == "response", package
        await raise_alert(server.base_url, token, "while away")
        async with running_agent(deployment, tmp_path, "resume-2"):
            pass  # a host comes online (and its agent stops again)
        await asyncio.sleep(max(0.0, AWAY_SECONDS - (time.monotonic() - left)))

        async with tracked(server.ws_url, token) as second:
            second.events = {c: list(ms) for c, ms in first.events.items()}
            second.positions = dict(positions)
            for channel, filters in subscriptions.items():
                reply = await second.subscribe(channel, filters, since=positions[channel])
                assert reply["data"]["recovered"] is True, reply
            await raise_alert(server.base_url, token, "after")
            for tracker in (observer, second):
                await tracker.wait_for("system_alerts", lambda m: m["data"]["title"] == "after")
            await second.wait_for(
                "package_operations", lambda m: m["data"]["status"] in ("completed", "failed")
            )
            await second.wait_for(
                "command_execution", lambda m: m["data"].get("status") == "completed"
            )
            await asyncio.sleep(1.5)  # a metrics event or two after the resume
            missed = {
                channel: compare(observer, second, channel, away[channel])
                for channel in subscriptions
            }
    print(f"events that happened while away, per channel: {missed}")
    assert all(count > 0 for count in missed.values()), missed


async def test_a_restarted_server_is_a_new_epoch_and_the_state_is_sent(launch_sqlite, tmp_path):
    with launch_sqlite("resume-restart") as deployment:
        server = deployment.server
        token = deployment.token("admin")
        async with tracked(server.ws_url, token) as before:
            reply = await before.subscribe("host_status", None)
        position = reply["data"]["position"]
        server.stop()
        (server,) = harness.start_servers([("resume-restart-2", deployment.env)], tmp_path)
        deployment.servers[0] = server
        async with tracked(server.ws_url, token) as after:
            reply = await after.subscribe("host_status", None, since=position)
            await not_recovered_and_rebuilt(after, reply, position)
            assert after.events == {}  # nothing replayed


# -- two servers on Redis: resume on the other process -----------------------------------------


@pytest.fixture(scope="module")
def cluster(launch_pg_redis: Any) -> Iterator[harness.Deployment]:
    with launch_pg_redis("resume-cluster") as deployment:
        yield deployment


@pytest.mark.postgres_redis
async def test_a_client_resumes_on_the_other_process(cluster):
    server_a, server_b = cluster.servers
    token = cluster.token("admin")
    async with tracked(server_b.ws_url, token) as observer:
        await observer.subscribe("system_alerts", None)
        await observer.subscribe("user_activity", None)
        async with tracked(server_a.ws_url, token) as first:
            await first.subscribe("system_alerts", None)
            await first.subscribe("user_activity", None)
            await raise_alert(server_a.base_url, token, "seen on A")
            await first.wait_for("system_alerts", lambda m: m["data"]["title"] == "seen on A")
        positions = dict(first.positions)
        # away: events published through both processes
        for n in range(5):
            server = (server_a, server_b)[n % 2]
            await raise_alert(server.base_url, token, f"away {n}")
            await asyncio.to_thread(
                obtain_tokens, server.base_url, "viewer", cluster.password
            )  # a login
        async with tracked(server_b.ws_url, token) as second:
            second.events = {c: list(ms) for c, ms in first.events.items()}
            for channel in ("system_alerts", "user_activity"):
                since = positions.get(channel)
                if since is None:
                    continue
                reply = await second.subscribe(channel, None, since=since)
                assert reply["data"]["recovered"] is True, reply
            await raise_alert(server_a.base_url, token, "after")
            for tracker in (observer, second):
                await tracker.wait_for("system_alerts", lambda m: m["data"]["title"] == "after")
            missed = compare(
                observer, second, "system_alerts", positions["system_alerts"]["offset"]
            )
            assert missed == 6  # five while away, and "after"
            titles = [m["data"]["title"] for m in second.events["system_alerts"]]
            assert titles[-7:] == ["seen on A", *[f"away {n}" for n in range(5)], "after"]


@pytest.mark.postgres_redis
async def test_a_lost_history_is_not_recovered_and_the_state_is_sent(cluster):
    server_a, server_b = cluster.servers
    token = cluster.token("admin")
    async with tracked(server_a.ws_url, token) as first:
        reply = await first.subscribe("host_status", None)
    position = reply["data"]["position"]
    async with tracked(server_b.ws_url, token) as witness:
        # B knows the channel's history as it was (its node has read the epoch)
        seen = await witness.subscribe("host_status", None)
        assert seen["data"]["position"]["epoch"] == position["epoch"]
        # Redis loses the channel's history (a restart without persistence, an eviction)
        client = redis.Redis.from_url(REDIS_TEST_URL)
        prefix = cluster.env["SYSMANAGE_REDIS_PREFIX"]
        keys = list(client.scan_iter(f"{prefix}:stream:{{host_status}}*"))
        assert keys, "the stream of host_status is not in Redis"
        client.delete(*keys)
        client.close()
        # B notices within LAYER_REJOIN_SECONDS (5 s) and tells its clients; until then it
        # may still serve that history from its own copy, which is as good as Redis' was
        deadline = time.monotonic() + 15
        while not any(m["data"].get("event") == "events_missed" for m in witness.others):
            assert time.monotonic() < deadline, "server B never noticed the history loss"
            await asyncio.sleep(0.1)
    async with tracked(server_b.ws_url, token) as second:
        reply = await second.subscribe("host_status", None, since=position)
        await not_recovered_and_rebuilt(second, reply, position)
