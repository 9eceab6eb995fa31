"""
Helpers of the tests that run the fake SysManage agent against a real server: enrollment
over REST, bringing an agent online, waiting for host states.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from tests.compat.fake_sysmanage_agent import FakeSysManageAgent
from tests.integration import harness
from tests.integration.client import WsClient, api, ws_connect

WAIT = 10.0


def hostname(label: str) -> str:
    return f"sm-{label}-{uuid.uuid4().hex[:6]}"


async def admin(
    d: harness.Deployment, method: str, path: str, user: str = "admin", **kwargs: Any
) -> Any:
    return await api(method, d.server.base_url, path, token=d.token(user), **kwargs)


def inner_id(polled: dict[str, Any]) -> str:
    """The id of the message a poll carries (the agent posts it JSON-encoded)."""
    return json.loads(polled["data"])["message_id"]


def results(body: Any) -> list[dict[str, Any]]:
    """The items of a list answer, paginated or not."""
    return body["results"] if isinstance(body, dict) and "results" in body else body


async def pending_registration(d: harness.Deployment, name: str) -> dict[str, Any]:
    listing = await admin(d, "GET", "/api/registrations/?status=pending")
    assert listing.status == 200, listing
    matches = [r for r in results(listing.body) if r.get("hostname") == name]
    assert len(matches) == 1, listing.body
    return matches[0]


async def approve(d: harness.Deployment, agent: FakeSysManageAgent) -> None:
    """Approve the agent's waiting registration over REST, as an administrator."""
    record = await pending_registration(d, agent.hostname)
    assert record["id"] == agent.host_id, (record, agent.host_id)
    reply = await admin(d, "POST", f"/api/registrations/{record['id']}/approve/")
    assert 200 <= reply.status < 300, reply


async def create_key(d: harness.Deployment, name: str, **fields: Any) -> dict[str, Any]:
    reply = await admin(d, "POST", "/api/registration-keys/", json_body={"name": name, **fields})
    assert reply.status == 201, reply
    assert isinstance(reply.body["key"], str), reply.body
    assert reply.body["key"], reply.body
    return reply.body


async def register(agent: FakeSysManageAgent) -> tuple[int, Any]:
    return await asyncio.to_thread(agent.register)


async def enrolled(d: harness.Deployment, label: str, **kwargs: Any) -> FakeSysManageAgent:
    """A fake agent registered and approved by an administrator (not connected)."""
    agent = FakeSysManageAgent(d.server.base_url, hostname(label), **kwargs)
    status, body = await register(agent)
    assert status == 201, (status, body)
    assert body["approved"] is False, (status, body)
    await approve(d, agent)
    return agent


async def host(d: harness.Deployment, host_id: str) -> Any:
    return await admin(d, "GET", f"/api/hosts/{host_id}/")


async def wait_host_status(
    d: harness.Deployment, host_id: str, status: str, timeout: float = WAIT
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await host(d, host_id)
        if last.status == 200 and last.body["status"] == status:
            return last.body
        await asyncio.sleep(0.1)
    raise AssertionError(f"host {host_id} did not become {status}: {last}")


async def go_online(d: harness.Deployment, agent: FakeSysManageAgent) -> None:
    """Connect as the agent does: system_info first (it names the host without its token,
    so it waits), then (for an agent with certificates) its report of them, and a
    heartbeat, which prove the identity; wait until online and until the metric scripts
    the server pushes on connect have been answered."""
    start = len(agent.executions)
    await agent.connect()
    info = await agent.send_system_info()
    if agent.certificates is not None:
        report = await agent.send_certificates()
        await agent.wait_ack(report["message_id"])
    ack = await agent.send_acked("heartbeat", agent.heartbeat_data())
    assert ack["data"]["status"] == "received"
    await agent.wait_ack(info["message_id"])
    await wait_host_status(d, agent.host_id, "online")
    await agent.wait_execution(
        lambda e: e.command_type == "sync_custom_metrics" and agent.executions.index(e) >= start,
        WAIT,
    )


async def close_and_settle(d: harness.Deployment, agent: FakeSysManageAgent) -> None:
    """Close the agent's socket and wait until the server has seen it go (so that one
    test's disconnect is not handled during the next test)."""
    await agent.close()
    if agent.host_id is not None and (await host(d, agent.host_id)).status == 200:
        await wait_host_status(d, agent.host_id, "offline")


@contextlib.asynccontextmanager
async def online_agent(
    d: harness.Deployment, label: str, **kwargs: Any
) -> AsyncIterator[FakeSysManageAgent]:
    agent = await enrolled(d, label, **kwargs)
    try:
        await go_online(d, agent)
        yield agent
    finally:
        await close_and_settle(d, agent)


async def seed_client(
    stack: contextlib.AsyncExitStack, d: harness.Deployment, user: str = "admin"
) -> WsClient:
    return await stack.enter_async_context(ws_connect(d.server.ws_url, token=d.token(user)))


async def run_command(
    ws: WsClient, host_id: str, command: str, timeout: int = 30, wait: float = WAIT
) -> dict[str, Any]:
    return await ws.request(
        {
            "type": "command",
            "channel": "command_execution",
            "data": {"host_id": host_id, "command": command, "timeout": timeout},
        },
        timeout=wait,
    )


def commands_of(agent: FakeSysManageAgent, queue_id: str) -> list[dict[str, Any]]:
    return [c for c in agent.commands if agent.command_ids(c)[0] == queue_id]


def shell_execution(agent: FakeSysManageAgent, command: str) -> Any:
    matches = [
        e
        for e in agent.executions
        if e.command_type == "execute_shell" and e.parameters.get("command") == command
    ]
    assert len(matches) == 1, f"{command!r} ran {len(matches)} times: {agent.executions}"
    return matches[0]


def error_of(message: dict[str, Any], error_type: str) -> dict[str, Any]:
    assert message["message_type"] == "error", message
    assert message["error_type"] == error_type, message
    assert isinstance(message["message"], str), message
    assert message["message"], message
    return message
