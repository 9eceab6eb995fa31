"""Channel streams: offsets, epochs and bounded history, in memory and in Redis; and the
hub's resume, which joins a replay to the live events without a gap or a duplicate."""

from __future__ import annotations

import asyncio
import json
import secrets

import pytest
import redis
from django.conf import settings as django_settings

from sysmanage.hub import Hub
from sysmanage.protocol import StreamPosition
from sysmanage.streams import MemoryStreams, RedisStreams, stream_keys
from sysmanage.transport import Frame, FrameRun

REDIS_URL = "redis://127.0.0.1:6379/0"


def small_history(settings, size=5, seconds=600.0):
    settings.STREAM_HISTORY = {
        "default": {"size": size, "seconds": seconds},
        "host_metrics": {"size": 2, "seconds": seconds},
    }


def event(n, host="h1"):
    return {"n": n, "host_id": host}


# -- memory ----------------------------------------------------------------------------


async def test_memory_offsets_count_per_channel_from_one(settings):
    small_history(settings)
    streams = MemoryStreams()
    assert streams.head("host_status").offset == 0
    offsets = [streams.append("host_status", "e", event(i), "t").position.offset for i in range(3)]
    assert offsets == [1, 2, 3]
    assert streams.append("system_alerts", "e", event(0), "t").position.offset == 1
    assert streams.head("host_status") == StreamPosition(streams.head("x").epoch, 3)


async def test_memory_read_after_returns_exactly_the_missed_events(settings):
    small_history(settings)
    streams = MemoryStreams()
    for i in range(1, 5):
        streams.append("host_status", "e", event(i), "t")
    epoch = streams.head("host_status").epoch
    history = await streams.read_after("host_status", StreamPosition(epoch, 2))
    assert history.complete
    assert [e.position.offset for e in history.entries] == [3, 4]
    assert [e.data["n"] for e in history.entries] == [3, 4]
    assert history.head == StreamPosition(epoch, 4)
    nothing = await streams.read_after("host_status", StreamPosition(epoch, 4))
    assert nothing.complete
    assert nothing.entries == []


async def test_memory_refuses_a_gap_longer_than_the_history(settings):
    small_history(settings, size=5)
    streams = MemoryStreams()
    for i in range(1, 11):
        streams.append("host_status", "e", event(i), "t")
    epoch = streams.head("host_status").epoch
    # offsets 6..10 are kept: resuming after 5 is complete, after 4 is not
    assert (await streams.read_after("host_status", StreamPosition(epoch, 5))).complete
    short = await streams.read_after("host_status", StreamPosition(epoch, 4))
    assert not short.complete
    assert short.entries == []
    assert short.head.offset == 10


async def test_memory_drops_events_older_than_the_age_bound(settings, monkeypatch):
    small_history(settings, size=100, seconds=10)
    clock = [1000.0]
    monkeypatch.setattr("sysmanage.streams.time.monotonic", lambda: clock[0])
    streams = MemoryStreams()
    streams.append("host_status", "e", event(1), "t")
    clock[0] += 11
    streams.append("host_status", "e", event(2), "t")
    epoch = streams.head("host_status").epoch
    assert not (await streams.read_after("host_status", StreamPosition(epoch, 0))).complete
    assert (await streams.read_after("host_status", StreamPosition(epoch, 1))).complete


async def test_memory_refuses_another_epoch_and_a_position_from_the_future(settings):
    small_history(settings)
    streams = MemoryStreams()
    streams.append("host_status", "e", event(1), "t")
    epoch = streams.head("host_status").epoch
    assert not (await streams.read_after("host_status", StreamPosition("other", 0))).complete
    assert not (await streams.read_after("host_status", StreamPosition(epoch, 2))).complete
    # a new process (restart) is a new epoch: the old positions mean nothing there
    assert MemoryStreams().head("host_status").epoch != epoch


async def test_metrics_keep_their_own_smaller_history(settings):
    small_history(settings, size=5)
    streams = MemoryStreams()
    for i in range(1, 5):
        streams.append("host_metrics", "e", event(i), "t")
    epoch = streams.head("host_metrics").epoch
    assert (await streams.read_after("host_metrics", StreamPosition(epoch, 2))).complete
    assert not (await streams.read_after("host_metrics", StreamPosition(epoch, 1))).complete


# -- Redis -----------------------------------------------------------------------------


@pytest.fixture
def redis_streams(settings):
    """Streams in the local Redis under a prefix of their own, deleted afterwards."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    settings.STREAM_KEY_PREFIX = f"test-{secrets.token_hex(4)}:stream"
    small_history(settings, size=5)
    yield client
    keys = list(client.scan_iter(f"{settings.STREAM_KEY_PREFIX}*"))
    if keys:
        client.delete(*keys)
    client.close()


async def test_redis_numbers_events_and_replays_them_in_order(redis_streams):
    streams = RedisStreams(REDIS_URL)
    try:
        start = (await streams.heads(["host_status"]))["host_status"]
        assert start.offset == 0
        await streams.publish([("host_status", "e", event(i), f"t{i}") for i in range(1, 5)])
        history = await streams.read_after("host_status", StreamPosition(start.epoch, 1))
        assert history.complete
        assert [(e.position.offset, e.data["n"], e.timestamp) for e in history.entries] == [
            (2, 2, "t2"),
            (3, 3, "t3"),
            (4, 4, "t4"),
        ]
        assert {e.position.epoch for e in history.entries} == {start.epoch}
        batches = await streams.read_new({"host_status": StreamPosition(start.epoch, 2)}, 10)
        assert [(c, [e.position.offset for e in es]) for c, es in batches] == [
            ("host_status", [3, 4])
        ]
    finally:
        await streams.close()


async def test_redis_history_is_bounded_and_never_partly_replayed(redis_streams):
    streams = RedisStreams(REDIS_URL)
    try:
        epoch = (await streams.heads(["host_status"]))["host_status"].epoch
        await streams.publish([("host_status", "e", event(i), "t") for i in range(1, 401)])
        stream_key, _ = stream_keys("host_status")
        kept = redis_streams.xlen(stream_key)
        assert 5 <= kept < 400  # MAXLEN ~ trims in whole nodes: at least the bound
        assert not (await streams.read_after("host_status", StreamPosition(epoch, 0))).complete
        recent = await streams.read_after("host_status", StreamPosition(epoch, 395))
        assert recent.complete
        assert [e.position.offset for e in recent.entries] == list(range(396, 401))
    finally:
        await streams.close()


async def test_redis_drops_events_older_than_the_age_bound(redis_streams, settings):
    small_history(settings, size=100, seconds=0.2)
    streams = RedisStreams(REDIS_URL)
    try:
        epoch = (await streams.heads(["host_status"]))["host_status"].epoch
        await streams.publish([("host_status", "e", event(1), "t")])
        await asyncio.sleep(0.3)
        await streams.publish([("host_status", "e", event(2), "t")])
        assert not (await streams.read_after("host_status", StreamPosition(epoch, 0))).complete
        assert (await streams.read_after("host_status", StreamPosition(epoch, 1))).complete
    finally:
        await streams.close()


async def test_a_redis_that_lost_its_data_starts_a_new_epoch(redis_streams):
    streams = RedisStreams(REDIS_URL)
    try:
        before = (await streams.heads(["host_status"]))["host_status"]
        await streams.publish([("host_status", "e", event(i), "t") for i in range(3)])
        redis_streams.delete(*stream_keys("host_status"))  # what a Redis restarted empty is
        await streams.publish([("host_status", "e", event(9), "t")])
        after = (await streams.heads(["host_status"]))["host_status"]
        assert after.epoch != before.epoch
        assert after.offset == 1
        stale = await streams.read_after("host_status", StreamPosition(before.epoch, 3))
        assert not stale.complete
        assert stale.entries == []
    finally:
        await streams.close()


def test_the_stream_keys_share_one_hash_tag(settings):
    settings.STREAM_KEY_PREFIX = "p:stream"
    events, meta = stream_keys("host_status")
    assert events == "p:stream:{host_status}:events"
    assert meta == "p:stream:{host_status}:meta"
    assert django_settings.STREAM_KEY_PREFIX == "p:stream"


# -- the hub's resume --------------------------------------------------------------------


class Recorder:
    user_id = "u"
    session_tag = None
    rights: frozenset[str] = frozenset()

    def __init__(self):
        self.messages = []

    def deliver(self, frame):
        # a read's events come joined (the hub's gathering), as a socket writes them
        for part in frame.parts if isinstance(frame, FrameRun) else [frame]:
            self.messages.append(json.loads(part.text))

    def close_from_hub(self, code, error):
        pass

    def offsets(self):
        return [m["offset"] for m in self.messages]


class SlowHistory:
    """A history whose read waits until released, while live events keep arriving."""

    def __init__(self, streams):
        self.streams = streams
        self.reading = asyncio.Event()
        self.go = asyncio.Event()

    async def read_after(self, channel, since):
        history = await self.streams.read_after(channel, since)
        self.reading.set()
        await self.go.wait()
        return history


async def test_a_resume_joins_replay_and_live_events_without_gap_or_duplicate(settings):
    small_history(settings, size=100)
    streams = MemoryStreams()
    hub = Hub()
    hub.history = slow = SlowHistory(streams)

    def publish(n, host="h1"):
        hub.dispatch_entry(streams.append("host_status", "e", event(n, host), "t"))

    for n in range(1, 6):
        publish(n, host="h1" if n % 2 else "h2")
    conn = Recorder()
    epoch = streams.head("host_status").epoch
    resuming = asyncio.ensure_future(
        hub.resume(conn, "host_status", {"host_id": "h1"}, StreamPosition(epoch, 1))
    )
    await slow.reading.wait()
    publish(6, host="h1")  # after the history was read: held, then sent
    publish(7, host="h1")
    assert conn.messages == []
    slow.go.set()
    recovered, head, missed = await resuming
    assert recovered
    assert head == StreamPosition(epoch, 5)
    hub.replay(conn, "host_status", {"host_id": "h1"}, missed)
    hub.release(conn, "host_status", head)
    publish(8, host="h1")
    publish(9, host="h2")
    # h1's events after offset 1, each once, in order: the replay (3, 5), then live
    assert conn.offsets() == [3, 5, 6, 7, 8]
    assert {m["epoch"] for m in conn.messages} == {epoch}
    assert all(m["data"]["host_id"] == "h1" for m in conn.messages)


async def test_events_the_replay_covered_are_skipped_when_they_arrive_late(settings):
    """With Redis, a process may read its streams behind the history a client resumes
    from: what the replay already sent must not come again."""
    small_history(settings, size=100)
    streams = MemoryStreams()
    hub = Hub()
    hub.history = streams
    entries = [streams.append("host_status", "e", event(n), "t") for n in range(1, 5)]
    hub.dispatch_entry(entries[0])  # this process has dispatched offset 1 only
    conn = Recorder()
    epoch = streams.head("host_status").epoch
    recovered, head, missed = await hub.resume(conn, "host_status", {}, StreamPosition(epoch, 1))
    assert recovered
    assert head.offset == 4
    hub.replay(conn, "host_status", {}, missed)
    hub.release(conn, "host_status", head)
    for entry in entries[1:]:
        hub.dispatch_entry(entry)  # the late arrivals of 2..4
    hub.dispatch_entry(streams.append("host_status", "e", event(5), "t"))
    assert conn.offsets() == [2, 3, 4, 5]


async def test_a_subscription_without_a_usable_history_is_not_recovered(settings):
    small_history(settings)
    streams = MemoryStreams()
    hub = Hub()
    hub.history = streams
    hub.heads["host_status"] = streams.head("host_status")
    conn = Recorder()
    recovered, head, missed = await hub.resume(conn, "host_status", {}, StreamPosition("gone", 7))
    assert not recovered
    assert missed == []
    hub.release(conn, "host_status", head)
    hub.dispatch_entry(streams.append("host_status", "e", event(1), "t"))
    assert conn.offsets() == [1]


class Writes:
    """A connection that records each write (a frame, or a run of frames joined)."""

    session_tag = None

    def __init__(self, user_id="u", rights=frozenset()):
        self.user_id = user_id
        self.rights = rights
        self.writes = []

    def deliver(self, frame):
        self.writes.append(list(frame.parts) if isinstance(frame, FrameRun) else [frame])

    def close_from_hub(self, code, error):
        pass

    def frames(self):
        """The event frames written, without the subscribe response."""
        return [frame for write in self.writes for frame in write if frame.text != "response"]


def metrics_report(n, host):
    return {"host_id": host, "metrics": {"cpu_usage": n, "memory_usage": 100 - n}}


async def replayed_to(hub, conn, channel, filters, since):
    recovered, head, missed = await hub.resume(conn, channel, filters, since)
    assert recovered
    hub.replay(conn, channel, filters, missed, first=Frame("response"))
    hub.release(conn, channel, head)
    assert conn.writes[0][0].text == "response"  # in the same write as the events
    return conn


async def test_resumes_from_overlapping_positions_share_frames_as_each_gets_them_alone(settings):
    """A storm of clients resuming: each event is framed once per payload shape, and the
    frames are the bytes each client would get alone, in one write per resume."""
    small_history(settings, size=100)
    settings.STREAM_HISTORY["host_metrics"] = {"size": 100, "seconds": 600.0}
    streams = MemoryStreams()
    hub = Hub()
    hub.history = streams
    for n in range(1, 9):
        streams.append("host_metrics", "metrics", metrics_report(n, "h1" if n % 2 else "h2"), "t")
    epoch = streams.head("host_metrics").epoch
    cpu = {"host_id": "h1", "metrics": ("cpu",)}
    early = await replayed_to(
        hub, Writes(), "host_metrics", {"host_id": "h1"}, StreamPosition(epoch, 1)
    )
    late = await replayed_to(
        hub, Writes(), "host_metrics", {"host_id": "h1"}, StreamPosition(epoch, 4)
    )
    shaped = await replayed_to(hub, Writes(), "host_metrics", cpu, StreamPosition(epoch, 1))

    assert [len(c.writes) for c in (early, late, shaped)] == [1, 1, 1]
    assert [json.loads(f.text)["offset"] for f in early.frames()] == [3, 5, 7]
    assert late.frames() == early.frames()[1:]  # the same frames, not copies
    assert all(a is b for a, b in zip(late.frames(), early.frames()[1:], strict=True))
    assert not set(map(id, shaped.frames())) & set(map(id, early.frames()))
    assert [json.loads(f.text)["data"]["metrics"] for f in shaped.frames()] == [
        {"cpu_usage": 3},
        {"cpu_usage": 5},
        {"cpu_usage": 7},
    ]
    # what each gets is what a process that served no one else would send it
    for conn, filters, since in ((late, {"host_id": "h1"}, 4), (shaped, cpu, 1)):
        alone = MemoryStreams()
        alone._epoch = epoch  # the same positions
        for n in range(1, 9):
            alone.append("host_metrics", "metrics", metrics_report(n, "h1" if n % 2 else "h2"), "t")
        lone_hub = Hub()
        lone_hub.history = alone
        history = await alone.read_after("host_metrics", StreamPosition(epoch, since))
        by_itself = Writes()
        lone_hub.replay(by_itself, "host_metrics", filters, history.entries)
        assert [f.text for f in conn.frames()] == [f.text for f in by_itself.frames()]


async def test_replayed_frames_are_shared_only_within_an_audience(settings):
    """Command output is framed per audience: a viewer who may not see it never gets the
    frame made for one who may."""
    small_history(settings, size=100)
    streams = MemoryStreams()
    hub = Hub()
    hub.history = streams
    data = {
        "host_id": "h1",
        "command": "cat /etc/shadow",
        "stdout": "secret",
        "requested_by_id": "1",
    }
    streams.append("command_execution", "command_completed", data, "t")
    epoch = streams.head("command_execution").epoch
    since = StreamPosition(epoch, 0)
    requester = await replayed_to(hub, Writes(user_id="1"), "command_execution", {}, since)
    other = await replayed_to(hub, Writes(user_id="2"), "command_execution", {}, since)
    again = await replayed_to(hub, Writes(user_id="3"), "command_execution", {}, since)
    [shown], [hidden], [hidden_again] = requester.frames(), other.frames(), again.frames()
    assert json.loads(shown.text)["data"]["stdout"] == "secret"
    assert json.loads(hidden.text)["data"]["stdout"] is None
    assert json.loads(hidden.text)["data"]["redacted"] is True
    assert hidden_again is hidden


# -- a process's copy of the recent events (Redis deployments) ----------------------------


def entry_at(channel, epoch, offset):
    from sysmanage.streams import Entry

    return Entry(channel, StreamPosition(epoch, offset), "e", event(offset), "t")


def test_the_recent_copy_serves_a_resume_only_when_it_holds_the_whole_gap(settings):
    from sysmanage.streams import Recent

    small_history(settings, size=5)
    recent = Recent()
    for offset in range(3, 11):  # the copy starts at 3 (warmed late); 6..10 stay kept
        recent.add(entry_at("host_status", "E", offset))
    head = StreamPosition("E", 10)
    found = recent.after("host_status", StreamPosition("E", 7), head)
    assert found is not None
    assert [e.position.offset for e in found.entries] == [8, 9, 10]
    assert found.complete
    assert recent.after("host_status", StreamPosition("E", 4), head) is None  # trimmed
    assert recent.after("host_status", StreamPosition("X", 9), head) is None  # other epoch
    assert recent.after("host_status", StreamPosition("E", 11), head) is None  # future
    # a process whose copy is behind its head (or ahead) asks Redis instead
    assert recent.after("host_status", StreamPosition("E", 7), StreamPosition("E", 11)) is None


def test_the_recent_copy_restarts_at_a_gap_or_a_new_epoch(settings):
    from sysmanage.streams import Recent

    small_history(settings, size=100)
    recent = Recent()
    for offset in (1, 2, 3, 7, 8):  # 4..6 never read: what is kept starts again at 7
        recent.add(entry_at("host_status", "E", offset))
    head = StreamPosition("E", 8)
    assert recent.after("host_status", StreamPosition("E", 2), head) is None
    assert [
        e.position.offset for e in recent.after("host_status", StreamPosition("E", 6), head).entries
    ] == [7, 8]
    recent.add(entry_at("host_status", "F", 1))
    assert recent.after("host_status", StreamPosition("E", 7), head) is None
    found = recent.after("host_status", StreamPosition("F", 0), StreamPosition("F", 1))
    assert [e.position.offset for e in found.entries] == [1]


async def test_a_redis_node_serves_resumes_from_its_copy_and_warms_it_at_start(
    redis_streams, settings
):
    from channels.layers import InMemoryChannelLayer

    from sysmanage.node import Node

    small_history(settings, size=50)
    publisher = RedisStreams(REDIS_URL)
    node = None
    try:
        start = (await publisher.heads(["host_status"]))["host_status"]
        await publisher.publish([("host_status", "e", event(i), "t") for i in range(1, 6)])
        node = Node(InMemoryChannelLayer(), asyncio.get_running_loop(), RedisStreams(REDIS_URL))
        await node.start()  # warms its copy with offsets 1..5
        await publisher.publish([("host_status", "e", event(i), "t") for i in range(6, 9)])
        for _ in range(100):
            if node.hub.heads["host_status"].offset == 8:
                break
            await asyncio.sleep(0.05)
        assert node.hub.heads["host_status"] == StreamPosition(start.epoch, 8)
        redis_streams.delete(stream_keys("host_status")[0])  # Redis can no longer answer
        history = await node.read_after("host_status", StreamPosition(start.epoch, 2))
        assert history.complete
        assert [e.position.offset for e in history.entries] == [3, 4, 5, 6, 7, 8]
        assert [e.data["n"] for e in history.entries] == [3, 4, 5, 6, 7, 8]
    finally:
        if node is not None:
            await node.close()
        await publisher.close()


# -- routing without decoding (Redis deployments) -------------------------------------------


def metrics_event(n, host):
    return ("host_metrics", "host_metrics_reported", {"host_id": host, "n": n}, "t")


async def test_events_that_no_local_subscriber_wants_are_never_decoded(redis_streams, settings):
    """A process receives every event of the cluster; it decodes only those one of its own
    subscriptions may match (by channel and host, stored beside the payload)."""
    from channels.layers import InMemoryChannelLayer

    from sysmanage import streams as streams_module
    from sysmanage.node import Node

    small_history(settings, size=50)
    publisher = RedisStreams(REDIS_URL)
    node = None
    try:
        node = Node(InMemoryChannelLayer(), asyncio.get_running_loop(), RedisStreams(REDIS_URL))
        await node.start()
        watcher = Recorder()
        node.hub.subscribe(watcher, "host_metrics", {"host_id": "h1"})
        decoded = streams_module.DECODED["payloads"]
        await publisher.publish([metrics_event(n, "h1" if n % 4 == 0 else "h2") for n in range(12)])
        await publisher.publish([("host_status", "host_status_changed", event(1, "h3"), "t")])
        for _ in range(100):
            if node.hub.heads["host_metrics"].offset == 12 and node.hub.heads["host_status"].offset:
                break
            await asyncio.sleep(0.05)
        assert node.hub.heads["host_metrics"].offset == 12
        assert node.hub.heads["host_status"].offset == 1
        assert [m["data"]["n"] for m in watcher.messages] == [0, 4, 8]
        # the three events of h1, and nothing else
        assert streams_module.DECODED["payloads"] - decoded == 3
        assert node.hub.stats["events"] == 13
        # what was not decoded is kept as it was stored, and decoded when a resume needs it
        epoch = node.hub.heads["host_metrics"].epoch
        history = await node.read_after("host_metrics", StreamPosition(epoch, 8))
        assert [(e.data["n"], e.data["host_id"]) for e in history.entries] == [
            (8, "h1"),
            (9, "h2"),
            (10, "h2"),
            (11, "h2"),
        ]
        # a subscription to every host wants them all
        everyone = Recorder()
        node.hub.subscribe(everyone, "host_status", {})
        await publisher.publish([("host_status", "host_status_changed", event(2, "h4"), "t")])
        for _ in range(100):
            if everyone.messages:
                break
            await asyncio.sleep(0.05)
        assert [m["data"]["host_id"] for m in everyone.messages] == ["h4"]
    finally:
        if node is not None:
            await node.close()
        await publisher.close()


async def test_entries_stored_without_their_host_are_read_and_routed(redis_streams):
    """Entries written before they carried the host (fields e, t, p) still read; they
    are decoded to find their host."""
    from sysmanage.streams import encode_payload

    streams = RedisStreams(REDIS_URL)
    try:
        epoch = (await streams.heads(["host_status"]))["host_status"].epoch
        key, _ = stream_keys("host_status")
        payload = encode_payload("e", event(1, "h9"), "t")
        redis_streams.xadd(key, {"e": epoch, "t": "1", "p": payload}, id="1-0")
        batches = await streams.read_new({"host_status": StreamPosition(epoch, 0)}, 10)
        [(channel, [entry])] = batches
        assert channel == "host_status"
        assert entry.position == StreamPosition(epoch, 1)
        assert not entry.decoded
        assert entry.host == "h9"
        assert entry.data == event(1, "h9")
        hub = Hub()
        conn = Recorder()
        hub.subscribe(conn, "host_status", {"host_id": "h9"})
        assert hub.dispatch_entry(entry) == 1
    finally:
        await streams.close()


def test_an_entry_tells_when_it_was_published_without_decoding_its_payload():
    from sysmanage.streams import Entry, encode_payload

    stamp = "2026-12-05T10:00:00.250Z"
    data = {"host_id": "h1", "note": 'a "timestamp": "1999-01-01T00:00:00Z" in the data'}
    payload = encode_payload("metrics", data, stamp).encode()
    stored = Entry.stored("host_metrics", StreamPosition("e", 1), payload, "h1")
    assert stored.published_at() == 1796464800.25
    assert not stored.decoded  # read from the end of the payload only
    made = Entry("host_metrics", StreamPosition("e", 2), "metrics", data, stamp)
    assert made.published_at() == 1796464800.25
    broken = Entry.stored("host_metrics", StreamPosition("e", 3), b'{"event": "x"}', None)
    assert broken.published_at() is None


def test_each_read_observes_the_lag_of_its_oldest_event():
    import time

    from sysmanage import metrics
    from sysmanage.node import Node
    from sysmanage.protocol import iso_of_epoch
    from sysmanage.streams import Entry

    def entry(channel: str, age: float) -> Entry:
        return Entry(channel, StreamPosition("e", 1), "x", {}, iso_of_epoch(time.time() - age))

    def observed() -> tuple[float, float]:
        count = sum_ = 0.0
        for family in metrics.LAYER_LAG.collect():
            for s in family.samples:
                if s.name == "sysmanage_layer_receive_lag_seconds_count":
                    count = s.value
                elif s.name == "sysmanage_layer_receive_lag_seconds_sum":
                    sum_ = s.value
        return count, sum_

    count, total = observed()
    Node.note_lag(
        [
            ("host_metrics", [entry("host_metrics", 0.5)]),
            ("system_alerts", [entry("system_alerts", 3.0), entry("system_alerts", 0)]),
        ]
    )
    new_count, new_total = observed()
    assert new_count == count + 1  # once per read
    assert 2.9 < new_total - total < 3.5  # the oldest of the read
