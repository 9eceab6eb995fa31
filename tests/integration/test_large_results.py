"""
Large results against a real Daphne server run as ``scripts/serve`` runs it (its
``--websocket-max-message-size`` 4 MiB + 64 KiB, ``SYSMANAGE_AGENT_MAX_MESSAGE_BYTES``
4 MiB): outputs cut to the server's 512 Ki characters, or by the agent, arrive flagged
(``stdout_truncated``, ``stdout_bytes``) on the ``command_execution`` event, in the
command's response and in REST; a result larger than the server takes ends its command
as failed with a message that says so, one line in the server's log, and the agent's
connection open -- the host does not go offline and come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.integration import harness
from tests.integration.client import WsClient, api
from tests.integration.smagent import online_agent, run_command, seed_client
from tests.integration.test_agent_e2e import register, running_agent

pytestmark = pytest.mark.integration

MAX_OUTPUT_CHARS = 512 * 1024
APP_LIMIT = 4 * 1024 * 1024  # SYSMANAGE_AGENT_MAX_MESSAGE_BYTES
WAIT = 30.0


@pytest.fixture(scope="module")
def deployment(launch_sqlite: Any) -> Any:
    """One server with the default limits (the harness passes Daphne's as scripts/serve)."""
    with launch_sqlite("large-results", COMMAND_RESULT_GRACE_SECONDS="5") as deployment:
        yield deployment


def xs(count: int) -> str:
    """A shell command that prints ``count`` characters (no newline: JSON keeps them
    one byte each)."""
    return f"head -c {count} /dev/zero | tr '\\0' x"


async def watched_command(
    d: harness.Deployment, host_id: str, command: str, timeout: int = 20
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Run ``command`` as admin, watched on ``command_execution`` and ``host_status``:
    ``(response data, final event data, host_status events meanwhile)``."""
    async with contextlib.AsyncExitStack() as stack:
        watcher = await seed_client(stack, d)
        await watcher.subscribe_with_status("command_execution", {"host_id": host_id})
        await watcher.subscribe_with_status("host_status", {"host_id": host_id})
        requester = await seed_client(stack, d)
        response = await run_command(requester, host_id, command, timeout=timeout, wait=WAIT)
        assert response["type"] == "response", response
        final = await watcher.expect(
            lambda m: (
                m["type"] == "event" and m["channel"] == "command_execution" and m["data"]["final"]
            ),
            WAIT,
            what="the command's final event",
        )
        await asyncio.sleep(0.5)  # any host_status change would have come by now
        statuses = drain(watcher, "host_status")
        return response["data"], final["data"], statuses


def drain(client: WsClient, channel: str) -> list[dict[str, Any]]:
    """The events on ``channel`` read so far and not consumed."""
    return [m for m in client.pending if m["type"] == "event" and m["channel"] == channel]


async def rest_command(d: harness.Deployment, execution_id: str) -> tuple[dict, dict]:
    """The command from ``GET /api/commands/<id>/`` and from the list."""
    token = d.token("admin")
    one = await api("GET", d.server.base_url, f"/api/commands/{execution_id}/", token=token)
    listing = await api("GET", d.server.base_url, "/api/commands/", token=token)
    assert (one.status, listing.status) == (200, 200), (one, listing)
    items = listing.body["results"] if isinstance(listing.body, dict) else listing.body
    (item,) = [i for i in items if i["id"] == execution_id]
    return one.body, item


def log_lines(server: harness.DaphneServer, since: int, pattern: str) -> list[str]:
    return [line for line in server.log_since(since).splitlines() if re.search(pattern, line)]


async def test_sysmanage_agent_output_over_512k_arrives_flagged_as_cut(deployment):
    d = deployment
    async with online_agent(d, "cut") as agent:
        offset = d.server.log_size()
        response, event, statuses = await watched_command(d, agent.host_id, xs(700_000))
        for shown in (response, event):
            assert shown["status"] == "completed", shown
            assert len(shown["stdout"]) == MAX_OUTPUT_CHARS
            assert (shown["stdout_truncated"], shown["stdout_bytes"]) == (True, 700_000)
            assert (shown["stderr_truncated"], shown["stderr_bytes"]) == (False, 0)
        one, item = await rest_command(d, response["execution_id"])
        for shown in (one, item):
            assert (shown["stdout_truncated"], shown["stdout_bytes"]) == (True, 700_000), shown
        assert item["stdout_length"] == MAX_OUTPUT_CHARS
        (line,) = log_lines(d.server, offset, "cut to")
        assert "WARNING" in line
        for part in (response["execution_id"], agent.hostname, "700000 bytes", "server's limit"):
            assert part in line, line
        assert statuses == []


async def test_own_agent_output_cut_by_the_agent_arrives_flagged_with_its_size(
    deployment, tmp_path: Path
):
    d = deployment
    async with running_agent(d, tmp_path, f"cut-{uuid.uuid4().hex[:6]}") as (enrolled, _):
        offset = d.server.log_size()
        response, event, statuses = await watched_command(d, enrolled["host_id"], xs(700_000))
        for shown in (response, event):
            assert shown["status"] == "completed", shown
            assert shown["stdout_truncated"] is True
            assert shown["stdout_bytes"] == 700_000  # the agent counted what it dropped
            assert 0 < len(shown["stdout"]) < 700_000
        one, item = await rest_command(d, response["execution_id"])
        assert (one["stdout_truncated"], one["stdout_bytes"]) == (True, 700_000)
        assert (item["stdout_truncated"], item["stdout_bytes"]) == (True, 700_000)
        (line,) = log_lines(d.server, offset, "cut to")
        assert "INFO" in line
        assert response["execution_id"] in line
        assert "by the agent" in line
        assert statuses == []


@pytest.mark.parametrize(
    ("characters", "limit"),
    [
        # over SYSMANAGE_AGENT_MAX_MESSAGE_BYTES, under Daphne's: the server reads it
        (APP_LIMIT + 20_000, APP_LIMIT),
        # over Daphne's limit: Daphne reads past it without keeping it
        (6_000_000, harness.WS_TRANSPORT_LIMIT),
    ],
    ids=["over-the-server-limit", "over-daphnes-limit"],
)
async def test_sysmanage_agent_result_over_the_limit_fails_the_command_without_a_flap(
    deployment, characters, limit
):
    d = deployment
    async with online_agent(d, "huge") as agent:
        offset = d.server.log_size()
        response, event, statuses = await watched_command(d, agent.host_id, xs(characters))
        for shown in (response, event):
            assert shown["status"] == "failed", shown
            assert shown["error"].startswith(
                f"The result was larger than the server accepts ({limit / 2**20:.3g} MiB)"
            ), shown["error"]
            assert "raise SYSMANAGE_AGENT_MAX_MESSAGE_BYTES" in shown["error"]
            assert "reduce the output" in shown["error"]
            assert (shown["stdout"], shown["stdout_truncated"], shown["stdout_bytes"]) == (
                "",
                True,
                None,
            )
        one, _ = await rest_command(d, response["execution_id"])
        assert (one["status"], one["error"]) == ("failed", response["error"])
        # the agent was told, and its connection stayed open: no flap at all
        refused = await agent.wait_type("error", WAIT)
        assert refused["error_type"] == "message_too_large"
        assert refused["data"]["message_type"] == "command_result"
        assert not agent.is_closed
        assert statuses == []
        await agent.send_acked("heartbeat", agent.heartbeat_data())
        # one line in the log: the host, the size, the limit, the command failed
        (line,) = log_lines(d.server, offset, "over the limit")
        assert "WARNING" in line
        size = int(re.search(r"a message of (\d+) bytes", line).group(1))
        assert size > characters
        for part in (agent.hostname, f"limit of {limit} bytes", response["execution_id"]):
            assert part in line, line
        assert log_lines(d.server, offset, "WSDISCONNECT /api/agent/connect") == []


async def test_own_agent_endpoint_result_over_daphnes_limit_fails_and_is_acknowledged(
    deployment,
):
    """The product's agent never sends such a frame (it cuts its output); a client with
    a host's token that does gets the same treatment on ``/ws/agent``."""
    d = deployment
    enrolled = register(d, f"raw-{uuid.uuid4().hex[:6]}")
    url = d.server.base_url.replace("http", "ws") + "/ws/agent"
    headers = {"Authorization": f"Bearer {enrolled['token']}"}
    async with (
        connect(url, additional_headers=headers, max_size=None) as agent,
        contextlib.AsyncExitStack() as stack,
    ):
        await agent.send(json.dumps({"type": "hello", "data": {"hostname": "raw"}, "id": 1}))
        assert json.loads(await agent.recv())["type"] == "welcome"
        requester = await seed_client(stack, d)
        offset = d.server.log_size()
        pending = asyncio.ensure_future(
            run_command(requester, enrolled["host_id"], "cat big", wait=WAIT)
        )
        order = json.loads(await asyncio.wait_for(agent.recv(), WAIT))
        assert order["type"] == "run_command", order
        execution_id = order["data"]["execution_id"]
        result = {
            "execution_id": execution_id,
            "status": "completed",
            "exit_code": 0,
            "stdout": "x" * 6_000_000,
        }
        await agent.send(json.dumps({"type": "command_result", "data": result, "id": 2}))
        replies = [json.loads(await asyncio.wait_for(agent.recv(), WAIT)) for _ in range(2)]
        assert [r["type"] for r in replies] == ["error", "ack"], replies
        assert replies[0]["data"]["code"] == "MESSAGE_TOO_LARGE"
        assert replies[1]["data"] == {"kind": "command_result", "ref": execution_id}
        response = (await pending)["data"]
        assert response["status"] == "failed"
        assert "raise AGENT_MAX_MESSAGE_BYTES" in response["error"]
        (line,) = log_lines(d.server, offset, "over the limit")
        assert execution_id in line
        await agent.send(json.dumps({"type": "heartbeat", "data": {}}))
        await agent.ping()  # still open
