"""
Redis restarts empty under two running server processes: each process notices that its
membership of the events group is gone, rejoins within LAYER_REJOIN_SECONDS, tells its
clients that events may have been missed, and events cross processes again, with no
server restart.  /readyz answers 503 while Redis is down.

The Redis here is a private ``redis-server`` (no persistence) on a free loopback port,
killed with SIGKILL and started again, empty, on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_client

from tests.integration import harness
from tests.integration.client import WsClient, api, ws_connect
from tests.integration.harness import Deployment
from tests.integration.test_agent_e2e import (
    AGENT_SETTINGS,
    AgentProcess,
    register,
    wait_status,
)

pytestmark = [pytest.mark.integration, pytest.mark.postgres_redis]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
#: The default LAYER_REJOIN_SECONDS is 5: the notice is due within that of Redis's return.
NOTICE_TIMEOUT = 15.0
#: Loopback only, and nothing kept on disk: a restarted server starts empty.
REDIS_OPTIONS = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
EVENT_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A redis-server of the test's own, without persistence: a restart starts empty."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.work = work
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it and wait until it answers.  Call it from the test's own thread: the
        process gets SIGTERM when the thread that started it ends (``_die_with_parent``),
        and a worker thread of ``asyncio.to_thread`` ends with the test's event loop."""
        self.work.mkdir(parents=True, exist_ok=True)
        log = open(self.work / "redis.log", "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--dir", str(self.work), *REDIS_OPTIONS],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=harness._die_with_parent if sys.platform == "linux" else None,
        )
        log.close()
        deadline = time.monotonic() + 10
        while harness.redis_reachable(self.url):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server did not start: {self.log()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        return (self.work / "redis.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def redis_and_cluster(
    launch_pg_redis: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PrivateRedis, Deployment]]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")
    redis = PrivateRedis(tmp_path_factory.mktemp("private-redis"))
    redis.start()
    try:
        with launch_pg_redis("redis-restart", REDIS_URL=redis.url) as deployment:
            yield redis, deployment
    finally:
        redis.kill()


def alert_raised(alert_id: str):
    return lambda m: (
        m["type"] == "event"
        and m["channel"] == "system_alerts"
        and m["data"]["alert_id"] == alert_id
    )


def events_missed(m: dict[str, Any]) -> bool:
    return (
        m["type"] == "status"
        and m["channel"] == "system"
        and m["data"].get("event") == "events_missed"
    )


async def raise_alert(server: harness.DaphneServer, d: Deployment, title: str) -> str:
    response = await api(
        "POST",
        server.base_url,
        "/api/alerts/",
        token=d.token("admin"),
        json_body={"severity": "warning", "category": "disk_space", "title": title},
    )
    assert response.status == 201, response
    return str(response.body["id"])


async def readiness(server: harness.DaphneServer) -> tuple[int, str]:
    return await asyncio.to_thread(harness.http_get, f"{server.base_url}/readyz", 2.0)


async def wait_for_readiness(server: harness.DaphneServer, status: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        got, body = await readiness(server)
        if got == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz of {server.name} still {got} {body!r} after {timeout}s")
        await asyncio.sleep(0.1)


async def test_events_cross_processes_again_after_redis_restarts_empty(redis_and_cluster):
    redis, cluster = redis_and_cluster
    server_a, server_b = cluster.servers
    async with (
        ws_connect(server_a.ws_url, token=cluster.token("viewer")) as on_a,
        ws_connect(server_b.ws_url, token=cluster.token("viewer")) as on_b,
    ):
        await on_a.subscribe("system_alerts")
        await on_b.subscribe("system_alerts")
        before = await raise_alert(server_b, cluster, "before the restart")
        await on_a.expect(alert_raised(before), EVENT_TIMEOUT)
        await on_b.expect(alert_raised(before), EVENT_TIMEOUT)
        assert (await readiness(server_a))[0] == 200
        logs = {s.name: s.log_size() for s in (server_a, server_b)}

        await asyncio.to_thread(redis.kill)
        body = json.loads(await wait_for_readiness(server_a, 503, timeout=10))
        assert body["checks"]["channel_layer"].startswith("unreachable since "), body
        assert body["checks"]["database"] == "ok", body
        redis.start()  # empty: the group and its members are gone
        restarted = time.monotonic()

        notices = [
            await client.expect(events_missed, NOTICE_TIMEOUT, what="an events_missed status")
            for client in (on_a, on_b)
        ]
        noticed = time.monotonic() - restarted
        print(f"events_missed on both processes {noticed:.2f}s after Redis restarted")
        for notice in notices:
            assert notice["data"]["since"] <= notice["data"]["until"]
            assert notice["data"]["message"]
        assert (await readiness(server_a))[0] == 200

        after = await raise_alert(server_b, cluster, "after the restart, via B")
        await on_a.expect(alert_raised(after), EVENT_TIMEOUT)
        await on_b.expect(alert_raised(after), EVENT_TIMEOUT)
        back = await raise_alert(server_a, cluster, "after the restart, via A")
        await on_b.expect(alert_raised(back), EVENT_TIMEOUT)
        await on_a.expect(alert_raised(back), EVENT_TIMEOUT)

    for server in (server_a, server_b):
        log = server.log_since(logs[server.name])
        # loud, but once: not a line per retry
        assert log.count("channel layer unreachable (") == 1, log
        assert log.count("rejoined the events group") == 1, log


#: Long enough for the node's retries to back off to their longest wait (5 s).
LONG_OUTAGE = 8.0


async def test_after_a_long_outage_a_process_tells_its_clients_once_and_delivers_at_once(
    redis_and_cluster,
):
    """Redis is down long enough for the retries to back off to their longest wait, and
    returns empty: each process tells its clients of it once (not again when it finds
    the histories lost), and reads the streams again as soon as it rejoins, so that an
    alert raised right after the notice is delivered at once."""
    redis, cluster = redis_and_cluster
    server_a, server_b = cluster.servers
    async with (
        ws_connect(server_a.ws_url, token=cluster.token("viewer")) as on_a,
        ws_connect(server_b.ws_url, token=cluster.token("viewer")) as on_b,
    ):
        await on_a.subscribe("system_alerts")
        await on_b.subscribe("system_alerts")
        await asyncio.to_thread(redis.kill)
        await asyncio.sleep(LONG_OUTAGE)
        redis.start()
        for client in (on_a, on_b):
            await client.expect(events_missed, NOTICE_TIMEOUT, what="an events_missed status")
        alert = await raise_alert(server_b, cluster, "right after the notice")
        for client in (on_a, on_b):
            await client.expect(alert_raised(alert), 1.5, what="the alert at once")
        await asyncio.sleep(4)  # time for a second notice to arrive, if one is sent
        again = [m for client in (on_a, on_b) for m in client.pending if events_missed(m)]
        assert not again, again


#: More resuming clients than redis-py's default connection pool (100) would serve at once.
RESUMERS = 150
#: Sockets per user and process are capped (WS_MAX_SOCKETS_PER_USER, 50): spread the users.
USERS = ("admin", "viewer", "doomed")


async def resumers(
    stack: contextlib.AsyncExitStack, server: harness.DaphneServer, d: Deployment, count: int
) -> list[tuple[WsClient, dict[str, Any]]]:
    """``count`` clients of ``server`` subscribed to system_alerts, with their positions."""
    found = []
    for index in range(count):
        client = await stack.enter_async_context(
            ws_connect(server.ws_url, token=d.token(USERS[index % len(USERS)]))
        )
        reply = await client.subscribe("system_alerts")
        found.append((client, reply["data"]["position"]))
    return found


async def resume_all(
    clients: list[tuple[WsClient, dict[str, Any]]], timeout: float
) -> list[dict[str, Any]]:
    """Every client subscribes again from its position, all at once; return the answers."""
    for client, position in clients:
        await client.send(
            {"type": "subscribe", "channel": "system_alerts", "since": position, "id": "again"}
        )
    return [
        await client.expect(lambda m: m.get("id") == "again", timeout, what="an answer")
        for client, _ in clients
    ]


def pause_redis(url: str, milliseconds: int) -> None:
    """Make Redis hold every client's commands for a while (``CLIENT PAUSE``)."""
    client = redis_client.Redis.from_url(url)
    try:
        client.execute_command("CLIENT", "PAUSE", str(milliseconds), "ALL")
    finally:
        client.close()


async def test_a_burst_of_resumes_while_redis_stalls_is_answered(redis_and_cluster):
    """150 clients of one process resume at once while Redis stalls: each waits for a
    connection to Redis and is answered, none is refused for want of one."""
    redis, cluster = redis_and_cluster
    server = cluster.servers[0]
    async with contextlib.AsyncExitStack() as stack:
        clients = await resumers(stack, server, cluster, RESUMERS)
        pause_redis(redis.url, 1500)  # the resumes pile up meanwhile
        answers = await resume_all(clients, timeout=20)
    refused = [a["data"] for a in answers if a["type"] != "response"]
    assert not refused, f"{len(refused)} refused, e.g. {refused[0]}"
    assert all(a["data"]["recovered"] is True for a in answers)


async def test_connections_pooled_before_redis_restarts_are_not_taken_for_a_new_outage(
    redis_and_cluster,
):
    """After Redis restarts empty, the connections a process pooled before are dead.
    They are replaced at their first use: the resumes that follow the events_missed
    notice are answered, and the process announces the outage once, not again when it
    meets a dead connection."""
    redis, cluster = redis_and_cluster
    server = cluster.servers[0]
    async with contextlib.AsyncExitStack() as stack:
        clients = await resumers(stack, server, cluster, 60)
        pause_redis(redis.url, 1000)  # resumes during the pause: one pooled connection each
        await resume_all(clients, timeout=20)
        log_from = server.log_size()

        await asyncio.to_thread(redis.kill)
        redis.start()
        for client, _ in clients:
            await client.expect(events_missed, NOTICE_TIMEOUT, what="an events_missed status")
        answers = await resume_all(clients, timeout=20)
        refused = [a["data"] for a in answers if a["type"] != "response"]
        assert not refused, f"{len(refused)} refused, e.g. {refused[0]}"
        assert all(a["data"]["recovered"] is False for a in answers)  # a new epoch
        await asyncio.sleep(3)  # time for a second notice, if a dead connection caused one
        again = [m for client, _ in clients for m in client.pending if events_missed(m)]
        assert not again, f"{len(again)} clients told of a second outage"
    log = server.log_since(log_from)
    assert log.count("channel layer unreachable (") == 1, log
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def redis_and_agents(
    launch_pg_redis: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PrivateRedis, Deployment]]:
    """Two servers on a private Redis, with the short agent intervals of the agent tests."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")
    redis = PrivateRedis(tmp_path_factory.mktemp("private-redis-agents"))
    redis.start()
    try:
        with launch_pg_redis("redis-agents", REDIS_URL=redis.url, **AGENT_SETTINGS) as deployment:
            yield redis, deployment
    finally:
        redis.kill()


async def test_commands_sent_while_redis_is_down_end_with_their_results(redis_and_agents, tmp_path):
    """The agent is connected to one process, the requester to the other, and Redis is
    down: neither the nudge nor the confirmation that the agent was sent a command
    (agent_took) can cross.  The agent's process finds the commands in the database and
    sends them; the requester, without a confirmation, finds them handed over and waits
    for their results, instead of recording them as failed (and then dropping the
    results): the first still running when the window for the confirmation closes, the
    second not even started, as the agent runs one command at a time."""
    redis, cluster = redis_and_agents
    server_a, server_b = cluster.servers
    enrolled = register(cluster, "redis-down")
    config = tmp_path / "agent.toml"
    config.write_text("max_concurrent_commands = 1\n")
    agent = AgentProcess(
        server_a.base_url,
        enrolled["token"],
        tmp_path / "redis-down-state",
        tmp_path / "redis-down.log",
        config=config,
    ).start()
    host_id = enrolled["host_id"]
    try:
        await wait_status(cluster, host_id, "online")
        async with ws_connect(server_b.ws_url, token=cluster.token("admin")) as requester:
            await requester.ping()  # its process has joined the cluster (node started)
            await asyncio.to_thread(redis.kill)
            try:
                for name, command in (("first", "sleep 6; echo first"), ("second", "echo second")):
                    await requester.send(
                        {
                            "type": "command",
                            "channel": "command_execution",
                            "id": name,
                            "data": {"host_id": host_id, "command": command, "timeout": 8},
                        }
                    )
                replies = [
                    await requester.expect(lambda m, n=name: m.get("id") == n, 40, what=name)
                    for name in ("first", "second")
                ]
            finally:
                redis.start()
    finally:
        agent.stop()
    for name, reply in zip(("first", "second"), replies, strict=True):
        assert reply["type"] == "response", reply
        assert (reply["data"]["status"], reply["data"]["stdout"]) == ("completed", f"{name}\n")
        record = await api(
            "GET",
            server_b.base_url,
            f"/api/commands/{reply['data']['execution_id']}/",
            token=cluster.token("admin"),
        )
        assert (record.body["status"], record.body["stdout"]) == ("completed", f"{name}\n")
