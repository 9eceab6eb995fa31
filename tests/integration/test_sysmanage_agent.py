"""
The unchanged SysManage agent against a real server: a protocol-faithful fake agent
(``tests/compat/fake_sysmanage_agent.py``, written from the observed wire protocol)
registers, is approved, connects or polls, reports, and runs commands that people send
through the seed WebSocket API (``/ws``).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import websockets

from tests.compat.fake_sysmanage_agent import FakeSysManageAgent
from tests.integration import harness
from tests.integration.client import browser_login, http_request
from tests.integration.relay import Relay
from tests.integration.smagent import (
    WAIT,
    admin,
    approve,
    close_and_settle,
    commands_of,
    create_key,
    enrolled,
    error_of,
    go_online,
    host,
    hostname,
    inner_id,
    online_agent,
    pending_registration,
    register,
    results,
    run_command,
    seed_client,
    shell_execution,
    wait_host_status,
)

pytestmark = pytest.mark.integration

SETTINGS = {
    "SYSMANAGE_AGENT_ACK_SECONDS": "2",
    "SYSMANAGE_AGENT_MAX_ATTEMPTS": "5",
    "SYSMANAGE_AGENT_DELIVERY_SECONDS": "3",
    "SYSMANAGE_AGENT_MAX_MESSAGE_BYTES": "700000",
    "SYSMANAGE_AGENT_REGISTRATIONS_PER_HOUR": "1000",
    "SYSMANAGE_AGENT_POLL_INTERVAL": "2",
    "MAINTENANCE_SWEEP_SECONDS": "1",
}
ACK_SECONDS = int(SETTINGS["SYSMANAGE_AGENT_ACK_SECONDS"])


@pytest.fixture(scope="module")
def deployment(launch_sqlite: Any) -> Iterator[harness.Deployment]:
    """One server with short resend and delivery timings and a 700 KB frame limit."""
    with launch_sqlite("sysmanage-agent", **SETTINGS) as deployment:
        yield deployment


# -- helpers ---------------------------------------------------------------------------


# -- enrollment --------------------------------------------------------------------------


def test_root_answers_200_without_redirect(deployment):
    connection = http.client.HTTPConnection("127.0.0.1", deployment.server.port, timeout=5)
    try:
        connection.request("GET", "/", headers={"User-Agent": "sysmanage-agent"})
        response = connection.getresponse()
        response.read()
        assert response.status == 200, (response.status, response.getheaders())
    finally:
        connection.close()
    assert FakeSysManageAgent(deployment.server.base_url, "anyone").health() == 200


async def test_register_pending_approve_connect_online(deployment):
    d = deployment
    agent = FakeSysManageAgent(d.server.base_url, hostname("pending"))
    async with contextlib.AsyncExitStack() as stack:
        ws = await seed_client(stack, d)
        await ws.subscribe_with_status("host_status")
        _, fleet = await ws.subscribe_with_status("fleet_status")

        status, body = await register(agent)
        assert status == 201, body
        assert body["approved"] is False
        assert str(uuid.UUID(body["id"])) == body["id"]
        assert isinstance(body["host_token"], str)
        assert len(body["host_token"]) >= 16
        identity = (agent.host_id, agent.host_token)
        assert identity == (body["id"], body["host_token"])
        # waiting for approval: not a host yet, no connection token, no second record
        assert (await host(d, agent.host_id)).status == 404
        refused = await asyncio.to_thread(agent.auth_raw)
        assert refused[0] == 403, refused
        assert refused[1]["detail"], refused
        again = await register(agent)
        assert again[0] == 409, again
        assert again[1]["detail"], again
        assert (agent.host_id, agent.host_token) == identity  # kept what it had
        # people: only staff see and decide
        viewer = await admin(d, "GET", "/api/registrations/?status=pending", user="viewer")
        assert viewer.status == 403, viewer
        record = await pending_registration(d, agent.hostname)
        denied = await admin(
            d, "POST", f"/api/registrations/{record['id']}/approve/", user="viewer"
        )
        assert denied.status == 403, denied
        await approve(d, agent)
        created = await host(d, agent.host_id)
        assert created.status == 200
        assert created.body["hostname"] == agent.hostname
        assert created.body["status"] != "online"
        listing = await admin(d, "GET", "/api/registrations/?status=pending")
        assert agent.hostname not in [r["hostname"] for r in results(listing.body)]

        status, grant = await asyncio.to_thread(agent.auth_raw)
        assert status == 200, grant
        assert isinstance(grant["connection_token"], str)
        assert grant["connection_token"]
        assert isinstance(grant["expires_in"], int)
        assert grant["expires_in"] > 0
        assert isinstance(grant["websocket_endpoint"], str)
        assert grant["websocket_endpoint"]

        await agent.connect(grant["connection_token"])
        await asyncio.sleep(0.3)
        assert (await host(d, agent.host_id)).body["status"] != "online"  # not proven yet
        message = await agent.send_system_info()  # host_id alone, as the agent sends it
        # held, and proof asked for: the agent answers the ping with a pong that carries
        # host_id and host_token, which proves the connection
        ping = await agent.wait_type("ping")
        ack = await agent.wait_ack(message["message_id"])
        assert ack["_at"] > ping["_at"]
        [pong] = [m for m in agent.sent if m["message_type"] == "pong"]
        assert pong["data"]["host_token"] == agent.host_token
        beat = await agent.send_acked("heartbeat", agent.heartbeat_data())  # with host_token
        assert beat["data"] == {
            "status": "received",
            "acked_message_id": beat["data"]["acked_message_id"],
        }
        assert ack["data"] == {"status": "received", "acked_message_id": message["message_id"]}
        assert isinstance(ack["message_id"], str)
        assert ack["message_id"]
        online = await ws.expect(
            lambda m: (
                m["type"] == "event"
                and m["channel"] == "host_status"
                and m["data"]["host_id"] == agent.host_id
            ),
            WAIT,
            what="host_status event of the agent",
        )
        assert online["data"]["status"] == "online"
        assert online["data"]["hostname"] == agent.hostname
        figures = await ws.expect(
            lambda m: (
                m["type"] == "event"
                and m["channel"] == "fleet_status"
                and m["data"]["online_hosts"] == fleet["data"]["online_hosts"] + 1
            ),
            WAIT,
            what="fleet_status with one more host online",
        )
        assert figures["data"]["total_hosts"] == fleet["data"]["total_hosts"] + 1
        facts = (await host(d, agent.host_id)).body
        assert facts["status"] == "online"
        assert facts["fqdn"] == agent.fqdn
        # the metric scripts behind live metrics come at once, as a command
        command = await agent.wait_type(
            "command", WAIT, where=lambda m: m["data"].get("command_type") == "sync_custom_metrics"
        )
        assert command["queue_message_id"]
        assert command["message_id"]
        metrics = command["data"]["parameters"]["metrics"]
        assert {m["interpreter"] for m in metrics} <= {"python3", "sh", "bash"}
        for metric in metrics:
            assert set(metric) >= {"id", "name", "script", "interpreter", "cadence_seconds"}
        text = " ".join(m["name"].lower() for m in metrics)
        assert all(word in text for word in ("cpu", "memory", "load", "disk")), text
        await close_and_settle(d, agent)


async def test_registration_keys(deployment):
    d = deployment
    once = await create_key(d, "one host", max_uses=1)
    first = FakeSysManageAgent(d.server.base_url, hostname("key"), registration_key=once["key"])
    status, body = await register(first)
    assert status == 201, body
    assert body["approved"] is True, body
    exists = await host(d, body["id"])
    assert exists.status == 200
    assert exists.body["hostname"] == first.hostname
    assert (await asyncio.to_thread(first.auth_raw))[0] == 200

    used_up = FakeSysManageAgent(d.server.base_url, hostname("key"), registration_key=once["key"])
    status, body = await register(used_up)
    assert status == 403, body
    assert body["detail"], body
    assert used_up.host_id is None

    revoked = await create_key(d, "revoked")
    reply = await admin(d, "POST", f"/api/registration-keys/{revoked['id']}/revoke/")
    assert 200 <= reply.status < 300, reply
    status, body = await register(
        FakeSysManageAgent(d.server.base_url, hostname("key"), registration_key=revoked["key"])
    )
    assert status == 403, body
    assert body["detail"], body

    status, body = await register(
        FakeSysManageAgent(d.server.base_url, hostname("key"), registration_key="smrk_" + "A" * 32)
    )
    assert status == 403, body
    assert body["detail"], body

    expiring = await create_key(d, "short-lived", expires_in_seconds=3600)
    # a minute is the shortest lifetime the API gives; let this one run out at once
    await asyncio.to_thread(
        harness.manage_shell,
        d.env,
        (
            "from datetime import timedelta; from django.utils import timezone; "
            "from hosts.models import RegistrationKey; "
            f"RegistrationKey.objects.filter(id='{expiring['id']}')"
            ".update(expires_at=timezone.now() - timedelta(seconds=1))"
        ),
    )
    status, body = await register(
        FakeSysManageAgent(d.server.base_url, hostname("key"), registration_key=expiring["key"])
    )
    assert status == 403, body
    assert body["detail"], body

    # the same hostname again: 409 with or without a key (the agent registers on every
    # start; a key in its configuration must neither re-enrol it nor be used up) ...
    plain = FakeSysManageAgent(d.server.base_url, first.hostname)
    status, body = await register(plain)
    assert status == 409, body
    assert body["detail"], body
    old_token = first.host_token
    fresh = await create_key(d, "re-enrol", max_uses=1)
    first.registration_key = fresh["key"]
    for _ in range(2):
        status, body = await register(first)
        assert status == 409, body
    assert first.host_token == old_token
    # ... until staff let the host register again (an agent that lost its identity)
    allowed = await admin(d, "POST", f"/api/hosts/{first.host_id}/allow-reregistration/")
    assert allowed.status == 200, allowed
    status, body = await register(first)
    # the first registration in the window waits for staff (it may be anybody's)
    assert status == 201, body
    assert body["approved"] is False
    assert body["id"] == exists.body["id"]
    assert body["host_token"]
    assert body["host_token"] != old_token
    assert (await register(first))[0] == 409  # the window closed with it
    first.host_token = body["host_token"]
    await first.connect()  # not yet approved: told so, and closed
    await first.send("heartbeat", first.heartbeat_data())
    error_of(await first.wait_type("error"), "host_not_approved")
    assert await first.wait_closed() == 4001
    pending = await admin(d, "GET", "/api/registrations/?status=pending")
    [record] = [r for r in results(pending.body) if r["for_host"] == first.host_id]
    assert record["remote_address"] == "127.0.0.1"
    approved = await admin(d, "POST", f"/api/registrations/{record['id']}/approve/")
    assert approved.status == 200, approved
    # the new host token proves the identity, the old one no longer does
    await first.connect()
    first.host_token = old_token
    refused = await first.send("heartbeat", first.heartbeat_data())
    error = await first.wait_type(
        "error", where=lambda m: m.get("error_type") == "host_not_registered"
    )
    assert refused["message_id"]
    error_of(error, "host_not_registered")
    first.host_token = body["host_token"]
    await first.send_acked("heartbeat", first.heartbeat_data())
    await wait_host_status(d, first.host_id, "online")
    await close_and_settle(d, first)

    # keys are for staff only
    denied = await admin(
        d, "POST", "/api/registration-keys/", user="viewer", json_body={"name": "nope"}
    )
    assert denied.status == 403, denied


async def test_key_approves_a_waiting_registration(deployment):
    d = deployment
    agent = FakeSysManageAgent(d.server.base_url, hostname("waiting"))
    status, body = await register(agent)
    assert status == 201
    assert body["approved"] is False
    waiting_id = body["id"]
    agent.registration_key = (await create_key(d, "late key"))["key"]
    status, body = await register(agent)
    # a valid key approves the waiting registration: the host is created now (201), with
    # the id the agent already holds and a new host token
    assert status == 201, (status, body)
    assert body["approved"] is True
    assert body["id"] == waiting_id
    assert (await host(d, waiting_id)).status == 200


async def test_registration_bodies_refused(deployment):
    agent = FakeSysManageAgent(deployment.server.base_url, hostname("bad"))
    cases: list[tuple[str, Any]] = [
        ("malformed JSON", b'{"hostname": "x",'),
        ("a JSON list", b'["hostname"]'),
        ("a JSON string", b'"hostname"'),
    ]
    for what, raw in cases:
        status, body = await asyncio.to_thread(
            agent._http, "POST", "/api/host/register", None, None, raw=raw
        )
        assert status == 400, (what, body)
        assert isinstance(body, dict), (what, body)
        assert body.get("detail"), (what, body)
    base = agent.registration_body()
    del base["hostname"]
    for what, value in (
        ("missing", None),
        ("empty", ""),
        ("a number", 42),
        ("too long", "h" * 300),
        ("with spaces", "bad host name"),
    ):
        body_sent = dict(base) if value is None else {**base, "hostname": value}
        status, body = await asyncio.to_thread(agent._http, "POST", "/api/host/register", body_sent)
        assert status == 400, (what, status, body)
        assert body.get("detail"), (what, status, body)


async def test_auth_refusals(deployment):
    d = deployment
    nobody = FakeSysManageAgent(d.server.base_url, hostname("unknown"))
    status, body = await asyncio.to_thread(nobody.auth_raw)
    assert status == 404, (status, body)
    status, body = await asyncio.to_thread(nobody.auth_raw, "")
    assert status == 400, (status, body)
    with pytest.raises(AssertionError, match="HTTP 404"):
        await asyncio.to_thread(nobody.auth)

    rejected = FakeSysManageAgent(d.server.base_url, hostname("rejected"))
    assert (await register(rejected))[0] == 201
    record = await pending_registration(d, rejected.hostname)
    reply = await admin(d, "POST", f"/api/registrations/{record['id']}/reject/")
    assert 200 <= reply.status < 300, reply
    status, body = await asyncio.to_thread(rejected.auth_raw)
    assert status == 403, body
    assert body["detail"], body
    status, body = await register(rejected)
    assert status == 403, body
    assert body["detail"], body
    assert (await host(d, rejected.host_id)).status == 404

    revoked = await enrolled(d, "revoked")
    assert (await asyncio.to_thread(revoked.auth_raw))[0] == 200
    await asyncio.to_thread(
        harness.run_python,
        ["manage.py", "revoke_host", revoked.hostname],
        d.env,
        what="revoke_host",
    )
    status, body = await asyncio.to_thread(revoked.auth_raw)
    assert status == 403, body
    assert body["detail"], body


# -- the socket --------------------------------------------------------------------------


async def test_bad_connection_tokens_are_accepted_then_closed_4001(deployment):
    d = deployment
    agent = await enrolled(d, "tokens")
    good = await asyncio.to_thread(agent.auth)
    middle = len(good) // 2
    tampered = good[:middle] + ("A" if good[middle] != "A" else "B") + good[middle + 1 :]
    for what, token in (
        ("garbage", "garbage-token"),
        ("missing", None),
        ("tampered", tampered),
        ("empty", ""),
    ):
        agent.received.clear()
        await agent.connect(token, fetch_token=False)  # the handshake itself succeeds
        error_of(await agent.wait_type("error"), "invalid_token")
        assert await agent.wait_closed() == 4001, what
    # and the good one still works
    await agent.connect(good)
    await agent.send_acked("heartbeat", agent.heartbeat_data())
    await close_and_settle(d, agent)


async def test_expired_connection_token(launch_sqlite):
    with launch_sqlite("sysmanage-agent-ttl", SYSMANAGE_AGENT_TOKEN_SECONDS="1") as d:
        agent = await enrolled(d, "expired")
        token = await asyncio.to_thread(agent.auth)
        await asyncio.sleep(2.5)
        await agent.connect(token)
        error = await agent.wait_type("error")
        error_of(error, "invalid_token")
        assert await agent.wait_closed() == 4001
        # a fresh token connects
        await agent.connect()
        await agent.send_acked("heartbeat", agent.heartbeat_data())
        await close_and_settle(d, agent)


SAMPLES = [
    {"metric_id": "sysmanage-server.cpu_usage", "value": 12.5, "status": "ok"},
    {"metric_id": "sysmanage-server.memory_usage", "value": 40.0, "status": "ok"},
]


@pytest.mark.parametrize("transport", ["socket", "poll"])
async def test_metrics_are_the_first_message_a_fresh_server_handles(launch_sqlite, transport):
    # Handling publishes through the process's hub, which must exist by then even when
    # an agent's metric samples are the first thing the process ever handles.  (The
    # server fails the test with its own traceback otherwise.)
    with launch_sqlite(f"sysmanage-agent-fresh-{transport}") as d:
        agent = FakeSysManageAgent(d.server.base_url, hostname("fresh"))
        await register(agent)
        await asyncio.to_thread(
            harness.manage_shell,
            d.env,
            (
                "from hosts.smagent import enrollment; "
                f"enrollment.registration_approve(registration_id='{agent.host_id}')"
            ),
        )
        if transport == "socket":
            await agent.connect()
            await agent.send_acked("custom_metric_samples", {"samples": SAMPLES})
        else:
            await agent.poll([agent.poll_message("custom_metric_samples", {"samples": SAMPLES})])
        history = await admin(d, "GET", f"/api/hosts/{agent.host_id}/metrics/")
        assert history.status == 200, history
        assert "12.5" in json.dumps(history.body), history.body
        await agent.close()
        # (a server started inside a test is not watched by the traceback check)
        assert "Traceback" not in d.server.log(), d.server.log()[-5000:]


async def test_origin_header_is_refused_at_the_handshake(deployment):
    agent = await enrolled(deployment, "origin")
    for origin in ("https://evil.example.com", deployment.server.base_url):
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await agent.connect(origin=origin)
        assert refused.value.response.status_code == 403, origin
    await agent.connect()  # without Origin, as the agent connects
    await agent.send_acked("heartbeat", agent.heartbeat_data())
    await close_and_settle(deployment, agent)


async def test_wrong_identity_gets_host_not_registered(deployment):
    d = deployment
    agent = await enrolled(d, "identity")
    real_token = agent.host_token
    await agent.connect()
    agent.host_token = "not-the-host-token-at-all"
    await agent.send_heartbeat()
    error_of(await agent.wait_type("error"), "host_not_registered")
    agent.host_token = real_token
    start = len(agent.received)
    await agent.send("system_info", {**agent.system_info_data(), "host_id": str(uuid.uuid4())})
    error_of(await agent.wait_type("error", start=start), "host_not_registered")
    assert agent.host_not_registered_errors == 2
    await asyncio.sleep(0.3)
    assert (await host(d, agent.host_id)).body["status"] != "online"
    # an agent that keeps failing to prove itself is dropped
    agent.host_token = "still-wrong"
    for _ in range(10):
        if agent.is_closed:
            break
        with contextlib.suppress(Exception):
            await agent.send_heartbeat()
        await asyncio.sleep(0.2)
    assert await agent.wait_closed(WAIT) == 4001
    assert (await host(d, agent.host_id)).body["status"] != "online"
    await agent.close()


async def test_malformed_frames_get_invalid_message_and_the_socket_stays(deployment):
    async with online_agent(deployment, "malformed") as agent:
        good = agent.envelope("heartbeat", agent.heartbeat_data())
        stale = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
        frames: list[tuple[str, str | bytes]] = [
            ("not JSON", "this is not json {"),
            ("a JSON list", json.dumps([good])),
            ("a JSON number", "42"),
            ("no message_type", json.dumps({k: v for k, v in good.items() if k != "message_type"})),
            ("short message_id", json.dumps({**good, "message_id": "abc-123"})),
            (
                "bad characters in message_id",
                json.dumps({**good, "message_id": "abcdefghij/klmnopqrst;uvw"}),
            ),
            (
                "timestamp two hours off",
                json.dumps({**good, "message_id": str(uuid.uuid4()), "timestamp": stale}),
            ),
            ("binary frame", json.dumps(good).encode()),
        ]
        for what, frame in frames:
            start = len(agent.received)
            await agent.send_raw(frame)
            error = await agent.wait_type("error", start=start)
            error_of(error, "invalid_message")
            assert isinstance(error.get("data"), dict), (what, error)
            assert agent.close_code is None, what
        # nothing of those was acknowledged, and the socket still works
        assert not [
            m
            for m in agent.received
            if m.get("message_type") == "ack"
            and m["data"].get("acked_message_id") in ("abc-123", good["message_id"])
        ]
        await agent.send_acked("heartbeat", agent.heartbeat_data())
        # the edges that are fine: a 20-character id, a timestamp 20 minutes off
        edge = {
            **agent.envelope("heartbeat", agent.heartbeat_data()),
            "message_id": "a" * 10 + "-" + "9" * 9,
            "timestamp": (datetime.now(UTC) - timedelta(minutes=20)).isoformat(),
        }
        await agent.send_message(edge)
        await agent.wait_ack(edge["message_id"])


async def test_oversize_frame_is_refused_and_the_socket_stays_open(deployment):
    async with online_agent(deployment, "oversize") as agent:
        data = {**agent.heartbeat_data(), "padding": "x" * 750_000}
        sent = await agent.send("heartbeat", data)
        refused = error_of(await agent.wait_type("error", WAIT), "message_too_large")
        assert refused["data"] == {"message_type": "heartbeat", "message_id": sent["message_id"]}
        assert "The message was larger than the server accepts" in refused["message"]
        # not processed, not acknowledged; the connection goes on
        await agent.send_acked("heartbeat", agent.heartbeat_data())
        assert not agent.is_closed
        assert not [
            m
            for m in agent.received
            if m.get("message_type") == "ack"
            and m["data"].get("acked_message_id") == sent["message_id"]
        ]


async def test_heartbeat_inventory_and_unknown_types_are_acknowledged(deployment):
    d = deployment
    async with online_agent(d, "inventory") as agent:
        ack = await agent.send_acked("heartbeat", agent.heartbeat_data())
        assert ack["data"]["status"] == "received"
        for message_type, data in (
            ("os_version_update", agent.os_version_data()),
            ("hardware_update", agent.hardware_data()),
            ("package_updates_update", agent.package_updates_data()),
            ("software_inventory_update", agent.software_inventory_data(50)),
        ):
            ack = await agent.send_acked(message_type, data)
            assert ack["data"]["status"] == "received", message_type
        # a ~600 KB installed-software report, as big agents send
        big = agent.software_inventory_data(3000)
        per_package = len(json.dumps(big)) // 3000
        big = agent.software_inventory_data(3000, pad=max(0, 200 - per_package))
        size = len(json.dumps(agent.envelope("software_inventory_update", big)))
        assert 550_000 < size < 690_000, size
        await agent.send_acked("software_inventory_update", big, timeout=WAIT)
        for message_type in (
            "user_access_update",
            "reboot_status_update",
            "available_packages_batch_start",
            "a_type_nobody_has_seen",
        ):
            await agent.send_acked(message_type, {"anything": [1, 2, 3]})
        errors = [m for m in agent.received if m.get("message_type") == "error"]
        assert errors == []
        # the hardware report's figures are the host's facts
        facts = (await host(d, agent.host_id)).body
        assert facts["cpu_count"] == 4
        assert facts["memory_total"] == 8192 * 1024 * 1024
        assert agent.close_code is None


async def test_users_and_services_are_stored_and_shown(deployment):
    """``user_access_update`` (periodic: no ``host_token``) and ``role_data`` become the
    host's ``users`` and ``services`` inventory: over REST and on its page."""
    d = deployment
    async with online_agent(d, "usersvc") as agent:
        for sent in (await agent.send_user_access(), await agent.send_roles()):
            ack = await agent.wait_ack(sent["message_id"])
            assert ack["data"]["status"] == "received"
        assert "host_token" not in agent.user_access_data()
        reply = await admin(d, "GET", f"/api/hosts/{agent.host_id}/inventory/")
        assert reply.status == 200, reply
        kinds = reply.body["inventory"]
        assert kinds["users"]["item_count"] == 4
        users = kinds["users"]["data"]
        # regular accounts first, only the fields the agent's report is known to hold
        assert [u["username"] for u in users["users"]] == ["alice", "nobody", "root", "www-data"]
        assert users["users"][0] == {
            "username": "alice",
            "uid": 1000,
            "home_directory": "/home/alice",
            "shell": "/bin/bash",
            "is_system_user": False,
            "groups": ["alice", "sudo"],
        }
        assert users["total_users"] == 4
        assert len(users["groups"]) == 3
        assert kinds["services"]["item_count"] == 2
        services = kinds["services"]["data"]
        assert [(r["package_name"], r["service_status"]) for r in services["roles"]] == [
            ("postgresql", "running"),
            ("nginx", "stopped"),
        ]
        assert "collection_timestamp" not in services
        assert "host_token" not in json.dumps(kinds)
        # sent again unchanged (a new collection time): still one report of each kind
        await agent.send_acked("role_data", agent.role_data())
        again = await admin(d, "GET", f"/api/hosts/{agent.host_id}/inventory/")
        assert again.body["inventory"]["services"] == kinds["services"]
        page = await asyncio.to_thread(host_page, d, agent.host_id)
        assert 'id="inventory-users-heading"' in page
        assert "2 regular users and 2 system accounts; 3 groups (2 system)." in page
        assert "/home/alice" in page
        assert "alice, sudo" in page
        assert 'id="inventory-system-users"' in page
        assert 'id="inventory-services-heading"' in page
        assert "15+248+deb12u2" in page
        assert 'class="badge service-good status-succeeded">Running<' in page
        assert 'class="badge service-warn severity-warning">Stopped<' in page


def host_page(d: harness.Deployment, host_id: str) -> str:
    """A host's page as the administrator sees it in a browser."""
    session = browser_login(d.server.base_url, "admin", d.password)
    page = http_request(
        "GET",
        f"{d.server.base_url}/hosts/{host_id}/",
        opener=session.opener,
        headers={"Accept": "text/html"},
    )
    assert page.status == 200, page
    return str(page.body)


async def test_flat_script_execution_result_is_acknowledged(deployment):
    """``script_execution_result`` is flat and names the host by ``host_id`` alone (no
    ``host_token``): once the connection is proven it is accepted like any other
    message.  (Three ``host_not_registered`` errors make the agent wipe its identity.)"""
    async with online_agent(deployment, "flat") as agent:
        start = len(agent.received)
        message = await agent.send_script_execution_result(str(uuid.uuid4()), stdout="hi\n")
        await agent.wait_ack(message["message_id"])
        assert [m for m in agent.received[start:] if m.get("message_type") == "error"] == []
        await agent.send_acked("heartbeat", agent.heartbeat_data())


# -- commands ----------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["ack_first", "result_first", "no_ack"])
async def test_shell_command_round_trip(deployment, order):
    d = deployment
    async with (
        contextlib.AsyncExitStack() as stack,
        online_agent(d, f"shell-{order.replace('_', '-')}", ack_order=order) as agent,
    ):
        ws = await seed_client(stack, d)
        reply = await run_command(ws, agent.host_id, "echo hi; echo there >&2")
        assert reply["type"] == "response", reply
        assert reply["channel"] == "command_execution", reply
        data = reply["data"]
        assert (data["status"], data["exit_code"], data["stdout"], data["stderr"]) == (
            "completed",
            0,
            "hi\n",
            "there\n",
        ), data
        assert isinstance(data["execution_time"], int | float)
        assert data["execution_time"] >= 0
        assert data["host_id"] == agent.host_id
        execution = shell_execution(agent, "echo hi; echo there >&2")
        assert execution.parameters["timeout"] == 30
        (command,) = commands_of(agent, execution.queue_message_id)
        assert command["message_id"]
        assert command["queue_message_id"]
        assert command["data"]["timeout"] >= 1
        # the agent's answers went in the order asked
        kinds = [
            m["message_type"]
            for m in agent.sent
            if m.get("message_id") == execution.queue_message_id
            or (m.get("data") or {}).get("command_id") == execution.command_id
        ]
        expected = {
            "ack_first": ["command_acknowledgment", "command_result"],
            "result_first": ["command_result", "command_acknowledgment"],
            "no_ack": ["command_result"],
        }[order]
        assert kinds == expected, kinds

        failing = await run_command(ws, agent.host_id, "echo oops >&2; exit 3")
        assert failing["type"] == "response", failing
        assert (
            failing["data"]["status"],
            failing["data"]["exit_code"],
            failing["data"]["stderr"],
        ) == ("failed", 3, "oops\n"), failing
        if order == "no_ack":
            # a result stands for the acknowledgment: nothing is sent again
            await asyncio.sleep(2.5)
            assert len(commands_of(agent, execution.queue_message_id)) == 1


async def test_unacknowledged_command_is_resent_with_the_same_id(deployment):
    """The agent misses two deliveries: the command comes again every
    SYSMANAGE_AGENT_ACK_SECONDS with the same queue_message_id, and runs once."""
    d = deployment
    async with contextlib.AsyncExitStack() as stack, online_agent(d, "resend") as agent:
        ws = await seed_client(stack, d)
        agent.drop_next_commands(2)
        pending = asyncio.ensure_future(run_command(ws, agent.host_id, "echo once", wait=30))
        stack.callback(pending.cancel)
        deadline = time.monotonic() + 3 * ACK_SECONDS + 4
        while time.monotonic() < deadline and len(agent.executions) < 2:
            await asyncio.sleep(0.05)
        arrivals = [
            round(c["_at"] - agent.dropped[0]["_at"], 1)
            for c in agent.commands
            if agent.dropped and agent.command_ids(c)[0] == agent.command_ids(agent.dropped[0])[0]
        ]
        assert len(arrivals) == 3, (
            f"deliveries at {arrivals} s; expected three, SYSMANAGE_AGENT_ACK_SECONDS "
            f"({ACK_SECONDS} s) apart"
        )
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert all(ACK_SECONDS - 0.5 <= gap <= ACK_SECONDS + 1.5 for gap in gaps), arrivals
        reply = await pending
        assert reply["type"] == "response", reply
        assert (reply["data"]["status"], reply["data"]["stdout"]) == ("completed", "once\n")
        execution = shell_execution(agent, "echo once")
        queue_id = execution.queue_message_id
        assert {agent.command_ids(c)[0] for c in agent.dropped} == {queue_id}
        # acknowledged now: no further resend
        count = len(commands_of(agent, queue_id))
        await asyncio.sleep(ACK_SECONDS + 0.5)
        assert len(commands_of(agent, queue_id)) == count


async def test_command_resent_while_running_runs_once(deployment):
    """An agent that acknowledges only with the result (as it may) reconnects while a
    command runs: the server sends the unacknowledged command again at once; the agent
    acknowledges the repeat and does not run it twice."""
    d = deployment
    async with (
        contextlib.AsyncExitStack() as stack,
        online_agent(d, "slow-ack", ack_order="result_first") as agent,
    ):
        ws = await seed_client(stack, d)
        command = "sleep 2; echo slow"
        pending = asyncio.ensure_future(run_command(ws, agent.host_id, command, wait=15))
        stack.callback(pending.cancel)
        first = await agent.wait_type(
            "command", where=lambda m: (m["data"].get("parameters") or {}).get("command") == command
        )
        await go_online(d, agent)  # a new socket while the command runs
        reply = await pending
        assert reply["type"] == "response", reply
        assert (reply["data"]["status"], reply["data"]["stdout"]) == ("completed", "slow\n")
        execution = shell_execution(agent, command)
        assert execution.queue_message_id == agent.command_ids(first)[0]
        deliveries = commands_of(agent, execution.queue_message_id)
        assert len(deliveries) >= 2, "not sent again after the reconnect"
        acks = [
            m
            for m in agent.sent
            if m["message_type"] == "command_acknowledgment"
            and m["message_id"] == execution.queue_message_id
        ]
        assert len(acks) >= 2  # the repeat was acknowledged at once, the first with the result


async def test_command_sent_while_the_agent_is_cut_off_runs_once_after_reconnect(deployment):
    d = deployment
    relay = Relay(d.server.port)
    port = await relay.start()
    agent = await enrolled(d, "cutoff")
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(close_and_settle, d, agent)
        stack.push_async_callback(relay.close)  # runs first
        agent.set_base_url(f"http://127.0.0.1:{port}")
        await go_online(d, agent)
        ws = await seed_client(stack, d)
        relay.freeze()  # the agent lost its network; the server still holds its socket
        await agent.wait_closed(WAIT)
        assert (await host(d, agent.host_id)).body["status"] == "online"
        pending = asyncio.ensure_future(run_command(ws, agent.host_id, "echo back", wait=20))
        await asyncio.sleep(1.0)
        assert not pending.done(), pending.result()
        agent.set_base_url(d.server.base_url)  # it reconnects (directly, here)
        await go_online(d, agent)
        reply = await pending
        assert reply["type"] == "response", reply
        assert (reply["data"]["status"], reply["data"]["stdout"]) == ("completed", "back\n")
        execution = shell_execution(agent, "echo back")
        assert len(commands_of(agent, execution.queue_message_id)) == 1


async def test_registrations_while_other_agents_report_and_disconnect(deployment):
    """Enrollment keeps answering while other agents write at the same time (reports,
    disconnects): every newcomer is recorded, none gets a server error."""
    d = deployment
    agents = [await enrolled(d, f"churn{i}") for i in range(4)]
    for agent in agents:
        await go_online(d, agent)
    newcomers = [FakeSysManageAgent(d.server.base_url, hostname(f"newcomer{i}")) for i in range(8)]

    async def report_then_leave(agent: FakeSysManageAgent) -> None:
        for _ in range(3):
            await agent.send_acked("hardware_update", agent.hardware_data())
        await agent.close()

    outcomes = await asyncio.gather(
        *(register(n) for n in newcomers), *(report_then_leave(a) for a in agents)
    )
    statuses = [status for status, _ in outcomes[: len(newcomers)]]
    assert statuses == [201] * len(newcomers), outcomes[: len(newcomers)]
    for agent in agents:
        await wait_host_status(d, agent.host_id, "offline")


async def test_commands_for_unreachable_hosts_fail(deployment):
    d = deployment
    async with contextlib.AsyncExitStack() as stack:
        ws = await seed_client(stack, d)
        never = await enrolled(d, "never")  # approved, never connected
        started = time.monotonic()
        reply = await run_command(ws, never.host_id, "true")
        assert reply["type"] == "error", reply
        assert reply["data"]["code"] == "COMMAND_FAILED", reply
        assert time.monotonic() - started < 2

        gone = await enrolled(d, "gone")
        await go_online(d, gone)
        await close_and_settle(d, gone)
        reply = await run_command(ws, gone.host_id, "true")
        assert reply["type"] == "error", reply
        assert reply["data"]["code"] == "COMMAND_FAILED", reply

        # online through polling, then silent: the command waits, then fails
        silent = await enrolled(d, "silent")
        await silent.poll(
            [
                silent.poll_message("system_info", silent.system_info_data()),
                silent.poll_message("heartbeat", silent.heartbeat_data()),
            ]
        )
        await wait_host_status(d, silent.host_id, "online")
        started = time.monotonic()
        reply = await run_command(ws, silent.host_id, "echo never", wait=15)
        assert reply["type"] == "error", reply
        assert reply["data"]["code"] == "COMMAND_FAILED", reply
        assert time.monotonic() - started >= 2.5  # SYSMANAGE_AGENT_DELIVERY_SECONDS
        assert not silent.executions or all(
            e.command_type != "execute_shell" for e in silent.executions
        )


async def test_package_operations_map_to_install_and_uninstall(deployment):
    d = deployment
    async with (
        contextlib.AsyncExitStack() as stack,
        online_agent(d, "packages", package_failures={"broken-pkg"}) as agent,
    ):
        ws = await seed_client(stack, d)
        await ws.subscribe("package_operations", {"host_id": agent.host_id})
        for operation, package, command_type, final in (
            ("install", "nginx", "install_packages", "completed"),
            ("remove", "broken-pkg", "uninstall_packages", "failed"),
        ):
            reply = await ws.request(
                {
                    "type": "command",
                    "channel": "package_operations",
                    "data": {"host_id": agent.host_id, "operation": operation, "package": package},
                },
                timeout=WAIT,
            )
            assert reply["type"] == "response", reply
            operation_id = reply["data"]["execution_id"]
            execution = await agent.wait_execution(
                lambda e, ref=operation_id: e.parameters.get("request_id") == ref
            )
            assert execution.command_type == command_type
            assert execution.parameters["packages"] == [
                {"package_name": package, "package_manager": "auto"}
            ]
            event = await ws.expect(
                lambda m, ref=operation_id: (
                    m["type"] == "event"
                    and m["channel"] == "package_operations"
                    and m["data"]["execution_id"] == ref
                    and m["data"]["status"] in ("completed", "failed")
                ),
                WAIT,
                what=f"end of the {operation}",
            )
            assert event["data"]["status"] == final, event
            assert event["data"]["package"] == package


async def test_custom_metric_scripts_become_host_metrics(deployment):
    d = deployment
    async with contextlib.AsyncExitStack() as stack, online_agent(d, "metrics") as agent:
        (sync,) = [e for e in agent.executions if e.command_type == "sync_custom_metrics"]
        assert sync.result["success"] is True
        assert sync.result["result"]["metric_count"] == len(agent.custom_metrics) >= 6
        ws = await seed_client(stack, d)
        await ws.subscribe("host_metrics", {"host_id": agent.host_id})
        samples = await agent.collect_custom_metrics()
        failed = [s for s in samples if s["status"] != "ok"]
        assert failed == [], failed  # the server's scripts run on this machine
        extra = {
            "metric_id": "someone-elses-metric",
            "value": None,
            "status": "error",
            "error_detail": "boom",
            "collected_at": samples[0]["collected_at"],
        }
        await agent.send_acked("custom_metric_samples", {"samples": [*samples, extra]})
        event = await ws.next_event("host_metrics", timeout=WAIT)
        assert event["data"]["host_id"] == agent.host_id
        metrics = event["data"]["metrics"]
        assert set(metrics) == {"cpu_usage", "memory_usage", "disk_usage", "load_average"}
        assert 0 <= metrics["cpu_usage"] <= 100
        assert 0 < metrics["memory_usage"] <= 100
        assert list(metrics["disk_usage"]) == ["/"]
        assert 0 < metrics["disk_usage"]["/"] <= 100
        assert len(metrics["load_average"]) == 3
        assert min(metrics["load_average"]) >= 0
        by_name = {
            m["name"].lower(): s["value"]
            for m, s in zip(agent.custom_metrics, samples, strict=True)
        }
        memory = next(v for name, v in by_name.items() if "memory" in name)
        assert metrics["memory_usage"] == pytest.approx(memory, abs=0.01)
        # a hardware report with more mounts brings a new set of scripts
        start = len(agent.executions)
        await agent.send_acked("hardware_update", agent.hardware_data())
        resync = await agent.wait_execution(
            lambda e: e.command_type == "sync_custom_metrics" and agent.executions.index(e) >= start
        )
        scripts = " ".join(m["script"] for m in resync.parameters["metrics"])
        assert '"/var"' in scripts or "'/var'" in scripts, scripts


# -- polling -----------------------------------------------------------------------------


async def test_polling_fallback_end_to_end(deployment):
    d = deployment
    agent = await enrolled(d, "polling")
    other = await enrolled(d, "polling-other")
    async with contextlib.AsyncExitStack() as stack:
        ws = await seed_client(stack, d)
        await ws.subscribe("host_status", {"host_id": agent.host_id})
        # system_info names the host without its token: alone in a poll it is refused,
        # and the reply asks for proof with a ping; the pong, posted with the next
        # poll, carries host_id and host_token and proves that poll
        first = agent.poll_message("system_info", agent.system_info_data())
        refused = await agent.poll([first])
        assert [
            m["data"].get("error_type") for m in refused["messages"] if m["message_type"] == "error"
        ] == ["identification_pending"], refused
        assert [m["message_type"] for m in refused["messages"]][-1] == "ping"
        assert [m["message_type"] for m in agent.poll_outbox] == ["pong"]
        reply = await agent.poll([first])
        assert isinstance(reply["messages"], list)
        assert isinstance(reply["poll_interval"], int | float)
        assert reply["poll_interval"] > 0
        ack = await agent.wait_ack(inner_id(first))  # answered in the reply
        assert ack["_via"] == "poll"
        assert ack["data"]["status"] == "received"
        online = await ws.next_event("host_status", timeout=WAIT)
        assert online["data"]["status"] == "online"
        assert online["data"]["host_id"] == agent.host_id

        pending = asyncio.ensure_future(run_command(ws, agent.host_id, "echo polled", wait=15))
        replies = []
        deadline = time.monotonic() + 12
        while not pending.done() and time.monotonic() < deadline:
            replies.append(await agent.poll())
            await asyncio.sleep(0.2)
        reply = await pending
        assert reply["type"] == "response", reply
        assert (reply["data"]["status"], reply["data"]["stdout"]) == ("completed", "polled\n")
        execution = shell_execution(agent, "echo polled")
        assert execution.via == "poll"
        delivered = [
            m
            for r in replies
            for m in r["messages"]
            if m.get("message_type") == "command"
            and m["data"].get("queue_message_id") == execution.queue_message_id
        ]
        assert len(delivered) == 1, delivered
        (raw,) = delivered
        assert raw["message_id"]
        assert raw["data"]["data"]["command_type"] == "execute_shell"
        assert raw["data"]["data"]["parameters"]["command"] == "echo polled"
        assert [m["message_type"] for m in agent.poll_outbox] == ["pong"]  # results went
        # posted messages are checked and answered like socket frames
        beat = agent.poll_message("heartbeat", agent.heartbeat_data())
        bad = agent.as_poll_message(
            {**agent.envelope("heartbeat", agent.heartbeat_data()), "message_id": "short"}
        )
        start = len(agent.received)
        await agent.poll([beat, bad])
        await agent.wait_ack(inner_id(beat))
        error_of(await agent.wait_type("error", start=start), "invalid_message")

        # refusals
        body = {"host_id": agent.host_id, "messages": [], "max_wait": 0}
        status, _ = await asyncio.to_thread(agent.poll_raw, body)
        assert status == 401
        status, _ = await asyncio.to_thread(agent.poll_raw, body, token="not-a-token")
        assert status == 401
        other_token = await asyncio.to_thread(other.auth)
        status, _ = await asyncio.to_thread(agent.poll_raw, body, token=other_token)
        assert status == 403
        token = await asyncio.to_thread(agent.auth)
        for raw_body in (b"{not json", b"[]", json.dumps({**body, "messages": "x"}).encode()):
            status, answer = await asyncio.to_thread(
                agent.poll_raw, None, token=token, raw=raw_body
            )
            assert status == 400, (raw_body, status, answer)
