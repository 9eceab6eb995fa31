"""What one agent metrics report costs the server, structurally: it is taken as it
arrives (no dispatch through the consumer's task), queries nothing, copies nothing
deeply, and still goes through the rate and the checks (docs/benchmarks.md, "Agent
ingest").

The agent sockets here are driven through the server's own inbox
(:class:`sysmanage.serve.Inbox`), as Daphne under ``sysmanage.serve`` drives them."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.db.backends import utils as db_utils

from hosts import consumers, services
from sysmanage import metrics
from sysmanage.asgi import application
from sysmanage.node import Node
from sysmanage.serve import Inbox
from tests.test_agent_consumer import METRICS, client_socket, hello, next_of
from tests.wsutil import next_event, subscribe

pytestmark = pytest.mark.django_db(transaction=True)


class FedInbox(Inbox):
    """The server's inbox, fed the way the test communicator feeds its queue."""

    __slots__ = ()

    async def put(self, item: dict[str, Any]) -> None:
        self.put_nowait(item)


async def agent_through_inbox(token: str) -> tuple[WebsocketCommunicator, FedInbox]:
    """An agent socket whose frames reach the consumer through the server's inbox."""
    comm = WebsocketCommunicator(
        application, "/ws/agent", headers=[(b"authorization", f"Bearer {token}".encode())]
    )
    inbox = comm._input_queue = FedInbox()
    connected, _ = await comm.connect()
    assert connected
    return comm, inbox


@pytest.fixture
def enrolled(db):
    return services.host_register(hostname="web-01")


@pytest.fixture
def dispatched(monkeypatch) -> list[str]:
    """The frames the agent consumer handled the usual way (through its task)."""
    seen: list[str] = []
    original = consumers.AgentConsumer.receive

    async def receive(self, text_data=None, bytes_data=None):
        seen.append(text_data or "")
        await original(self, text_data, bytes_data)

    monkeypatch.setattr(consumers.AgentConsumer, "receive", receive)
    return seen


@pytest.fixture
def queries(monkeypatch) -> list[str]:
    """Every SQL statement any thread runs."""
    statements: list[str] = []
    execute, executemany = db_utils.CursorWrapper._execute, db_utils.CursorWrapper._executemany

    def counted(self, sql, *args, **kwargs):
        statements.append(sql)
        return execute(self, sql, *args, **kwargs)

    def counted_many(self, sql, *args, **kwargs):
        statements.append(sql)
        return executemany(self, sql, *args, **kwargs)

    monkeypatch.setattr(db_utils.CursorWrapper, "_execute", counted)
    monkeypatch.setattr(db_utils.CursorWrapper, "_executemany", counted_many)
    return statements


async def report(agent: WebsocketCommunicator, message: dict[str, Any] | None = None) -> None:
    """Send one report (or ``message``), and let the server take it before the next, as
    frames that arrive apart are."""
    await agent.send_json_to(message or {"type": "metrics", "data": {"metrics": METRICS}})
    await asyncio.sleep(0.005)


async def ready(agent: WebsocketCommunicator) -> None:
    """Say hello, and wait until the consumer is done with it (it hands over work)."""
    await hello(agent)
    await asyncio.sleep(0.2)


async def settled(agent: WebsocketCommunicator) -> None:
    """Past the first reports' one-off work (loading the alert rules, first checks)."""
    for _ in range(3):
        await report(agent)
    await asyncio.sleep(0.3)


async def test_metrics_and_heartbeats_are_taken_as_they_arrive(
    enrolled, make_user, token_for, dispatched
):
    host, token = enrolled
    client = await client_socket(make_user, token_for)
    await subscribe(client, "host_metrics", {"host_id": str(host.id)})
    agent, inbox = await agent_through_inbox(token)
    assert inbox.at_once is not None
    await ready(agent)
    assert len(dispatched) == 1  # hello goes the usual way

    for _ in range(5):
        await report(agent)
        await report(agent, {"type": "heartbeat", "data": {}})
    for _ in range(5):
        event = await next_event(client, "host_metrics")
        assert event["data"]["metrics"] == METRICS
    assert len(dispatched) == 1

    # A report the checks refuse is answered at once too, with its id.
    await report(agent, {"type": "metrics", "data": {"metrics": {"cpu_usage": 150}}, "id": 7})
    error = await next_of(agent, "error")
    assert (error["data"]["code"], error["id"]) == ("INVALID_MESSAGE", 7)
    assert len(dispatched) == 1
    await agent.disconnect()
    assert inbox.at_once is None  # the consumer lets go of it
    await client.disconnect()


async def test_other_messages_go_the_usual_way_with_one_token_of_the_rate(
    enrolled, dispatched, settings, monkeypatch
):
    settings.AGENT_RATE_LIMIT_PER_SECOND = 1
    _, token = enrolled
    agent, _ = await agent_through_inbox(token)
    await ready(agent)
    tokens_left: list[float] = []
    original = consumers.AgentConsumer.on_package_progress

    async def on_package_progress(self, data, id_):
        tokens_left.append(self.bucket.tokens)
        await original(self, data, id_)

    monkeypatch.setitem(consumers.AgentConsumer.HANDLERS, "package_progress", on_package_progress)
    await agent.send_json_to(
        {"type": "package_progress", "data": {"operation_id": "nope", "progress": 1}}
    )
    await next_of(agent, "error")  # no such operation
    assert [text for text in dispatched if "package_progress" in text]
    burst = settings.AGENT_RATE_LIMIT_BURST
    # hello took one token and the progress message one, not two (at one a second, less
    # than one came back meanwhile)
    assert burst - 2 <= tokens_left[0] < burst - 1
    await agent.disconnect()


async def test_reports_over_the_rate_are_refused(enrolled, settings, dispatched):
    settings.AGENT_RATE_LIMIT_PER_SECOND = 1
    settings.AGENT_RATE_LIMIT_BURST = 3
    _, token = enrolled
    agent, _ = await agent_through_inbox(token)
    await ready(agent)  # one token
    for n in range(3):
        await report(agent, {"type": "metrics", "data": {"metrics": METRICS}, "id": n})
    refused = await next_of(agent, "error")
    assert refused["data"]["code"] == "RATE_LIMITED"
    assert refused["id"] == 2
    await agent.disconnect()


async def test_metrics_reports_query_nothing(enrolled, make_user, token_for, queries):
    host, token = enrolled
    client = await client_socket(make_user, token_for)
    await subscribe(client, "host_metrics", {"host_id": str(host.id)})
    agent, _ = await agent_through_inbox(token)
    await ready(agent)
    await settled(agent)
    for _ in range(3):
        await next_event(client, "host_metrics")
    queries.clear()

    for _ in range(50):
        await report(agent)
    for _ in range(50):
        await next_event(client, "host_metrics")
    await asyncio.sleep(0.2)
    assert queries == []
    await agent.disconnect()
    await client.disconnect()


async def test_metrics_reports_query_nothing_the_usual_way_either(
    enrolled, make_user, token_for, queries
):
    """Through the test communicator's queue (no inbox): the handler itself queries nothing."""
    from tests.test_agent_consumer import agent_socket

    host, token = enrolled
    client = await client_socket(make_user, token_for)
    await subscribe(client, "host_metrics", {"host_id": str(host.id)})
    agent = await agent_socket(token)
    await ready(agent)
    await settled(agent)
    for _ in range(3):
        await next_event(client, "host_metrics")
    queries.clear()
    for _ in range(20):
        await agent.send_json_to({"type": "metrics", "data": {"metrics": METRICS}})
    for _ in range(20):
        await next_event(client, "host_metrics")
    assert queries == []
    await agent.disconnect()
    await client.disconnect()


async def test_a_report_is_not_copied_deeply(enrolled, make_user, token_for, monkeypatch):
    host, token = enrolled
    client = await client_socket(make_user, token_for)
    await subscribe(client, "host_metrics", {"host_id": str(host.id)})
    agent, _ = await agent_through_inbox(token)
    await ready(agent)
    await settled(agent)
    for _ in range(3):
        await next_event(client, "host_metrics")
    copies: list[str] = []
    deepcopy, asdict = copy.deepcopy, dataclasses.asdict

    def counted_deepcopy(*args: Any, **kwargs: Any) -> Any:
        copies.append("deepcopy")
        return deepcopy(*args, **kwargs)

    def counted_asdict(*args: Any, **kwargs: Any) -> Any:
        copies.append("asdict")
        return asdict(*args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", counted_deepcopy)
    monkeypatch.setattr(dataclasses, "asdict", counted_asdict)
    for _ in range(10):
        await report(agent)
    for _ in range(10):
        await next_event(client, "host_metrics")
    assert copies == []
    await agent.disconnect()
    await client.disconnect()


async def test_a_report_is_fanned_out_within_its_frame_arrival(enrolled):
    """Taken at once and, with the publisher idle, numbered and fanned out at once: no
    task step between the frame and the hub (``Node.enqueue_publish``)."""
    _, token = enrolled
    agent, inbox = await agent_through_inbox(token)
    await ready(agent)
    await settled(agent)
    node = Node.current()
    assert node is not None
    before = node.hub.stats["events"]
    counted = metrics._published["host_metrics"]
    frame = json.dumps({"type": "metrics", "data": {"metrics": METRICS}})
    inbox.put_nowait({"type": "websocket.receive", "text": frame})  # no await after it
    assert node.hub.stats["events"] == before + 1
    assert metrics._published["host_metrics"] == counted + 1  # and counted (GET /metrics)
    await agent.disconnect()


# -- the inbox's side ----------------------------------------------------------------------


async def test_the_inbox_offers_only_what_would_be_next_to_a_waiting_reader():
    offered: list[int] = []

    def at_once(item: dict[str, Any]) -> bool:
        offered.append(item["n"])
        return item["n"] % 2 == 0  # takes even numbers

    inbox = Inbox()
    inbox.at_once = at_once
    inbox.put_nowait({"n": 1})  # nobody waits: queued, not offered
    assert offered == []
    assert await inbox.get() == {"n": 1}
    waiting = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait({"n": 2})  # taken
    inbox.put_nowait({"n": 3})  # offered, refused: queued, the reader is woken
    inbox.put_nowait({"n": 4})  # behind 3: queued, not offered
    assert offered == [2, 3]
    assert await asyncio.wait_for(waiting, 1) == {"n": 3}
    assert await inbox.get() == {"n": 4}


async def test_an_inbox_drops_a_message_whose_taker_failed(caplog):
    def at_once(item: dict[str, Any]) -> bool:
        raise RuntimeError("boom")

    inbox = Inbox()
    inbox.at_once = at_once
    waiting = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="sysmanage.serve"):
        inbox.put_nowait({"n": 1})
    assert "failed to take a message" in caplog.text
    assert not waiting.done()  # nothing queued: the message is gone, not handled twice
    waiting.cancel()
