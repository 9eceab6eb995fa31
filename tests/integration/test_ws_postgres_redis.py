"""
Two Daphne processes on one PostgreSQL database and one Redis channel layer (prefix of
their own): what happens through one server, or in a separate process, reaches clients
of both.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration import harness
from tests.integration.client import (
    WsClient,
    api,
    next_id,
    obtain_tokens,
    parse_iso_utc,
    ws_connect,
)
from tests.integration.harness import Deployment

pytestmark = [pytest.mark.integration, pytest.mark.postgres_redis]

#: Events crossing Redis and another process: allow for a loaded machine.
EVENT_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def cluster(pg_redis_cluster: Deployment) -> Iterator[Deployment]:
    return pg_redis_cluster


def server_a(d: Deployment) -> harness.DaphneServer:
    return d.servers[0]


def server_b(d: Deployment) -> harness.DaphneServer:
    return d.servers[1]


def connect(server: harness.DaphneServer, d: Deployment, user: str = "admin", **kwargs: Any):
    return ws_connect(server.ws_url, token=d.token(user), **kwargs)


async def shell(d: Deployment, code: str) -> str:
    """``manage.py shell -c CODE`` in a separate process with the servers' environment."""
    return await asyncio.to_thread(harness.manage_shell, d.env, code)


async def test_servers_share_database_redis_and_secret(cluster: Deployment):
    env = cluster.env
    assert env["DATABASE_URL"].startswith("postgres://")
    assert "/sysmanage_it_" in env["DATABASE_URL"]
    assert env["REDIS_URL"].startswith("redis://")
    assert env["SYSMANAGE_REDIS_PREFIX"].startswith("sysmanage-it-")
    assert server_a(cluster).port != server_b(cluster).port
    # a token issued by A is good on B
    token = cluster.token("viewer")
    hosts = await api("GET", server_b(cluster).base_url, "/api/hosts/", token=token)
    assert hosts.status == 200
    assert {h["hostname"] for h in hosts.body["results"]} == set(cluster.seed["hosts"])


def alert_event(alert_id: str, action: str = "raised"):
    return lambda m: (
        m["type"] == "event"
        and m["channel"] == "system_alerts"
        and m["data"]["alert_id"] == alert_id
        and m["data"]["action"] == action
    )


async def raise_alert_via(
    server: harness.DaphneServer,
    d: Deployment,
    severity: str,
    title: str,
    host: str | None = "web-01",
) -> dict[str, Any]:
    response = await api(
        "POST",
        server.base_url,
        "/api/alerts/",
        token=d.token("admin"),
        json_body={
            "severity": severity,
            "category": "disk_space",
            "title": title,
            "message": "Disk usage on /var is 85%",
            "host": d.host_id(host) if host else None,
        },
    )
    assert response.status == 201, response
    return response.body


async def test_alert_raised_through_a_reaches_clients_of_b_and_a(cluster: Deployment):
    async with (
        connect(server_b(cluster), cluster, "viewer") as on_b,
        connect(server_a(cluster), cluster, "viewer") as on_a,
        connect(server_b(cluster), cluster, "viewer") as critical_on_b,
    ):
        await on_b.subscribe("system_alerts")
        await on_a.subscribe("system_alerts")
        await critical_on_b.subscribe("system_alerts", {"severity": ["critical"]})
        warning = await raise_alert_via(server_a(cluster), cluster, "warning", "warning via A")
        critical = await raise_alert_via(server_a(cluster), cluster, "critical", "critical via A")
        for client in (on_b, on_a):
            first = await client.expect(alert_event(warning["id"]), EVENT_TIMEOUT)
            assert first["data"]["severity"] == "warning"
            assert first["data"]["hostname"] == "web-01"
            assert first["data"]["host_id"] == cluster.host_id("web-01")
            assert first["data"]["status"] == "open"
            await client.expect(alert_event(critical["id"]), EVENT_TIMEOUT)
        # the severity filter holds on B too: the warning, published first, never came
        before: list[dict[str, Any]] = []
        await critical_on_b.expect(alert_event(critical["id"]), EVENT_TIMEOUT, skipped=before)
        assert warning["id"] not in [m["data"].get("alert_id") for m in before]


async def test_alert_acknowledged_and_resolved_through_b_reach_clients_of_a(cluster: Deployment):
    async with connect(server_a(cluster), cluster, "viewer") as on_a:
        await on_a.subscribe("system_alerts")
        alert = await raise_alert_via(server_a(cluster), cluster, "warning", "to acknowledge")
        await on_a.expect(alert_event(alert["id"]), EVENT_TIMEOUT)
        for action in ("acknowledge", "resolve"):
            response = await api(
                "POST",
                server_b(cluster).base_url,
                f"/api/alerts/{alert['id']}/{action}/",
                token=cluster.token("admin"),
            )
            assert response.status == 200, response.status
            event = await on_a.expect(alert_event(alert["id"], f"{action}d"), EVENT_TIMEOUT)
            assert event["data"]["status"] == f"{action}d"


async def test_login_on_a_reaches_user_activity_on_b(cluster: Deployment):
    agent = f"it-cross-{uuid.uuid4().hex[:8]}"
    async with connect(server_b(cluster), cluster) as client:
        await client.subscribe("user_activity")
        await asyncio.to_thread(
            obtain_tokens, server_a(cluster).base_url, "viewer", cluster.password, agent
        )
        event = await client.expect(
            lambda m: m["type"] == "event" and m["data"].get("user_agent") == agent, EVENT_TIMEOUT
        )
    assert event["channel"] == "user_activity"
    assert event["data"]["action"] == "login"
    assert event["data"]["username"] == "viewer"
    assert event["data"]["user_id"] == cluster.user_id("viewer")


async def test_host_status_from_a_separate_process_reaches_both_servers(cluster: Deployment):
    host = cluster.host_id("pg-01")
    assert cluster.host_status("pg-01") == "offline"
    async with (
        connect(server_a(cluster), cluster, "viewer") as on_a,
        connect(server_b(cluster), cluster, "viewer") as on_b,
        connect(server_b(cluster), cluster, "viewer") as filtered_b,
        connect(server_a(cluster), cluster, "viewer") as fleet_a,
    ):
        for client in (on_a, on_b):
            _, status = await client.subscribe_with_status("host_status")
            rows = {row["hostname"]: row for row in status["data"]["hosts"]}
            assert rows["pg-01"]["status"] == "offline"
        _, status = await filtered_b.subscribe_with_status("host_status", {"host_id": host})
        assert [row["hostname"] for row in status["data"]["hosts"]] == ["pg-01"]
        _, fleet = await fleet_a.subscribe_with_status("fleet_status")
        online_before = fleet["data"]["online_hosts"]

        await shell(
            cluster,
            (
                "from hosts.services import host_set_status; "
                f"host_set_status(host_id='{host}', status='online')"
            ),
        )
        for client in (on_a, on_b, filtered_b):
            event = await client.next_event("host_status", EVENT_TIMEOUT)
            data = event["data"]
            assert data["host_id"] == host
            assert data["hostname"] == "pg-01"
            assert data["status"] == "online"
            assert data["previous_status"] == "offline"
            parse_iso_utc(data["timestamp"])
        # the separate process published the new fleet figures too
        event = await fleet_a.expect(
            lambda m: (
                m["type"] == "event"
                and m["channel"] == "fleet_status"
                and m["data"]["online_hosts"] == online_before + 1
            ),
            EVENT_TIMEOUT,
        )
        assert event["data"]["offline_hosts"] == event["data"]["total_hosts"] - online_before - 1

        await shell(
            cluster,
            (
                "from hosts.services import host_set_status; "
                f"host_set_status(host_id='{host}', status='offline')"
            ),
        )
        for client in (on_a, on_b, filtered_b):
            event = await client.next_event("host_status", EVENT_TIMEOUT)
            assert event["data"]["status"] == "offline"
            assert event["data"]["previous_status"] == "online"

    # the database agrees, through either server
    listed = await api(
        "GET", server_b(cluster).base_url, "/api/hosts/?search=pg-01", token=cluster.token("viewer")
    )
    assert [h["status"] for h in listed.body["results"]] == ["offline"]


async def test_host_going_offline_raises_the_host_offline_alert(cluster: Deployment):
    """The default "Host offline" rule, applied by the process that changed the status."""
    host = cluster.host_id("fleet-02")
    async with (
        connect(server_a(cluster), cluster, "viewer") as on_a,
        connect(server_b(cluster), cluster, "viewer") as on_b,
    ):
        for client in (on_a, on_b):
            await client.subscribe("system_alerts", {"host_id": host})
        for status in ("online", "offline"):
            await shell(
                cluster,
                (
                    "from hosts.services import host_set_status; "
                    f"host_set_status(host_id='{host}', status='{status}')"
                ),
            )
        for client in (on_a, on_b):
            event = await client.next_event("system_alerts", EVENT_TIMEOUT)
            assert event["data"]["action"] == "raised"
            assert event["data"]["category"] == "availability"
            assert event["data"]["hostname"] == "fleet-02"


async def test_deactivating_a_user_closes_its_sockets_on_every_server(cluster: Deployment):
    doomed_token = cluster.token("doomed")
    async with (
        connect(server_b(cluster), cluster, "doomed") as doomed_b,
        connect(server_a(cluster), cluster, "doomed") as doomed_a,
        connect(server_b(cluster), cluster, "viewer") as bystander,
    ):
        for client in (doomed_b, doomed_a, bystander):
            await client.subscribe("system_alerts")
        await shell(
            cluster,
            (
                "from django.contrib.auth import get_user_model; "
                "user = get_user_model().objects.get(username='doomed'); "
                "user.is_active = False; user.save()"
            ),
        )
        for client in (doomed_b, doomed_a):
            closed = await client.expect_closed(timeout=EVENT_TIMEOUT)
            assert closed.code == 4001, closed
            assert [m["data"] for m in closed.messages if m["type"] == "error"] == [
                {
                    "code": "AUTH_FAILED",
                    "message": "User account is disabled",
                    "action": "reconnect_with_valid_token",
                }
            ]
            assert closed.messages[-1]["type"] == "error"
            assert closed.messages[-1]["channel"] == "system"
        # other users' sockets stay open
        await bystander.ping()

    # the token still verifies, but the account is disabled: no new socket, no REST
    async with ws_connect(server_a(cluster).ws_url, token=doomed_token) as client:
        closed = await client.expect_closed()
    assert closed.code == 4001
    assert [m["data"]["message"] for m in closed.messages] == ["User account is disabled"]
    refused = await api("GET", server_b(cluster).base_url, "/api/hosts/", token=doomed_token)
    assert refused.status == 401


async def test_command_to_offline_host_on_postgres(cluster: Deployment):
    host = cluster.host_id("web-01")
    request_id = next_id("pg-cmd")
    async with (
        connect(server_a(cluster), cluster) as requester,
        connect(server_b(cluster), cluster, "viewer") as watcher,
    ):
        await watcher.subscribe("command_execution", {"host_id": host})
        reply = await requester.request(
            {
                "type": "command",
                "channel": "command_execution",
                "id": request_id,
                "data": {"host_id": host, "command": "systemctl status nginx", "timeout": 30},
            }
        )
        assert reply["type"] == "error"
        assert reply["channel"] == "command_execution"
        assert reply["id"] == request_id
        assert reply["data"]["code"] == "COMMAND_FAILED"
        assert reply["data"]["message"].startswith("Host not reachable")
        assert reply["data"]["host_id"] == host
        execution_id = reply["data"]["execution_id"]
        uuid.UUID(execution_id)
        # the watcher on the other server sees the execution created and failed
        seen = [await watcher.next_event("command_execution", EVENT_TIMEOUT) for _ in range(2)]
    assert [e["data"]["status"] for e in seen] == ["pending", "failed"]
    assert {e["data"]["execution_id"] for e in seen} == {execution_id}
    record = await api(
        "GET",
        server_b(cluster).base_url,
        f"/api/commands/{execution_id}/",
        token=cluster.token("admin"),
    )
    assert record.status == 200
    assert record.body["status"] == "failed"


async def test_package_operation_on_offline_host_on_postgres(cluster: Deployment):
    host = cluster.host_id("web-01")
    async with (
        connect(server_b(cluster), cluster) as requester,
        connect(server_a(cluster), cluster, "viewer") as watcher,
    ):
        await watcher.subscribe("package_operations", {"host_id": host})
        reply = await requester.request(
            {
                "type": "command",
                "channel": "package_operations",
                "id": "pg-pkg",
                "data": {"host_id": host, "operation": "install", "package": "nginx"},
            },
            EVENT_TIMEOUT,
        )
        assert reply["type"] == "error", reply
        assert reply["data"]["code"] == "COMMAND_FAILED"
        assert reply["data"]["message"].startswith("Host not reachable")
        operation_id = reply["data"]["execution_id"]
        seen = [await watcher.next_event("package_operations", EVENT_TIMEOUT) for _ in range(2)]
    assert [e["data"]["status"] for e in seen] == ["pending", "failed"]
    assert {e["data"]["execution_id"] for e in seen} == {operation_id}


async def command_reply(client: WsClient, frame: str, request_id: Any) -> dict[str, Any]:
    await client.send(frame)
    return await client.expect(
        lambda m: m.get("id") == request_id or (m["type"] == "error" and "id" not in m),
        EVENT_TIMEOUT,
    )


async def test_huge_integer_id_is_refused_not_stored(cluster: Deployment):
    """An integer id too big for request_id (and for JavaScript) is refused at once."""
    huge = int("9" * 250)
    frame = (
        '{"type": "command", "channel": "command_execution", "id": '
        + str(huge)
        + ', "data": '
        + json.dumps({"host_id": cluster.host_id("web-01"), "command": "uptime"})
        + "}"
    )
    async with connect(server_a(cluster), cluster) as client:
        reply = await command_reply(client, frame, huge)
    assert reply["type"] == "error"
    assert reply["data"]["code"] == "INVALID_MESSAGE", reply
    assert "id" not in reply


async def test_nul_in_command_is_refused_as_invalid(cluster: Deployment):
    async with connect(server_a(cluster), cluster) as client:
        reply = await client.request(
            {
                "type": "command",
                "channel": "command_execution",
                "id": "nul",
                "data": {"host_id": cluster.host_id("web-01"), "command": "ls\u0000-la"},
            },
            EVENT_TIMEOUT,
        )
    assert reply["data"]["code"] == "INVALID_COMMAND", reply


async def test_a_sysmanage_agent_on_one_server_runs_commands_sent_through_the_other(
    cluster: Deployment,
):
    """Registration, approval, the agent's socket and its command queue on PostgreSQL,
    with the command crossing Redis: the agent is on server A, the requester on B."""
    from tests.compat.fake_sysmanage_agent import FakeSysManageAgent

    a, b = server_a(cluster), server_b(cluster)
    agent = FakeSysManageAgent(
        a.base_url, f"sm-pg-{uuid.uuid4().hex[:6]}", ack_order="result_first"
    )
    status, body = await asyncio.to_thread(agent.register)
    assert status == 201, body
    assert body["approved"] is False, body
    approved = await api(
        "POST",
        b.base_url,
        f"/api/registrations/{agent.host_id}/approve/",
        token=cluster.token("admin"),
    )
    assert approved.status == 200, approved
    assert approved.body["status"] == "approved", approved
    async with connect(b, cluster) as client:
        await client.subscribe("host_status", {"host_id": agent.host_id})
        await agent.connect()
        info = await agent.send_system_info()  # held: names the host without its token
        await agent.send_acked("heartbeat", agent.heartbeat_data())  # proves it
        await agent.wait_ack(info["message_id"])
        online = await client.next_event("host_status", timeout=EVENT_TIMEOUT)
        assert online["data"]["status"] == "online"
        reply = await client.request(
            {
                "type": "command",
                "channel": "command_execution",
                "data": {"host_id": agent.host_id, "command": "echo across; exit 4", "timeout": 20},
            },
            timeout=EVENT_TIMEOUT,
        )
        assert reply["type"] == "response", reply
        assert (reply["data"]["status"], reply["data"]["exit_code"], reply["data"]["stdout"]) == (
            "failed",
            4,
            "across\n",
        ), reply
        assert reply["data"]["execution_time"] >= 0
        host = await api(
            "GET", b.base_url, f"/api/hosts/{agent.host_id}/", token=cluster.token("admin")
        )
        assert host.body["agent_kind"] == "sysmanage"
        assert host.body["os_name"]
        await agent.close()
        offline = await client.next_event("host_status", timeout=EVENT_TIMEOUT)
        assert offline["data"]["status"] == "offline"
