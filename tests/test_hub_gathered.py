"""One read from the streams, one write per socket: the hub gathers the frames of the
events it fans out inside :meth:`Hub.gathered`, frames each event once per bucket of
subscribers, and writes each bucket's frames joined (``FrameRun``)."""

from __future__ import annotations

import functools
import json
import uuid

from sysmanage import hub as hub_module
from sysmanage.hub import Hub
from sysmanage.transport import Frame, FrameRun, Outbound
from tests.test_hub_transport import FakeDaphneProtocol, FakeFactory, Recorder, fake_handle_reply

HOST_A, HOST_B = str(uuid.uuid4()), str(uuid.uuid4())


def event(hub: Hub, host: str, n: int) -> int:
    data = {"host_id": host, "hostname": "h", "timestamp": "t", "metrics": {"cpu_usage": n}}
    return hub.dispatch("host_metrics", data, "2024-01-01T12:00:00.000Z")


def texts(frame: Frame) -> list[dict]:
    parts = frame.parts if isinstance(frame, FrameRun) else [frame]
    return [json.loads(part.text) for part in parts]


async def test_a_read_is_one_write_per_socket_and_one_encoding_per_bucket(monkeypatch):
    """Three events of host A and two of host B in one read: each subscriber is written
    to once, with its host's events in order; each event is serialized once, however
    many subscribers its host has."""
    encoded = []
    real_dumps = hub_module.dumps
    monkeypatch.setattr(hub_module, "dumps", lambda m: encoded.append(1) or real_dumps(m))
    hub = Hub()
    on_a = [Recorder() for _ in range(4)]
    on_b = [Recorder() for _ in range(3)]
    for conn in on_a:
        hub.subscribe(conn, "host_metrics", {"host_id": HOST_A})
    for conn in on_b:
        hub.subscribe(conn, "host_metrics", {"host_id": HOST_B})

    with hub.gathered():
        delivered = [event(hub, HOST_A, 1), event(hub, HOST_B, 2), event(hub, HOST_A, 3)]
        delivered += [event(hub, HOST_B, 4), event(hub, HOST_A, 5)]
        assert all(conn.frames == [] for conn in on_a + on_b)  # nothing written yet

    assert delivered == [4, 3, 4, 3, 4]
    assert len(encoded) == 5  # once per event, not per subscriber
    assert all(len(conn.frames) == 1 for conn in on_a + on_b)
    assert len({id(conn.frames[0]) for conn in on_a}) == 1  # joined once per bucket
    assert [m["data"]["metrics"]["cpu_usage"] for m in texts(on_a[0].frames[0])] == [1, 3, 5]
    assert [m["data"]["metrics"]["cpu_usage"] for m in texts(on_b[0].frames[0])] == [2, 4]
    assert hub.stats["writes"] == 7
    assert hub.stats["deliveries"] == 18


async def test_a_delivery_that_cannot_be_gathered_writes_what_was_gathered_first():
    """A notice to every socket (events may have been missed) goes after the events
    read before it: the hub writes the gathered frames first."""
    hub = Hub()
    conn = Recorder()
    hub.register(conn)
    hub.subscribe(conn, "host_metrics", {"host_id": HOST_A})
    with hub.gathered():
        event(hub, HOST_A, 1)
        hub.notify_events_missed(0.0, 1.0)
        event(hub, HOST_A, 2)
    assert [texts(f)[0]["type"] for f in conn.frames] == ["event", "status", "event"]


async def test_a_channel_with_a_subscription_being_resumed_is_not_gathered():
    """Its live events are held for the resuming socket one by one, as before."""
    hub = Hub()
    steady, resuming = Recorder(), Recorder()
    hub.subscribe(steady, "host_metrics", {"host_id": HOST_A})
    hub.subscribe(resuming, "host_metrics", {"host_id": HOST_A})
    hub._resuming["host_metrics"][resuming] = hub_module._Resume()
    with hub.gathered():
        event(hub, HOST_A, 1)
        event(hub, HOST_A, 2)
    assert [texts(f)[0]["data"]["metrics"]["cpu_usage"] for f in steady.frames] == [1, 2]
    assert resuming.frames == []  # held until its replay is sent


async def test_outside_a_read_every_event_is_written_at_once():
    hub = Hub()
    conn = Recorder()
    hub.subscribe(conn, "host_metrics", {"host_id": HOST_A})
    event(hub, HOST_A, 1)
    event(hub, HOST_A, 2)
    assert len(conn.frames) == 2
    assert not any(isinstance(f, FrameRun) for f in conn.frames)


class JoiningFactory(FakeFactory):
    """Prepares messages as Autobahn does, with wire bytes."""

    def prepareMessage(self, payload, isBinary=False):  # noqa: N802, N803 - Autobahn's names
        self.prepared += 1
        return type("Prepared", (), {"payloadHybi": b"<" + payload + b">"})()


async def test_a_run_of_frames_is_one_write_of_their_wire_bytes():
    """Under Daphne the joined frames go out as one write; each frame is framed once."""
    factory = JoiningFactory()
    protocol = FakeDaphneProtocol(factory)
    protocol._perMessageCompress = None
    protocol.send_queue = []
    written = []
    protocol.sendPreparedMessage = written.append
    outbound = Outbound(
        functools.partial(fake_handle_reply, protocol),
        max_buffer_bytes=10_000,
        on_overflow=lambda: None,
    )
    run = FrameRun([Frame("a"), Frame("b")])
    outbound.deliver(run)
    outbound.deliver(run)
    assert [w.payloadHybi for w in written] == [b"<a><b>", b"<a><b>"]
    assert factory.prepared == 2


async def test_a_run_is_split_where_frames_cannot_be_joined():
    """The queue of other servers gets each frame alone."""
    sent = []

    async def send(message):
        sent.append(message)

    outbound = Outbound(send, max_buffer_bytes=10_000, on_overflow=lambda: None)
    outbound.deliver(FrameRun([Frame("a"), Frame("b")]))
    assert outbound._queue is not None
    assert [outbound._queue.get_nowait() for _ in range(2)] == ["a", "b"]
    outbound.stop()
