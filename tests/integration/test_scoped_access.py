"""
Scoped access on a real cluster: two servers on PostgreSQL and Redis, real agents on the
first, a user who sees one host group connected to the second.  Every channel and the
REST API show that user only the hosts of the group; commands run only there; a grant
given or taken away from another process (``manage.py shell``) reaches the open socket
within seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import harness
from tests.integration.client import WsClient, api, obtain_tokens, ws_connect
from tests.integration.smagent import results
from tests.integration.test_agent_e2e import AGENT_SETTINGS, AgentProcess, wait_status
from tests.integration.test_host_groups import manage

pytestmark = pytest.mark.integration

#: how long a grant change may take to reach an open socket
WITHIN = 10.0


@pytest.fixture(scope="module")
def cluster(launch_pg_redis: Any) -> Iterator[harness.Deployment]:
    with launch_pg_redis("scoped", **AGENT_SETTINGS) as deployment:
        yield deployment


def shell(d: harness.Deployment, code: str) -> str:
    return harness.manage_shell(
        d.env,
        "from django.contrib.auth import get_user_model\n"
        "from hosts.models import HostGroup, HostGroupGrant\n"
        "from hosts import services\n"
        "User = get_user_model()\n" + code,
    )


def give(d: harness.Deployment, group: str, **flags: bool) -> None:
    flag_args = "".join(f", {name}={value}" for name, value in flags.items())
    shell(
        d,
        "services.host_group_grant_save(HostGroupGrant("
        f"host_group=HostGroup.objects.get(name={group!r}), "
        f"user=User.objects.get(username='scoped'){flag_args}))",
    )


def take(d: harness.Deployment, group: str) -> None:
    shell(
        d,
        "grant = HostGroupGrant.objects.get(host_group__name="
        f"{group!r}, user__username='scoped')\n"
        "services.host_group_grant_delete(grant_id=grant.pk)",
    )


async def until(predicate: Any, what: str, timeout: float = WITHIN) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await predicate()
        if found:
            return found
        await asyncio.sleep(0.25)
    raise AssertionError(f"{what} not within {timeout}s")


async def command(client: WsClient, host_id: str, text: str) -> dict[str, Any]:
    return await client.request(
        {
            "type": "command",
            "channel": "command_execution",
            "data": {"host_id": host_id, "command": text, "timeout": 20},
        },
        timeout=30,
    )


async def test_a_user_who_sees_one_group_sees_and_acts_only_there(cluster, tmp_path: Path):
    d = cluster
    web, _ = manage(d, "register_host", "scoped-web", "--group", "sc-web")
    db, _ = manage(d, "register_host", "scoped-db", "--group", "sc-db")
    shell(d, f"User.objects.create_user('scoped', password={d.password!r})")
    give(d, "sc-web", can_run_commands=True)
    agents = [
        AgentProcess(
            d.servers[0].base_url,
            host["token"],
            tmp_path / f"state-{name}",
            tmp_path / f"agent-{name}.log",
        ).start()
        for name, host in (("web", web), ("db", db))
    ]
    try:
        for host in (web, db):
            await wait_status(d, host["host_id"], "online")
        token = obtain_tokens(d.servers[1].base_url, "scoped", d.password)["access"]
        async with ws_connect(d.servers[1].ws_url, token=token) as client:
            await check_channels(d, client, web["host_id"], db["host_id"])
            await check_grant_changes(d, client, db["host_id"])
        listed = await api("GET", d.servers[1].base_url, "/api/hosts/", token=token)
        assert [h["hostname"] for h in results(listed.body)] == ["scoped-web"]
        hidden = await api(
            "GET", d.servers[1].base_url, f"/api/hosts/{db['host_id']}/", token=token
        )
        assert hidden.status == 404, hidden
    finally:
        for agent in agents:
            agent.stop()


async def check_channels(d: harness.Deployment, client: WsClient, web: str, db: str) -> None:
    _, hosts = await client.subscribe_with_status("host_status")
    assert [h["hostname"] for h in hosts["data"]["hosts"]] == ["scoped-web"]
    _, figures = await client.subscribe_with_status("fleet_status")
    assert (figures["data"]["total_hosts"], figures["data"]["online_hosts"]) == (1, 1)
    await client.subscribe_with_status("command_execution")
    await client.subscribe_with_status("system_alerts")

    refused = await client.request(
        {"type": "subscribe", "channel": "host_metrics", "filters": {"host_id": db}}
    )
    assert refused["data"]["code"] == "INVALID_FILTERS", refused
    assert "no host with id" in refused["data"]["message"]
    await client.subscribe("host_metrics", {"host_id": web})
    report = await client.next_event("host_metrics", timeout=10)
    assert report["data"]["host_id"] == web

    not_found = await command(client, db, "hostname")
    assert (not_found["data"]["code"], not_found["data"]["message"]) == (
        "COMMAND_FAILED",
        "Host not found",
    )
    ran = await command(client, web, "echo scoped-ok")
    assert ran["type"] == "response", ran
    assert ran["data"]["stdout"].strip() == "scoped-ok"

    # The administrator's command on the hidden host, and an alert there: nothing of
    # either reaches the scoped socket, on any channel.
    admin = d.token("admin")
    async with ws_connect(d.servers[0].ws_url, token=admin) as other:
        hidden_run = await command(other, db, "echo hidden-run")
        assert hidden_run["type"] == "response", hidden_run
        seen_run = await command(other, web, "echo seen-run")
        assert seen_run["type"] == "response", seen_run
    raised = await api(
        "POST",
        d.servers[0].base_url,
        "/api/alerts/",
        token=admin,
        json_body={"severity": "critical", "category": "disk", "title": "hidden", "host": db},
    )
    assert raised.status == 201, raised
    finished = await client.expect(
        lambda m: (
            m["channel"] == "command_execution"
            and m["type"] == "event"
            and m["data"].get("status") == "completed"
            and m["data"].get("host_id") == web
            and m["data"].get("execution_id") == seen_run["data"]["execution_id"]
        ),
        timeout=10,
        what="the visible command's completion",
    )
    assert finished["data"]["host_id"] == web
    await asyncio.sleep(1.5)  # the hidden ones, had they been sent, would be here by now
    await client.ping()
    leaked = [
        m
        for m in client.log
        if m["type"] in ("event", "status")
        and db in str(m["data"])
        and m["channel"] != "fleet_status"
    ]
    assert leaked == [], leaked
    # Subscribing now, with the alert on the hidden host open: the snapshot leaves it
    # out as the events did; a subscription to the host's alerts is refused.
    _, alerts = await client.subscribe_with_status("system_alerts")
    assert db not in str(alerts["data"]), alerts
    hidden_alerts = await client.request(
        {"type": "subscribe", "channel": "system_alerts", "filters": {"host_id": db}}
    )
    assert hidden_alerts["data"]["code"] == "INVALID_FILTERS", hidden_alerts
    fleet = [m for m in client.log if m["channel"] == "fleet_status" and m["type"] == "event"]
    assert all(m["data"]["total_hosts"] == 1 for m in fleet), fleet
    # The hidden host's alert is never counted. The visible host may have had one of its
    # own meanwhile (its real agent reports this machine's CPU, which a busy machine
    # keeps high): then it counts as one, and the hidden one would make two.
    everything = await api(
        "GET", d.servers[0].base_url, f"/api/alerts/?host={web}&limit=500", token=d.token("admin")
    )
    assert everything.status == 200, everything
    own = results(everything.body)
    ceiling = 1 if own else 0
    assert all(m["data"]["hosts_with_alerts"] <= ceiling for m in fleet), (fleet, own)


async def check_grant_changes(d: harness.Deployment, client: WsClient, db: str) -> None:
    await asyncio.to_thread(give, d, "sc-db")

    async def db_metrics() -> dict[str, Any] | None:
        reply = await client.request(
            {"type": "subscribe", "channel": "host_metrics", "filters": {"host_id": db}}
        )
        return reply if reply["type"] == "response" else None

    await until(db_metrics, "a subscription to the newly granted host")
    # (the subscription replaced the one to the other host: reports of the db host now)
    await client.expect(
        lambda m: (
            m["type"] == "event"
            and m["channel"] == "host_metrics"
            and m["data"].get("host_id") == db
        ),
        timeout=10,
        what="a report of the newly granted host",
    )
    figures = await client.expect(
        lambda m: m["channel"] == "fleet_status" and m["data"].get("total_hosts") == 2,
        timeout=WITHIN,
        what="fleet figures counted over both hosts",
    )
    assert figures["type"] == "event"

    started = time.monotonic()
    await asyncio.to_thread(take, d, "sc-db")
    revoked = await client.expect(
        lambda m: m["type"] == "error" and m["data"].get("code") == "SUBSCRIPTION_REVOKED",
        timeout=WITHIN,
        what="the end of the subscription to the host no longer seen",
    )
    assert revoked["channel"] == "host_metrics"
    assert time.monotonic() - started < WITHIN
