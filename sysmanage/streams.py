"""
Channel streams: every event's place on its channel, and the recent history to resume from.

Each channel is a stream.  Publishing an event gives it the next **offset** of its
channel (1, 2, 3…, cluster-wide) in the channel's current **epoch**, a random name for
one unbroken history; a client that saw offset N in epoch E and lost its socket
subscribes again with ``since`` and gets every event after N that it would have
received (:meth:`Streams.read_after`), or is told the history cannot cover the gap.

Two stores, one per deployment:

- :class:`MemoryStreams` (one process, the in-memory layer): a bounded deque per
  channel.  The epoch is new at every start, so a client never resumes across a restart
  of the process that held its history.
- :class:`RedisStreams` (several processes): a Redis stream per channel whose entry ids
  are the offsets, plus a hash holding the epoch and the last offset.  One Lua script
  numbers, stores and trims each event atomically, so offsets never repeat or go back;
  every process reads the streams (``XREAD``) and fans the events out in offset order.
  A Redis that restarts empty (or evicts a channel's hash) gets a new epoch on first use,
  so stale positions are recognised, never misread.

Every process reads every event of the cluster, so the reading is lean: a connection of
its own that parses ``XREAD`` replies by slicing bytes (:mod:`sysmanage.resp`), and
entries whose payload stays as stored until used (:class:`Entry`): each entry carries its
event's host beside the payload, enough for the hub to see that no local subscriber
wants it (most events, in a cluster whose processes serve different clients).

History is bounded by count and age per channel (``STREAM_HISTORY_*`` settings); a gap
that reaches past what is kept is reported as not recovered, never replayed in part.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings

from sysmanage import resp
from sysmanage.protocol import StreamPosition
from sysmanage.transport import Frame

#: How many entries one ``XREAD`` hands over at most.
READ_BATCH = 1000
#: Connections to Redis one process uses for publishing and for reading histories (its
#: blocking reader aside).  More callers at once wait for a free one, for at most
#: ``POOL_WAIT_SECONDS``: a burst of resuming clients queues instead of failing.
POOL_CONNECTIONS = 20
POOL_WAIT_SECONDS = 10.0


#: How many stored payloads this process has decoded (JSON) since it started: an event no
#: local subscriber wants is routed by its header and never decoded.
DECODED = {"payloads": 0}


class Entry:
    """One event as kept on its channel's stream.

    An entry read from Redis keeps its payload as the bytes stored there and decodes it
    on first use of ``event``, ``data`` or ``timestamp``: ``host`` (the ``host_id`` of
    its data, stored beside the payload) is enough to tell that no local subscriber
    wants it, and most events a process receives in a cluster are such events.

    The frames a resume replays are kept on the entry (:meth:`frame`): a storm of
    clients resuming from overlapping positions serializes each event once per payload
    shape, not once per client.
    """

    __slots__ = (
        "_data",
        "_event",
        "_frames",
        "_host",
        "_payload",
        "_timestamp",
        "channel",
        "position",
    )

    channel: str
    position: StreamPosition

    def __init__(
        self,
        channel: str,
        position: StreamPosition,
        event: str,
        data: dict[str, Any],
        timestamp: str,
    ) -> None:
        self.channel = channel
        self.position = position
        self._event, self._data, self._timestamp = event, data, timestamp
        self._payload: bytes | str | None = None
        self._host: object = _host_of(data)
        self._frames: dict[Hashable, Frame] | None = None

    @classmethod
    def stored(
        cls,
        channel: str,
        position: StreamPosition,
        payload: bytes | str,
        host: object = None,
    ) -> Entry:
        """An entry as read from its stream, its ``payload`` (:func:`encode_payload`) not
        decoded yet; ``host`` is :data:`UNROUTED` if the stream did not say it."""
        entry = cls.__new__(cls)
        entry.channel = channel
        entry.position = position
        entry._payload = payload
        entry._host = host
        entry._frames = None
        return entry

    def _decode(self) -> None:
        payload = json.loads(self._payload or "null")
        DECODED["payloads"] += 1
        self._event, self._data, self._timestamp = (
            payload["event"],
            payload["data"],
            payload["timestamp"],
        )
        self._payload = None

    @property
    def event(self) -> str:
        """The event's name."""
        if self._payload is not None:
            self._decode()
        return self._event

    @property
    def data(self) -> dict[str, Any]:
        """The event's payload."""
        if self._payload is not None:
            self._decode()
        return self._data

    @property
    def timestamp(self) -> str:
        """When the event happened (ISO 8601)."""
        if self._payload is not None:
            self._decode()
        return self._timestamp

    def published_at(self) -> float | None:
        """When the event was published (seconds since the epoch), read from the end of a
        stored payload without decoding the rest; None if it does not say."""
        payload = self._payload
        if payload is None:
            text = self._timestamp
        else:
            raw = payload if isinstance(payload, bytes) else payload.encode()
            at = raw.rfind(_TIMESTAMP_KEY)
            if at < 0:
                return None
            start = at + len(_TIMESTAMP_KEY)
            end = raw.find(b'"', start)
            text = raw[start:end].decode() if end > start else ""
        try:
            return datetime.fromisoformat(text).timestamp()
        except (TypeError, ValueError):
            return None

    def frame(self, shape: Hashable, make: Callable[[Entry], Frame]) -> Frame:
        """The event's frame for subscribers who get payload ``shape`` (a topic's
        variant and audience), made by ``make`` the first time it is asked for."""
        frames = self._frames
        if frames is None:
            frames = self._frames = {}
        found = frames.get(shape)
        if found is None:
            found = frames[shape] = make(self)
        return found

    @property
    def host(self) -> str | None:
        """The ``host_id`` of the event's data, if it has one (decoding only an entry
        stored without it)."""
        if self._host is UNROUTED:
            self._host = _host_of(self.data)
        return self._host  # type: ignore[return-value]

    @property
    def decoded(self) -> bool:
        """Whether the payload was decoded (or never needed to be)."""
        return self._payload is None

    def __repr__(self) -> str:
        return f"Entry({self.channel!r}, {self.position!r})"


#: How the timestamp is introduced in a stored payload (:func:`encode_payload`: last key).
_TIMESTAMP_KEY = b'"timestamp": "'

#: The ``host`` of a stored entry that did not say it (written before entries carried it).
UNROUTED = object()


def _host_of(data: Mapping[str, Any]) -> str | None:
    host = data.get("host_id")
    return host if isinstance(host, str) or host is None else str(host)


@dataclass(frozen=True, slots=True)
class History:
    """What a stream holds after a client's position (:meth:`Streams.read_after`)."""

    #: the channel's position now (its epoch and last offset)
    head: StreamPosition
    #: the events after the asked offset, oldest first (empty unless ``complete``)
    entries: list[Entry]
    #: whether ``entries`` are every event after the asked position
    complete: bool


@dataclass(frozen=True, slots=True)
class Bounds:
    """How much of one channel's history is kept."""

    size: int
    seconds: float


def bounds_for(channel: str) -> Bounds:
    """The history bounds of ``channel`` (settings ``STREAM_HISTORY`` and its overrides)."""
    default = settings.STREAM_HISTORY["default"]
    chosen = settings.STREAM_HISTORY.get(channel, default)
    return Bounds(size=int(chosen["size"]), seconds=float(chosen["seconds"]))


def new_epoch() -> str:
    """A fresh epoch name: short, random, URL-safe."""
    return secrets.token_urlsafe(6)


def _judge(since: int, head: StreamPosition, first: int | None, epoch: str) -> bool:
    """Whether a history whose oldest kept offset is ``first`` covers everything after
    ``since`` in ``epoch`` (``head`` is the stream's position now)."""
    if epoch != head.epoch or since > head.offset:
        return False
    return since == head.offset or (first is not None and first <= since + 1)


class Recent:
    """The recent events of each channel, kept in memory within the bounds, contiguous
    within one epoch: what a resume is served from without asking Redis."""

    def __init__(self) -> None:
        self._kept: dict[str, deque[tuple[float, Entry]]] = {}
        # every event passes here: the bounds are looked up once per channel (and again
        # if the setting is replaced, as tests do)
        self._bounds: dict[str, Bounds] = {}
        self._bounds_of: object = None

    def _bounds_for(self, channel: str) -> Bounds:
        if self._bounds_of is not settings.STREAM_HISTORY:
            self._bounds_of = settings.STREAM_HISTORY
            self._bounds = {}
        bounds = self._bounds.get(channel)
        if bounds is None:
            bounds = self._bounds[channel] = bounds_for(channel)
        return bounds

    def add(self, entry: Entry) -> None:
        """Keep ``entry``, the next event of its channel; older ones leave by the bounds.

        An entry that does not follow the last one kept (another epoch, or offsets
        missing) starts the channel's copy over, so that what is kept stays contiguous.
        """
        bounds = self._bounds_for(entry.channel)
        kept = self._kept.get(entry.channel)
        if kept is None:
            kept = self._kept[entry.channel] = deque(maxlen=max(bounds.size, 1))
        elif kept:
            last = kept[-1][1].position
            if last.epoch != entry.position.epoch or last.offset + 1 != entry.position.offset:
                kept.clear()
        now = time.monotonic()
        kept.append((now, entry))
        oldest = now - bounds.seconds
        while kept and kept[0][0] < oldest:
            kept.popleft()

    def forget(self, channel: str) -> None:
        """Drop what is kept of ``channel`` (its history was replaced)."""
        self._kept.pop(channel, None)

    def after(self, channel: str, since: StreamPosition, head: StreamPosition) -> History | None:
        """The events after ``since`` up to ``head`` if all are kept here, else None.

        ``head`` is the channel's position as far as the caller has taken events in; a
        ``since`` in another epoch or past ``head`` is no business of this copy (None).
        """
        kept = self._kept.get(channel)
        if since.epoch != head.epoch or since.offset > head.offset:
            return None
        if since.offset == head.offset:
            return History(head, [], True)
        if not kept:
            return None
        first, last = kept[0][1].position, kept[-1][1].position
        if first.epoch != head.epoch or last != head or first.offset > since.offset + 1:
            return None
        return History(
            head, [entry for _, entry in list(kept)[since.offset + 1 - first.offset :]], True
        )


class MemoryStreams:
    """The streams of a single process, kept in memory; offsets start at 1 per start."""

    def __init__(self) -> None:
        self._epoch = new_epoch()
        self._offsets: dict[str, int] = {}
        self._recent = Recent()

    def head(self, channel: str) -> StreamPosition:
        """The channel's position now: its epoch and last offset (0 before any event)."""
        return StreamPosition(self._epoch, self._offsets.get(channel, 0))

    def append(self, channel: str, event: str, data: dict[str, Any], timestamp: str) -> Entry:
        """Number ``event`` on its channel, keep it within the bounds, and return it."""
        offset = self._offsets.get(channel, 0) + 1
        self._offsets[channel] = offset
        entry = Entry(channel, StreamPosition(self._epoch, offset), event, data, timestamp)
        self._recent.add(entry)
        return entry

    async def read_after(self, channel: str, since: StreamPosition) -> History:
        """The events after ``since`` on ``channel``, if all of them are still kept.

        It never waits (a coroutine only to match :class:`RedisStreams`): nothing is
        published between the read and the caller's next step.
        """
        head = self.head(channel)
        found = self._recent.after(channel, since, head)
        return found if found is not None else History(head, [], False)


# -- Redis -----------------------------------------------------------------------------

#: Number, store and trim one event.  KEYS: stream, meta hash.  ARGV: a new epoch (used
#: if the hash has none), the payload, the size bound, the oldest time to keep (ms), now
#: (ms), the event's host ("" for none).  Returns {epoch, offset}.
#:
#: An entry's fields: ``e`` epoch, ``t`` time stored (ms; the trimming reads it as the
#: 4th item), ``h`` host (what a reader routes by without decoding), ``p`` payload.
PUBLISH_SCRIPT = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', KEYS[2], 'offset', 1)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], offset .. '-0',
  'e', epoch, 't', ARGV[5], 'h', ARGV[6], 'p', ARGV[2])
for _ = 1, 16 do
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if #first == 0 or tonumber(first[1][2][4]) >= tonumber(ARGV[4]) then break end
  redis.call('XDEL', KEYS[1], first[1][1])
end
return {epoch, offset}
"""

#: A channel's position, creating its epoch if it has none.  KEYS: stream, meta hash.
#: ARGV: a new epoch.  Returns {epoch, offset}.
HEAD_SCRIPT = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0)
  return {epoch, 0}
end
return {epoch, tonumber(redis.call('HGET', KEYS[2], 'offset'))}
"""

#: The position and the events after an offset, read at one instant.  KEYS: stream,
#: meta hash.  ARGV: a new epoch, the offset.  Returns {epoch, offset, first kept
#: offset or -1, entries after the offset}.
READ_SCRIPT = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0)
  return {epoch, 0, -1, {}}
end
local head = tonumber(redis.call('HGET', KEYS[2], 'offset'))
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local first_offset = -1
if #first > 0 then first_offset = tonumber(string.match(first[1][1], '^(%d+)')) end
local after = tonumber(ARGV[2])
local entries = {}
if after < head and first_offset ~= -1 and first_offset <= after + 1 then
  entries = redis.call('XRANGE', KEYS[1], (after + 1) .. '-0', '+')
end
return {epoch, head, first_offset, entries}
"""


def stream_keys(channel: str) -> tuple[str, str]:
    """The Redis keys of ``channel``'s stream and of its epoch-and-offset hash.

    Both share a hash tag, so the scripts may touch them together on a Redis Cluster.
    """
    base = f"{settings.STREAM_KEY_PREFIX}:{{{channel}}}"
    return f"{base}:events", f"{base}:meta"


def encode_payload(event: str, data: Mapping[str, Any], timestamp: str) -> str:
    """What a stream entry keeps of an event, besides its position."""
    return json.dumps({"event": event, "data": data, "timestamp": timestamp}, default=str)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decode_entry(channel: str, entry_id: bytes | str, fields: Any) -> Entry:
    """Rebuild an :class:`Entry` from a stream entry (``fields`` as a dict or a flat
    list); its payload is decoded when first used."""
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    fields = {_text(k): v for k, v in fields.items()}
    offset = int(_text(entry_id).split("-", 1)[0])
    host = fields.get("h", UNROUTED)
    if host is not UNROUTED:
        host = _text(host) or None
    return Entry.stored(channel, StreamPosition(_text(fields["e"]), offset), fields["p"], host)


def read_entries(channel: str, raw: list[resp.RawEntry]) -> list[Entry]:
    """The entries of one stream in an ``XREAD`` reply (:class:`sysmanage.resp.StreamsReply`),
    their payloads not decoded."""
    found = []
    epochs: dict[bytes, str] = {}
    for offset, fields in raw:
        epoch = b""
        host: object = UNROUTED
        payload = b""
        for i in range(0, len(fields), 2):
            name = fields[i]
            if name == b"p":
                payload = fields[i + 1]
            elif name == b"e":
                epoch = fields[i + 1]
            elif name == b"h":
                host = fields[i + 1].decode() or None
        name_of_epoch = epochs.get(epoch)
        if name_of_epoch is None:
            name_of_epoch = epochs[epoch] = epoch.decode()
        found.append(Entry.stored(channel, StreamPosition(name_of_epoch, offset), payload, host))
    return found


def publish_args(
    channel: str, payload: str, host: str | None = None
) -> tuple[list[str], list[str | int]]:
    """The keys and arguments of :data:`PUBLISH_SCRIPT` for one event of ``channel``
    about ``host`` (its data's ``host_id``)."""
    bounds = bounds_for(channel)
    now_ms = int(time.time() * 1000)
    return list(stream_keys(channel)), [
        new_epoch(),
        payload,
        bounds.size,
        now_ms - int(bounds.seconds * 1000),
        now_ms,
        host or "",
    ]


def position_of(reply: Iterable[Any]) -> StreamPosition:
    """A script's ``{epoch, offset}`` reply as a position."""
    epoch, offset = reply
    return StreamPosition(_text(epoch), int(offset))


class RedisStreams:
    """The channel streams of a cluster, in Redis (async, for a server process's node)."""

    def __init__(self, url: str) -> None:
        # only deployments with Redis need it
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        # A connection opened before Redis restarted is dead and fails at its next use:
        # that use is tried once more on a new connection, not taken for an outage.
        # Reads block for up to READ_BLOCK_MS; the sockets have room beyond that.
        options: dict[str, Any] = {
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
            "retry": Retry(NoBackoff(), 1, (RedisConnectionError,)),
        }
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=POOL_CONNECTIONS, timeout=POOL_WAIT_SECONDS, **options
        )
        self.redis = aioredis.Redis.from_pool(pool)  # closing the client closes the pool
        # A dedicated connection for blocking reads, so publishing never waits behind one;
        # a lean one, as every process reads every event through it (sysmanage.resp).
        self.reader = resp.Connection(url, timeout=30, connect_timeout=5)
        self._publish = self.redis.register_script(PUBLISH_SCRIPT)
        self._head = self.redis.register_script(HEAD_SCRIPT)
        self._read = self.redis.register_script(READ_SCRIPT)

    async def close(self) -> None:
        """Close the connections."""
        await self.reader.close()
        await self.redis.aclose()

    async def publish(self, events: Sequence[tuple[str, str, Mapping[str, Any], str]]) -> None:
        """Number and store ``events`` (channel, name, data, timestamp), in order, in one
        round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel, event, data, timestamp in events:
                payload = encode_payload(event, data, timestamp)
                keys, args = publish_args(channel, payload, _host_of(data))
                await self._publish(keys=keys, args=args, client=pipe)
            await pipe.execute()

    async def heads(self, channels: Iterable[str]) -> dict[str, StreamPosition]:
        """Every channel's position now (creating the epochs that are missing)."""
        found = {}
        for channel in channels:
            reply = await self._head(keys=list(stream_keys(channel)), args=[new_epoch()])
            found[channel] = position_of(reply)
        return found

    async def read_after(self, channel: str, since: StreamPosition) -> History:
        """The events after ``since`` on ``channel``, if all of them are still kept."""
        epoch, head_offset, first, raw = await self._read(
            keys=list(stream_keys(channel)), args=[new_epoch(), since.offset]
        )
        head = StreamPosition(_text(epoch), int(head_offset))
        first_offset = int(first) if int(first) >= 0 else None
        if not _judge(since.offset, head, first_offset, since.epoch):
            return History(head, [], False)
        entries = [decode_entry(channel, entry_id, fields) for entry_id, fields in raw]
        return History(head, entries, True)

    async def kept(self, channel: str, head: StreamPosition) -> list[Entry]:
        """What the stream of ``channel`` keeps up to ``head``, oldest first (to warm a
        process's copy of recent events when it starts)."""
        key, _ = stream_keys(channel)
        raw: Any = await self.redis.xrange(key, "-", f"{head.offset}-0")
        entries = [decode_entry(channel, entry_id, fields) for entry_id, fields in raw]
        return [e for e in entries if e.position.epoch == head.epoch]

    async def read_new(
        self, positions: Mapping[str, StreamPosition], block_ms: int
    ) -> list[tuple[str, list[Entry]]]:
        """Wait up to ``block_ms`` for events after ``positions``; return them by channel."""
        channel_of = {stream_keys(channel)[0].encode(): channel for channel in positions}
        args = [b"XREAD", b"COUNT", b"%d" % READ_BATCH, b"BLOCK", b"%d" % block_ms, b"STREAMS"]
        args += channel_of
        args += [b"%d-0" % p.offset for p in positions.values()]
        reply = await self.reader.execute(args, block_ms / 1000, resp.StreamsReply)
        found = []
        for key, entries in reply or ():
            channel = channel_of[key]
            found.append((channel, read_entries(channel, entries)))
        return found


def publish_blocking(url: str, channel: str, event: str, data: Mapping[str, Any], ts: str) -> None:
    """Number and store one event from a process without a node (management commands)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    try:
        keys, args = publish_args(channel, encode_payload(event, data, ts), _host_of(data))
        client.register_script(PUBLISH_SCRIPT)(keys=keys, args=args)
    finally:
        client.close()
