"""The agent endpoint through the consumer: auth, hello, metrics, commands, packages."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import pytest
from channels.testing import WebsocketCommunicator

from hosts import agent_protocol, consumers, maintenance, services
from hosts.models import CommandExecution, ExecutionStatus, Host, MetricSample, OperationStatus
from sysmanage.asgi import application
from sysmanage.dbthreads import database_sync_to_async
from tests.wsutil import expect_close, next_event, open_socket, request, subscribe

pytestmark = pytest.mark.django_db(transaction=True)

FACTS = {
    "hostname": "web-01.local",
    "fqdn": "web-01.example.com",
    "ip_addresses": ["192.0.2.10", "fe80::1%eth0"],
    "os_name": "Debian GNU/Linux",
    "os_version": "12",
    "kernel": "6.1.0",
    "architecture": "x86_64",
    "cpu_count": 4,
    "memory_total": 8 * 2**30,
    "agent_version": "1.0.0",
    "capabilities": ["commands"],
}
METRICS = {
    "cpu_usage": 23.5,
    "memory_usage": 67.2,
    "disk_usage": {"/": 45.8, "/var": 78.2},
    "load_average": [1.2, 1.5, 1.8],
}


@pytest.fixture
def enrolled(db):
    host, token = services.host_register(hostname="web-01")
    return host, token


async def agent_socket(token: str | None, headers=None) -> WebsocketCommunicator:
    headers = list(headers or [])
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    comm = WebsocketCommunicator(application, "/ws/agent", headers=headers)
    connected, _ = await comm.connect()
    assert connected
    return comm


async def hello(comm) -> dict:
    await comm.send_json_to({"type": "hello", "data": FACTS, "id": "h"})
    welcome = await comm.receive_json_from(timeout=3)
    assert welcome["type"] == "welcome", welcome
    return welcome


async def client_socket(make_user, token_for, *, superuser=True):
    user = await database_sync_to_async(make_user)("ops", superuser=superuser)
    return await open_socket("/ws", token=token_for(user))


async def next_of(comm, type_):
    while True:
        message = await comm.receive_json_from(timeout=5)
        if message["type"] == type_:
            return message


@pytest.mark.parametrize("token", [None, "smat_wrong"])
async def test_bad_agent_token_gets_auth_failed_4001(enrolled, token):
    comm = await agent_socket(token)
    error = await comm.receive_json_from(timeout=3)
    assert error["type"] == "error"
    assert error["data"]["code"] == "AUTH_FAILED"
    assert error["data"]["action"] == "reconnect_with_valid_token"
    assert await expect_close(comm) == 4001


async def test_browsers_cannot_use_the_agent_endpoint(enrolled):
    _, token = enrolled
    comm = WebsocketCommunicator(
        application,
        "/ws/agent",
        headers=[(b"authorization", f"Bearer {token}".encode()), (b"origin", b"http://localhost")],
    )
    connected, _ = await comm.connect()
    assert not connected


async def test_client_tokens_are_not_agent_tokens(enrolled, make_user, token_for):
    user = await database_sync_to_async(make_user)("ops")
    comm = await agent_socket(token_for(user))
    assert (await comm.receive_json_from(timeout=3))["data"]["code"] == "AUTH_FAILED"


async def test_hello_marks_online_and_stores_facts(enrolled, make_user, token_for):
    host, token = enrolled
    client = await client_socket(make_user, token_for)
    await subscribe(client, "host_status", {"host_id": str(host.id)})
    agent = await agent_socket(token)
    welcome = await hello(agent)
    assert welcome["id"] == "h"
    assert welcome["data"]["host_id"] == str(host.id)
    assert welcome["data"]["heartbeat_interval"] > 0
    assert welcome["data"]["metrics_interval"] > 0
    event = await next_event(client, "host_status")
    assert (event["data"]["status"], event["data"]["previous_status"]) == ("online", "unknown")
    stored = await database_sync_to_async(Host.objects.get)(id=host.id)
    assert stored.hostname == "web-01"  # the enrolled name stays
    assert (stored.os_name, stored.cpu_count, stored.ip_addresses) == (
        "Debian GNU/Linux",
        4,
        ["192.0.2.10", "fe80::1"],
    )
    await agent.disconnect()
    event = await next_event(client, "host_status")
    assert (event["data"]["status"], event["data"]["previous_status"]) == ("offline", "online")
    await client.disconnect()


async def test_messages_before_hello_are_refused(enrolled):
    agent = await agent_socket(enrolled[1])
    await agent.send_json_to({"type": "heartbeat", "data": {}, "id": 1})
    error = await agent.receive_json_from(timeout=3)
    assert error["data"]["code"] == "INVALID_MESSAGE"
    assert error["id"] == 1


async def test_metrics_reach_subscribers_without_database_writes(enrolled, make_user, token_for):
    host, token = enrolled
    client = await client_socket(make_user, token_for)
    await subscribe(client, "host_metrics", {"host_id": str(host.id), "metrics": ["disk"]})
    agent = await agent_socket(token)
    await hello(agent)
    for _ in range(3):
        await agent.send_json_to({"type": "metrics", "data": {"metrics": METRICS}})
    for _ in range(3):
        event = await next_event(client, "host_metrics")
        assert event["data"]["metrics"] == {"disk_usage": {"/": 45.8, "/var": 78.2}}
    assert await database_sync_to_async(MetricSample.objects.count)() == 0
    await agent.send_json_to(
        {"type": "metrics", "data": {"metrics": {"cpu_usage": 150}}, "id": "m"}
    )
    error = await next_of(agent, "error")
    assert error["data"]["code"] == "INVALID_MESSAGE"
    assert error["id"] == "m"
    await agent.disconnect()  # the unfinished minute is written on disconnect
    sample = await database_sync_to_async(MetricSample.objects.get)(host_id=host.id)
    assert (sample.samples, sample.cpu_usage, sample.disk_usage["/var"]) == (3, 23.5, 78.2)
    await client.disconnect()


async def run_agent_side(agent, *, exit_code=0, duplicate=False):
    """Play the agent: take one run_command, report start and result."""
    order = await next_of(agent, "run_command")
    execution_id = order["data"]["execution_id"]
    await agent.send_json_to({"type": "command_started", "data": {"execution_id": execution_id}})
    await run_agent_side_result(agent, execution_id, exit_code=exit_code, duplicate=duplicate)
    return order


async def run_agent_side_result(agent, execution_id, *, exit_code=0, duplicate=False):
    """Play the agent: report the result of ``execution_id`` and take the ack."""
    result = {
        "type": "command_result",
        "id": "r1",
        "data": {
            "execution_id": execution_id,
            "status": "completed",
            "exit_code": exit_code,
            "stdout": "hello\n",
            "stderr": "",
            "execution_time": 0.012,
            "stdout_truncated": False,
            "stderr_truncated": False,
            "error": "",
        },
    }
    await agent.send_json_to(result)
    ack = await next_of(agent, "ack")
    assert ack["data"] == {"kind": "command_result", "ref": execution_id}
    if duplicate:
        result["data"]["stdout"] = "changed"
        await agent.send_json_to(result)
        ack = await next_of(agent, "ack")
        assert ack["data"]["ref"] == execution_id


async def test_command_round_trip(enrolled, make_user, token_for):
    host, token = enrolled
    agent = await agent_socket(token)
    await hello(agent)
    client = await client_socket(make_user, token_for)
    watcher = await client_socket_named(make_user, token_for, "watcher")
    await subscribe(watcher, "command_execution", {"host_id": str(host.id)})
    await client.send_json_to(
        {
            "type": "command",
            "channel": "command_execution",
            "data": {"host_id": str(host.id), "command": "echo hello", "timeout": 30},
            "id": "request_123",
        }
    )
    order = await run_agent_side(agent, duplicate=True)
    assert order["data"]["command"] == "echo hello"
    assert order["data"]["timeout"] == 30
    response = await client.receive_json_from(timeout=5)
    assert response["type"] == "response"
    assert response["id"] == "request_123"
    assert response["channel"] == "command_execution"
    data = response["data"]
    assert {
        k: data[k]
        for k in (
            "execution_id",
            "host_id",
            "command",
            "status",
            "exit_code",
            "stdout",
            "stderr",
            "execution_time",
        )
    } == {
        "execution_id": order["data"]["execution_id"],
        "host_id": str(host.id),
        "command": "echo hello",
        "status": "completed",
        "exit_code": 0,
        "stdout": "hello\n",
        "stderr": "",
        "execution_time": 0.012,
    }
    statuses = [
        (await next_event(watcher, "command_execution"))["data"]["status"] for _ in range(3)
    ]
    assert statuses == ["pending", "running", "completed"]
    stored = await database_sync_to_async(CommandExecution.objects.get)(
        id=order["data"]["execution_id"]
    )
    assert stored.stdout == "hello\n"  # the duplicate result was not applied
    for comm in (agent, client, watcher):
        await comm.disconnect()


async def client_socket_named(make_user, token_for, name):
    user = await database_sync_to_async(make_user)(name)
    return await open_socket("/ws", token=token_for(user))


async def test_agent_that_never_answers_ends_in_timeout(enrolled, make_user, token_for, settings):
    settings.COMMAND_RESULT_GRACE_SECONDS = 0
    host, token = enrolled
    agent = await agent_socket(token)
    await hello(agent)
    client = await client_socket(make_user, token_for)
    response = await request(
        client,
        {
            "type": "command",
            "channel": "command_execution",
            "data": {"host_id": str(host.id), "command": "sleep 60", "timeout": 1},
            "id": "t",
        },
        timeout=5,
    )
    assert response["type"] == "response"
    assert response["id"] == "t"
    assert response["data"]["status"] == "timeout"
    assert response["data"]["exit_code"] is None
    await agent.disconnect()
    await client.disconnect()


async def test_online_host_without_agent_fails_fast(enrolled, make_user, token_for, settings):
    settings.AGENT_DISPATCH_CONFIRM_SECONDS = 0.5
    host, _ = enrolled
    await database_sync_to_async(services.host_set_status)(host_id=host.id, status="online")
    client = await client_socket(make_user, token_for)
    error = await request(
        client,
        {
            "type": "command",
            "channel": "command_execution",
            "data": {"host_id": str(host.id), "command": "id"},
            "id": "x",
        },
        timeout=5,
    )
    assert error["data"]["code"] == "COMMAND_FAILED"
    assert error["data"]["message"] == "Host not reachable: its agent did not take the command"
    stored = await database_sync_to_async(CommandExecution.objects.get)(
        id=error["data"]["execution_id"]
    )
    assert stored.status == "failed"


async def test_a_command_sent_to_its_agent_is_not_failed_when_the_confirmation_is_lost(
    enrolled, make_user, token_for, settings, monkeypatch
):
    """The confirmation that the agent was sent a command (``agent_took``) travels through
    the channel layer, and is lost while that is down.  A command sent to its agent is
    running from then on, whether or not the agent has reported starting it yet (it may
    be waiting for a free slot): the requester gets its result, not COMMAND_FAILED."""
    settings.AGENT_DISPATCH_CONFIRM_SECONDS = 0.3
    monkeypatch.setattr(consumers, "publish_control_now", lambda message: None)
    host, token = enrolled
    agent = await agent_socket(token)
    await hello(agent)
    client = await client_socket(make_user, token_for)
    await client.send_json_to(
        {
            "type": "command",
            "channel": "command_execution",
            "data": {"host_id": str(host.id), "command": "echo hello", "timeout": 30},
            "id": "lost",
        }
    )
    order = await next_of(agent, "run_command")
    execution_id = order["data"]["execution_id"]
    stored = await database_sync_to_async(CommandExecution.objects.get)(id=execution_id)
    assert stored.status == "running"
    await asyncio.sleep(0.6)  # past the window for the confirmation, no start reported
    await run_agent_side_result(agent, execution_id)
    response = await client.receive_json_from(timeout=5)
    assert (response["type"], response["id"]) == ("response", "lost"), response
    assert (response["data"]["status"], response["data"]["stdout"]) == ("completed", "hello\n")
    stored = await database_sync_to_async(CommandExecution.objects.get)(id=execution_id)
    assert (stored.status, stored.stdout) == ("completed", "hello\n")
    for comm in (agent, client):
        await comm.disconnect()


async def test_package_operation_progress_and_result(enrolled, make_user, token_for):
    host, token = enrolled
    agent = await agent_socket(token)
    await hello(agent)
    client = await client_socket(make_user, token_for)
    await subscribe(client, "package_operations", {"host_id": str(host.id)})
    await client.send_json_to(
        {
            "type": "command",
            "channel": "package_operations",
            "data": {"host_id": str(host.id), "operation": "install", "package": "nginx"},
            "id": "p",
        }
    )
    order = await next_of(agent, "package_operation")
    operation_id = order["data"]["operation_id"]
    assert (order["data"]["operation"], order["data"]["package"]) == ("install", "nginx")
    seen = []
    while True:
        message = await client.receive_json_from(timeout=5)
        if message["type"] == "response":
            break
        if message["type"] == "event":
            seen.append((message["data"]["status"], message["data"]["progress"]))
    assert message["id"] == "p"
    assert message["data"]["execution_id"] == operation_id
    assert message["data"]["status"] == "pending"
    await agent.send_json_to(
        {
            "type": "package_progress",
            "data": {
                "operation_id": operation_id,
                "progress": 45,
                "message": "Downloading package nginx (1.18.0)",
            },
        }
    )
    await agent.send_json_to(
        {
            "type": "package_result",
            "data": {
                "operation_id": operation_id,
                "status": "completed",
                "exit_code": 0,
                "output": "Setting up nginx",
                "message": "Installed nginx",
            },
        }
    )
    assert (await next_of(agent, "ack"))["data"] == {"kind": "package_result", "ref": operation_id}
    while not seen or seen[-1][0] != "completed":
        event = await next_event(client, "package_operations")
        seen.append((event["data"]["status"], event["data"]["progress"]))
    # handed to the agent (in progress at 0 %), then its own progress
    assert seen == [("pending", 0), ("in_progress", 0), ("in_progress", 45), ("completed", 100)]
    await agent.disconnect()
    await client.disconnect()


async def test_revoking_the_token_closes_the_agent(enrolled):
    host, token = enrolled
    agent = await agent_socket(token)
    await hello(agent)
    await database_sync_to_async(services.host_revoke_token)(host_id=host.id)
    error = await next_of(agent, "error")
    assert error["data"]["code"] == "AUTH_FAILED"
    assert await expect_close(agent) == 4001
    again = await agent_socket(token)
    assert (await again.receive_json_from(timeout=3))["data"]["code"] == "AUTH_FAILED"


async def test_a_second_connection_replaces_the_first(enrolled):
    host, token = enrolled
    first = await agent_socket(token)
    await hello(first)
    second = await agent_socket(token)
    await hello(second)
    error = await next_of(first, "error")
    assert error["data"]["code"] == "REPLACED"
    assert await expect_close(first) == 4009
    await first.disconnect()
    await asyncio.sleep(0.2)
    stored = await database_sync_to_async(Host.objects.get)(id=host.id)
    assert stored.status == "online"  # the old socket's end does not take the host offline
    await second.disconnect()


async def test_unknown_agent_message_type(enrolled):
    agent = await agent_socket(enrolled[1])
    await hello(agent)
    await agent.send_to(text_data=json.dumps({"type": "selfdestruct", "id": 9}))
    error = await agent.receive_json_from(timeout=3)
    assert error["data"]["code"] == "UNKNOWN_TYPE"
    assert error["id"] == 9


def test_result_statuses_are_the_final_statuses_of_the_models() -> None:
    assert set(agent_protocol.COMMAND_STATUSES) == {
        ExecutionStatus.COMPLETED,
        ExecutionStatus.FAILED,
        ExecutionStatus.TIMEOUT,
    }
    assert set(agent_protocol.PACKAGE_STATUSES) == {
        OperationStatus.COMPLETED,
        OperationStatus.FAILED,
    }


async def test_a_result_over_the_limit_fails_its_command_and_keeps_the_connection(
    enrolled, make_user, token_for, settings, caplog
):
    settings.AGENT_MAX_MESSAGE_BYTES = 64 * 1024
    host, token = enrolled
    agent = await agent_socket(token)
    await hello(agent)
    client = await client_socket(make_user, token_for)
    await client.send_json_to(
        {
            "type": "command",
            "channel": "command_execution",
            "data": {"host_id": str(host.id), "command": "cat big", "timeout": 30},
            "id": "big",
        }
    )
    order = await next_of(agent, "run_command")
    execution_id = order["data"]["execution_id"]
    big = {"execution_id": execution_id, "status": "completed", "stdout": "x" * 100_000}
    await agent.send_json_to({"type": "command_result", "data": big, "id": "r1"})
    refused = await next_of(agent, "error")
    assert refused["data"]["code"] == "MESSAGE_TOO_LARGE"
    assert "AGENT_MAX_MESSAGE_BYTES" in refused["data"]["message"]
    # acknowledged: the agent need not send it again, the server has recorded the failure
    ack = await next_of(agent, "ack")
    assert ack["data"] == {"kind": "command_result", "ref": execution_id}
    response = await client.receive_json_from(timeout=5)
    assert response["data"]["status"] == "failed"
    assert response["data"]["error"].startswith("The result was larger than the server accepts")
    assert (response["data"]["stdout_truncated"], response["data"]["stdout_bytes"]) == (True, None)
    (line,) = [r for r in caplog.records if "over the limit" in r.getMessage()]
    assert all(part in line.getMessage() for part in ("web-01", "65536", execution_id)), line
    # the connection is still the host's agent
    await agent.send_json_to({"type": "heartbeat", "data": {}})
    assert await agent.receive_nothing(timeout=0.3)
    row = await database_sync_to_async(Host.objects.get)(id=host.id)
    assert row.status == "online"
    for comm in (agent, client):
        await comm.disconnect()


def test_a_hello_is_one_row_lock_and_one_write(enrolled, django_assert_num_queries):
    host, _ = enrolled
    services.host_agent_hello(host_id=host.id, session="before", facts={})
    # its agent reconnects to a restarted server: the host is still online
    # BEGIN, the host (and whether work waits), its update, COMMIT
    with django_assert_num_queries(4):
        hello_host = services.host_agent_hello(host_id=host.id, session="s", facts=FACTS)
    assert hello_host.status == "online"
    assert not services.work_waiting(hello_host)
    stored = Host.objects.get(id=host.id)
    assert (stored.status, stored.agent_session, stored.fqdn) == (
        "online",
        "s",
        "web-01.example.com",
    )
    assert stored.last_seen is not None


async def test_a_hello_asks_for_work_only_when_some_waits(enrolled, make_user, monkeypatch):
    host, token = enrolled
    asked: list[str] = []
    hand_over = services.work_hand_over

    def counted(**kwargs):
        asked.append(kwargs["host_id"])
        return hand_over(**kwargs)

    monkeypatch.setattr(services, "work_hand_over", counted)
    agent = await agent_socket(token)
    await hello(agent)
    await agent.disconnect()
    assert asked == []
    user = await database_sync_to_async(make_user)("ops", superuser=True)
    await database_sync_to_async(services.command_create)(
        host=host, command="uptime", timeout=30, user=user
    )
    agent = await agent_socket(token)
    await hello(agent)
    order = await next_of(agent, "run_command")
    assert order["data"]["command"] == "uptime"
    assert asked == [str(host.id)]
    await agent.disconnect()


async def test_work_queued_while_the_hello_is_under_way_is_handed_over(
    enrolled, make_user, monkeypatch
):
    _host, token = enrolled
    user = await database_sync_to_async(make_user)("ops", superuser=True)
    real_hello, real_nudge = services.host_agent_hello, consumers.AgentConsumer.nudge
    nudged = threading.Event()

    def nudge(self):
        real_nudge(self)
        nudged.set()

    def hello_then_a_command(**kwargs):
        # the host is online, and its work was looked at: a command comes just after,
        # and the connection hears of it before the hello is through
        said = real_hello(**kwargs)
        services.command_create(host=said, command="uptime", timeout=30, user=user)
        assert nudged.wait(5)
        return said

    monkeypatch.setattr(consumers.AgentConsumer, "nudge", nudge)
    # no periodic re-check of the agents' work (hosts.maintenance.agent_recheck) helps
    monkeypatch.setattr(maintenance, "Node", SimpleNamespace(current=lambda: None))
    monkeypatch.setattr(services, "host_agent_hello", hello_then_a_command)
    agent = await agent_socket(token)
    await hello(agent)
    order = await next_of(agent, "run_command")
    assert order["data"]["command"] == "uptime"
    await agent.disconnect()
