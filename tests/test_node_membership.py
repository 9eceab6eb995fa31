"""The node notices when the channel layer forgot its group membership, or was
unreachable, rejoins and tells the process's clients that events may have been missed."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import uuid

import pytest
import redis
from channels.layers import InMemoryChannelLayer
from channels_redis.core import RedisChannelLayer

from sysmanage.node import EVENTS_GROUP, Node, is_group_member

REDIS_URL = "redis://127.0.0.1:6379/0"


class Recorder:
    def __init__(self, user_id="u"):
        self.user_id = user_id
        self.session_tag = None
        self.frames = []

    def deliver(self, frame):
        self.frames.append(json.loads(frame.text))

    def close_from_hub(self, code, error):
        pass


async def joined_node(layer) -> Node:
    """A node in the events group of ``layer``, its loops not started."""
    node = Node(layer, asyncio.get_running_loop())
    node.channel_name = await layer.new_channel(prefix="hub")
    await layer.group_add(EVENTS_GROUP, node.channel_name)
    return node


async def test_a_member_only_renews_and_tells_nobody():
    layer = InMemoryChannelLayer()
    node = await joined_node(layer)
    client = Recorder()
    node.hub.register(client)
    assert await node.check_membership() is False
    assert client.frames == []
    assert node.rejoins == 0


async def test_a_lost_membership_is_found_rejoined_and_reported(caplog):
    layer = InMemoryChannelLayer()
    node = await joined_node(layer)
    clients = [Recorder("a"), Recorder("a"), Recorder("b")]
    for client in clients:
        node.hub.register(client)
    member_since = node.member_since
    await layer.flush()  # what a Redis restarted empty amounts to
    assert await is_group_member(layer, EVENTS_GROUP, node.channel_name) is False

    with caplog.at_level(logging.WARNING, logger="sysmanage.node"):
        assert await node.check_membership() is True
    assert await is_group_member(layer, EVENTS_GROUP, node.channel_name) is True
    await layer.group_send(EVENTS_GROUP, {"type": "hub.event"})
    assert (await layer.receive(node.channel_name))["type"] == "hub.event"

    for client in clients:
        (message,) = client.frames
        assert message["type"] == "status"
        assert message["channel"] == "system"
        assert message["data"]["event"] == "events_missed"
        assert message["data"]["since"] <= message["data"]["until"]
        assert message["data"]["until"].endswith("Z")
        assert message["data"]["message"]
    assert node.rejoins == 1
    assert node.member_since > member_since
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "membership was gone" in warnings[0].getMessage()
    assert "3 client connections told" in warnings[0].getMessage()
    # the next check finds the membership in place again
    assert await node.check_membership() is False
    assert all(len(c.frames) == 1 for c in clients)


class FlakyLayer(InMemoryChannelLayer):
    """An in-memory layer that can be made to fail as an unreachable Redis does."""

    down = False

    async def group_add(self, group, channel):
        if self.down:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6399. Connection refused.")
        await super().group_add(group, channel)


async def test_an_outage_is_logged_once_and_reported_when_the_layer_returns(caplog):
    layer = FlakyLayer()
    node = await joined_node(layer)
    client = Recorder()
    node.hub.register(client)
    layer.down = True
    with caplog.at_level(logging.WARNING, logger="sysmanage.node"):
        for _ in range(3):
            assert await node.check_membership() is False
        node.layer_failed("receiving", ConnectionError("Connection closed by server."))
        assert node.layer_down_since is not None
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, errors  # once per outage (and OUTAGE_LOG_INTERVAL)
        assert "channel layer unreachable" in errors[0].getMessage()
        assert client.frames == []

        # back, and (as with a Redis that kept its data) still a member: events sent
        # while it was down are lost all the same
        layer.down = False
        assert await node.check_membership() is True
    assert node.layer_down_since is None
    (message,) = client.frames
    assert message["data"]["event"] == "events_missed"
    assert "was unreachable" in caplog.records[-1].getMessage()


class OpaqueLayer:
    """A layer that keeps its groups to itself."""

    def __init__(self):
        self.added = []

    async def group_add(self, group, channel):
        self.added.append((group, channel))


async def test_other_layers_get_their_membership_renewed_only():
    layer = OpaqueLayer()
    node = Node(layer, asyncio.get_running_loop())
    node.channel_name = "hub.x"
    assert await is_group_member(layer, EVENTS_GROUP, "hub.x") is None
    assert await node.check_membership() is False
    assert layer.added == [(EVENTS_GROUP, "hub.x")]


async def test_redis_membership_is_read_from_the_groups_sorted_set_on_its_shard():
    layer = RedisChannelLayer(hosts=["redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0"], prefix="p")
    asked = []

    class Connection:
        def __init__(self, index):
            self.index = index

        async def zscore(self, key, member):
            asked.append((self.index, key, member))
            return 1.5 if member == "hub.in" else None

    layer.connection = Connection
    assert await is_group_member(layer, EVENTS_GROUP, "hub.in") is True
    assert await is_group_member(layer, EVENTS_GROUP, "hub.out") is False
    shard = layer.consistent_hash(EVENTS_GROUP)
    assert asked == [
        (shard, b"p:group:" + EVENTS_GROUP.encode(), "hub.in"),
        (shard, b"p:group:" + EVENTS_GROUP.encode(), "hub.out"),
    ]


@pytest.mark.django_db
def test_readiness_reports_an_unreachable_layer(client):
    assert client.get("/readyz").json()["status"] == "ready"
    node = Node(OpaqueLayer(), asyncio.new_event_loop())
    Node._current = node
    try:
        node.layer_failed("receiving", ConnectionError("Connection refused."))
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["status"] == "unavailable"
        assert response.json()["checks"]["database"] == "ok"
        assert response.json()["checks"]["channel_layer"].startswith("unreachable since ")
        node.layer_down_since = None
        assert client.get("/readyz").status_code == 200
    finally:
        Node._current = None
        node.loop.close()


async def test_a_message_received_just_before_redis_went_away_leaves_no_unretrieved_error():
    """channels-redis removes each message it hands over from a backup set in a task of
    its own; when Redis goes away meanwhile that task fails.  The node takes its error
    (the outage is reported by the node's own loops), so that asyncio does not log a
    traceback per message received ("Task exception was never retrieved")."""
    layer = RedisChannelLayer(hosts=[REDIS_URL], prefix=f"test-{uuid.uuid4().hex[:8]}")
    try:
        await layer.group_add("probe", "probe.channel")
    except Exception as exc:
        pytest.skip(f"Redis is not running on {REDIS_URL}: {exc}")
    clean = layer._clean_receive_backup

    async def clean_then_lose_the_reply(index, channel):
        await clean(index, channel)
        raise redis.exceptions.ConnectionError("Connection closed by server.")

    layer._clean_receive_backup = clean_then_lose_the_reply
    unretrieved = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context["message"]))
    node = await joined_node(layer)
    receiving = node.spawn(node._receive_loop())
    try:
        for _ in range(3):
            await layer.group_send(EVENTS_GROUP, {"type": "hub.nothing"})
        while node._inbox.qsize() < 3 or layer.receive_cleaners:
            await asyncio.sleep(0.01)
    finally:
        receiving.cancel()
        await layer.flush()
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert node._inbox.qsize() == 3
    assert unretrieved == []
