"""The hub's fan-out and the per-connection outbound path."""

from __future__ import annotations

import asyncio
import functools
import json
import uuid

import pytest

from sysmanage.control import CloseSession, CloseUser
from sysmanage.hub import Hub
from sysmanage.node import Node
from sysmanage.transport import FALLBACK_QUEUE_FRAMES, Frame, Outbound

HOST = str(uuid.uuid4())


class Recorder:
    """A subscriber that records what the hub hands it."""

    def __init__(self, user_id="u"):
        self.user_id = user_id
        self.session_tag = None
        self.frames: list[Frame] = []
        self.closed: list[tuple[int, dict]] = []

    def deliver(self, frame):
        self.frames.append(frame)

    def close_from_hub(self, code, error):
        self.closed.append((code, error))


def dispatch(hub, message):
    """Hand ``hub`` one event as the node does with a layer message."""
    return hub.dispatch(message["channel"], message["data"], message["timestamp"])


def metrics_message():
    return {
        "type": "hub.event",
        "event": "host.metrics_reported",
        "channel": "host_metrics",
        "timestamp": "2024-01-01T12:00:00.000Z",
        "data": {
            "host_id": HOST,
            "hostname": "web-01",
            "timestamp": "t",
            "metrics": {"cpu_usage": 1.0, "memory_usage": 2.0},
        },
    }


async def test_dispatch_serializes_once_per_distinct_payload():
    hub = Hub()
    all_metrics = [Recorder() for _ in range(3)]
    cpu_only = [Recorder() for _ in range(2)]
    other_host = Recorder()
    for r in all_metrics:
        hub.subscribe(r, "host_metrics", {"host_id": HOST})
    for r in cpu_only:
        hub.subscribe(r, "host_metrics", {"host_id": HOST, "metrics": ("cpu",)})
    hub.subscribe(other_host, "host_metrics", {"host_id": str(uuid.uuid4())})

    assert dispatch(hub, metrics_message()) == 5
    assert hub.stats["frames"] == 2
    assert other_host.frames == []
    assert len({id(r.frames[0]) for r in all_metrics}) == 1  # one shared frame
    full = json.loads(all_metrics[0].frames[0].text)
    cpu = json.loads(cpu_only[0].frames[0].text)
    assert full["data"]["metrics"] == {"cpu_usage": 1.0, "memory_usage": 2.0}
    assert cpu["data"]["metrics"] == {"cpu_usage": 1.0}
    assert full["type"] == "event"
    assert full["timestamp"] == "2024-01-01T12:00:00.000Z"


async def test_unregister_drops_every_subscription():
    hub = Hub()
    conn = Recorder()
    hub.register(conn)
    hub.subscribe(conn, "host_metrics", {"host_id": HOST})
    hub.subscribe(conn, "fleet_status", {})
    hub.unregister(conn)
    assert hub.subscriber_count() == 0
    assert hub.by_user == {}
    assert dispatch(hub, metrics_message()) == 0


async def test_close_user_reaches_only_that_users_connections():
    node = Node(layer=None, loop=asyncio.get_running_loop())
    hub = node.hub
    target, other = Recorder("a"), Recorder("b")
    hub.register(target)
    hub.register(other)
    node.handle(CloseUser(user_id="a", reason="User account is disabled").to_message())
    assert [code for code, _ in target.closed] == [4001]
    assert target.closed[0][1]["data"]["code"] == "AUTH_FAILED"
    assert other.closed == []


async def test_fallback_queue_reports_a_client_that_stopped_reading():
    never = asyncio.Event()

    async def stuck_send(message):
        await never.wait()

    overflows = []
    outbound = Outbound(stuck_send, max_buffer_bytes=1024, on_overflow=lambda: overflows.append(1))
    assert not outbound.direct
    frame = Frame("{}")
    for _ in range(FALLBACK_QUEUE_FRAMES + 10):
        outbound.deliver(frame)
    await asyncio.sleep(0)
    assert overflows == [1]  # reported once, then frames are dropped silently
    outbound.stop()


class FakeTransport:
    def __init__(self):
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0


class FakeFactory:
    def __init__(self):
        self.prepared = 0

    def prepareMessage(self, payload, isBinary=False):  # noqa: N802, N803 - Autobahn's names
        self.prepared += 1
        return ("prepared", payload)


class FakeDaphneProtocol:
    """Stands in for Daphne's Autobahn protocol: the attributes Outbound reads."""

    STATE_OPEN = 1

    def __init__(self, factory):
        self.state = self.STATE_OPEN
        self.factory = factory
        self.transport = FakeTransport()
        self.sent = []

    def sendPreparedMessage(self, prepared):  # noqa: N802 - Autobahn's name
        self.sent.append(prepared)
        self.transport._tempDataLen += len(prepared[1])


async def fake_handle_reply(protocol, message):
    raise AssertionError("direct mode must not go through handle_reply")


async def test_direct_mode_frames_once_and_bounds_the_buffer():
    factory = FakeFactory()
    protocols = [FakeDaphneProtocol(factory) for _ in range(3)]
    overflows = []
    outbounds = [
        Outbound(
            functools.partial(fake_handle_reply, p),
            max_buffer_bytes=100,
            on_overflow=lambda: overflows.append(1),
        )
        for p in protocols
    ]
    assert all(o.direct for o in outbounds)
    frame = Frame('{"x": 1}')
    for outbound in outbounds:
        outbound.deliver(frame)
    assert factory.prepared == 1
    assert all(p.sent == [("prepared", b'{"x": 1}')] for p in protocols)

    protocols[0].transport.dataBuffer = b"x" * 200  # this client stopped reading
    for outbound in outbounds:
        outbound.deliver(frame)
    assert overflows == [1]
    assert len(protocols[0].sent) == 1
    assert len(protocols[1].sent) == 2
    assert outbounds[0].backlog_bytes() > 100


@pytest.mark.parametrize("state", [0, 2])
async def test_direct_mode_skips_sockets_that_are_not_open(state):
    protocol = FakeDaphneProtocol(FakeFactory())
    protocol.state = state
    outbound = Outbound(
        functools.partial(fake_handle_reply, protocol),
        max_buffer_bytes=100,
        on_overflow=lambda: None,
    )
    outbound.deliver(Frame("{}"))
    assert protocol.sent == []


async def test_close_session_reaches_only_that_sessions_sockets():
    node = Node(layer=None, loop=asyncio.get_running_loop())
    hub = node.hub
    mine, other = Recorder("a"), Recorder("a")
    mine.session_tag, other.session_tag = "s1", None
    hub.register(mine)
    hub.register(other)
    node.handle(CloseSession(session="s1", reason="Logged out").to_message())
    assert [code for code, _ in mine.closed] == [4001]
    assert other.closed == []
    hub.unregister(mine)
    assert hub.by_session == {}


async def test_repeated_fleet_figures_are_not_delivered_twice():
    hub = Hub()
    conn = Recorder()
    hub.subscribe(conn, "fleet_status", {})
    figures = {
        "total_hosts": 2,
        "online_hosts": 1,
        "offline_hosts": 1,
        "hosts_with_alerts": 0,
        "pending_operations": 0,
    }

    def fleet(last_updated, **changes):
        return {
            "type": "hub.event",
            "event": "fleet.status_updated",
            "channel": "fleet_status",
            "timestamp": last_updated,
            "data": {**figures, **changes, "last_updated": last_updated},
        }

    assert dispatch(hub, fleet("t1")) == 1
    assert dispatch(hub, fleet("t2")) == 0  # same figures from another process
    assert dispatch(hub, fleet("t3", online_hosts=2, offline_hosts=0)) == 1


async def test_resubscribing_moves_a_connection_between_host_buckets():
    hub = Hub()
    conn = Recorder()
    other_host = str(uuid.uuid4())
    hub.subscribe(conn, "host_metrics", {"host_id": other_host})
    hub.subscribe(conn, "host_metrics", {"host_id": HOST, "metrics": ("cpu",)})
    assert dispatch(hub, metrics_message()) == 1
    assert json.loads(conn.frames[0].text)["data"]["metrics"] == {"cpu_usage": 1.0}
    assert other_host not in hub._index["host_metrics"]
    hub.unsubscribe(conn, "host_metrics")
    assert hub._index["host_metrics"] == {}
    assert dispatch(hub, metrics_message()) == 0


async def test_host_filtered_alert_subscribers_skip_hostless_alerts():
    hub = Hub()
    everything, one_host, critical_only = Recorder(), Recorder(), Recorder()
    hub.subscribe(everything, "system_alerts", {})
    hub.subscribe(one_host, "system_alerts", {"host_id": HOST})
    hub.subscribe(critical_only, "system_alerts", {"severity": ("critical",)})
    alert = {
        "type": "hub.event",
        "event": "alert.changed",
        "channel": "system_alerts",
        "timestamp": "t",
        "data": {"alert_id": "a", "severity": "warning", "host_id": None, "title": "x"},
    }
    assert dispatch(hub, alert) == 1
    assert (len(everything.frames), len(one_host.frames), len(critical_only.frames)) == (1, 0, 0)
    alert["data"] = {**alert["data"], "host_id": HOST, "severity": "critical"}
    assert dispatch(hub, alert) == 3
