"""
The per-process node: everything that talks to the other server processes.

Each server process runs one :class:`Node` on its event loop.  On first use it creates
one layer channel (``hub.…``), joins :data:`EVENTS_GROUP` and starts its loops: one
receives every message of the group from the channel layer (in-memory or Redis) and
another hands each on (events to the process's :class:`~sysmanage.hub.Hub` for
fan-out, control messages to their handlers); one forwards what this process publishes
to the layer, in order; one checks and renews the group membership every
``LAYER_REJOIN_SECONDS``; and one runs each periodic job (:mod:`sysmanage.periodic`).
Failures of the layer are retried here, so the hub never waits on it.

A Redis that restarts empty (or is flushed) forgets the group's members: the process
would then receive nothing, silently.  The membership check notices (as it notices an
outage of the layer), rejoins, logs it once and tells every client connection of the
process that events may have been missed (:meth:`~sysmanage.hub.Hub.notify_events_missed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, Protocol, TypedDict, cast

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings

from sysmanage import control, dbgate, metrics, periodic, streams
from sysmanage.control import ControlMessage
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.hub import Hub
from sysmanage.protocol import StreamPosition, iso
from sysmanage.streams import Entry, History, MemoryStreams, Recent, RedisStreams
from sysmanage.topics import TOPICS

logger = logging.getLogger(__name__)

#: The layer group every node joins; events and control messages travel on it.
EVENTS_GROUP = "sysmanage.events"
#: While the layer is unreachable, say so in the log at most this often (seconds).
OUTAGE_LOG_INTERVAL = 60.0
#: While the layer is unreachable, check for its return this often (seconds), so that
#: the membership is back soon after it is.
OUTAGE_CHECK_INTERVAL = 1.0
#: Back-off bounds when the layer fails (Redis restarting, network blip).
RETRY_MIN, RETRY_MAX = 0.2, 5.0
#: Messages received from the layer and waiting for fan-out, at most.
INBOX_SIZE = 1000
#: Attempts to hand one published message to the layer before giving up on it.
PUBLISH_ATTEMPTS = 5
#: Events numbered and stored in one round trip to Redis, at most.
PUBLISH_BATCH = 200
#: How long one read of the Redis streams waits for new events (milliseconds).
READ_BLOCK_MS = 2000


class EventMessage(TypedDict):
    """An event as it travels on the layer (:meth:`sysmanage.events.Event.to_message`)."""

    type: Literal["hub.event"]
    event: str
    channel: str
    data: dict[str, Any]
    timestamp: str


#: What travels on the layer: events, and control messages (:mod:`sysmanage.control`).
LayerMessage = EventMessage | ControlMessage


class ChannelLayer(Protocol):
    """What the node uses of a channel layer.  The in-memory and the Redis layers have
    it all; channels' ``BaseChannelLayer`` declares ``new_channel`` without ``prefix``."""

    async def new_channel(self, prefix: str = ...) -> str: ...
    async def receive(self, channel: str) -> dict[str, Any]: ...
    async def group_add(self, group: str, channel: str) -> None: ...
    async def group_discard(self, group: str, channel: str) -> None: ...
    async def group_send(self, group: str, message: dict[str, Any]) -> None: ...


def channel_layer() -> ChannelLayer:
    """The configured channel layer (``CHANNEL_LAYERS``); raises if there is none."""
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer is configured (CHANNEL_LAYERS)")
    return cast(ChannelLayer, layer)


class Node:
    """This process's link to the channel layer; one per process (per event loop)."""

    _current: ClassVar[Node | None] = None

    def __init__(
        self,
        layer: ChannelLayer,
        loop: asyncio.AbstractEventLoop,
        event_streams: MemoryStreams | RedisStreams | None = None,
    ) -> None:
        self.layer = layer
        self.loop = loop
        self.hub = Hub()
        #: the channel streams: events are numbered there and, with Redis, read back from
        #: there by every process (:mod:`sysmanage.streams`)
        self.streams = event_streams if event_streams is not None else make_streams()
        #: with Redis, the recent events this process has read, to serve resumes from
        self.recent = Recent()
        self.hub.history = self if isinstance(self.streams, RedisStreams) else self.streams
        self.channel_name: str | None = None
        self._outbox: asyncio.Queue[LayerMessage] = asyncio.Queue()
        # Received but not yet fanned out; bounded so a backlog stays in the layer.  What
        # the layer hands over is checked as it is handled, so it is not typed here.
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=INBOX_SIZE)
        self._tasks: list[asyncio.Task[None]] = []
        #: background jobs run one at a time, in the order they were handed over
        self._background = asyncio.Lock()
        self._idle = asyncio.Event()  # the outbox is empty and the publisher holds nothing
        self._ready: asyncio.Future[None] = loop.create_future()
        self._closed = False
        #: the publisher waits for messages, none queued (see enqueue_publish)
        self._publisher_waits = False
        self.publish_failures = 0
        #: wall-clock time of the first failure of the current outage of the layer, if any
        self.layer_down_since: float | None = None
        self._outage_logged_at = 0.0  # monotonic
        self._outage_began = asyncio.Event()
        #: wall-clock time the node last knew itself a member of the events group
        self.member_since = time.time()
        #: how many times the node found its membership lost (or the layer back) and rejoined
        self.rejoins = 0
        #: how many times a channel's history was found lost (a new epoch) or cut short
        self.stream_losses = 0
        self._heads_checked_at = 0.0  # monotonic
        self._membership_lock = asyncio.Lock()
        #: set when a membership check succeeds: wakes a stream reader waiting to retry
        self._layer_back = asyncio.Event()
        #: wall-clock time the clients were last told that events may have been missed
        self._told_at = 0.0

    # -- life cycle ---------------------------------------------------------------

    @classmethod
    def current(cls) -> Node | None:
        """The node of this process, if one was started."""
        return cls._current

    @classmethod
    async def for_running_loop(cls) -> Node:
        """Return this process's node for the running loop, starting it on first use.

        Raises whatever the channel layer raised if the node cannot start (e.g. Redis
        is unreachable); the next caller tries again.
        """
        loop = asyncio.get_running_loop()
        node = cls._current
        if node is not None and node.loop is loop and not node._closed:
            await asyncio.shield(node._ready)
            return node
        node = cls(channel_layer(), loop)
        cls._current = node
        try:
            await node.start()
        except BaseException as exc:
            if cls._current is node:
                cls._current = None
            node._ready.set_exception(exc)
            node._ready.exception()  # retrieved here, so no "never retrieved" warning
            raise
        node._ready.set_result(None)
        return node

    async def start(self) -> None:
        """Create this node's layer channel, join the events group and start its tasks."""
        self.channel_name = await self.layer.new_channel(prefix="hub")
        await self.layer.group_add(EVENTS_GROUP, self.channel_name)
        self.member_since = time.time()
        if isinstance(self.streams, RedisStreams):
            self.hub.heads.update(await self.streams.heads(TOPICS))
            for channel, head in self.hub.heads.items():
                for entry in await self.streams.kept(channel, head):
                    self.recent.add(entry)
            self._heads_checked_at = time.monotonic()
            readers = [self.spawn(self._stream_loop(self.streams))]
        else:
            self.hub.heads.update({channel: self.streams.head(channel) for channel in TOPICS})
            readers = []
        self._tasks = [
            self.spawn(self._receive_loop()),
            self.spawn(self._dispatch_loop()),
            self.spawn(self._publish_loop()),
            self.spawn(self._rejoin_loop()),
            *readers,
            *(self.spawn(periodic.run_forever(job, self.hub)) for job in periodic.registered()),
        ]
        logger.info("node %s started", self.channel_name)

    async def close(self) -> None:
        """Stop the node's tasks and leave the group (tests and shutdown)."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.channel_name is not None:
            with contextlib.suppress(Exception):
                await self.layer.group_discard(EVENTS_GROUP, self.channel_name)
        if isinstance(self.streams, RedisStreams):
            with contextlib.suppress(Exception):
                await self.streams.close()
        if Node._current is self:
            Node._current = None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of the node with a fresh context.

        A task inherits the context of whoever created it; if that was a
        ``sync_to_async`` worker, asgiref would refuse the node's own database calls
        as a deadlock.  The node's work belongs to no request, so it starts clean.
        """
        return self.loop.create_task(coro, context=contextvars.Context())

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any) -> None:
        """Run ``callback(*args)`` on the node's loop, from any thread, in a fresh context."""
        self.loop.call_soon_threadsafe(callback, *args, context=contextvars.Context())

    def run_in_background(self, job: Callable[..., object], *args: Any) -> None:
        """Run blocking ``job(*args)`` in a database thread without awaiting it, after
        the jobs handed over before it (listeners run in publication order)."""

        async def run() -> None:
            try:
                async with self._background:
                    await database_sync_to_async(job)(*args)
            except Exception:
                dbgate.log_exception(
                    logger, "background job %s failed", getattr(job, "__name__", job)
                )

        self.spawn(run())

    def accepts_messages(self) -> bool:
        """Whether the node's loop is alive to take published messages."""
        return not self._closed and self.loop.is_running() and not self.loop.is_closed()

    def owns_current_thread(self) -> bool:
        """Whether the caller runs on the node's own event loop thread."""
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    # -- inbound: layer -> hub and handlers -------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self.channel_name is not None
        delay = RETRY_MIN
        while True:
            try:
                message = await self.layer.receive(self.channel_name)
                self._claim_receive_cleaners()
                delay = RETRY_MIN
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.layer_failed("receiving", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            await self._inbox.put(message)

    def _claim_receive_cleaners(self) -> None:
        """channels-redis removes each message it hands over from a backup set in a task
        of its own (``receive_cleaners``).  When Redis goes away meanwhile, that task
        fails and asyncio logs a traceback for an error nobody retrieved, one per message
        received; retrieve those errors here (the outage itself is logged once)."""
        for cleaner in getattr(self.layer, "receive_cleaners", ()):
            cleaner.add_done_callback(_retrieve_error)

    async def _dispatch_loop(self) -> None:
        """Hand received messages on, while the receive loop already fetches the next.

        With Redis each receive is a round trip; overlapping it with the fan-out of the
        previous event keeps the process busy delivering instead of waiting.
        """
        while True:
            message = await self._inbox.get()
            try:
                self.handle(message)
            except Exception:
                logger.exception("node failed to handle a %s message", message.get("type"))

    def handle(self, message: Mapping[str, Any]) -> None:
        """Act on one layer message: a control message, or an event sent on the layer
        itself (not through the streams: it has no position, and cannot be resumed)."""
        kind = message.get("type")
        if kind == "hub.event":
            self.hub.dispatch(message["channel"], message["data"], message.get("timestamp"))
        elif kind == "hub.control":
            control.handle(self.hub, message)
        else:
            logger.warning("node ignored a message of unknown type %r", kind)

    # -- outbound: this process -> layer ---------------------------------------------------

    def inbox_depth(self) -> int:
        """Messages from the layer waiting for the hub (``/metrics``)."""
        return self._inbox.qsize()

    def enqueue_publish(self, message: LayerMessage) -> None:
        """Queue ``message`` for the layer; called on the node's loop only.

        An event on the in-memory streams that nothing queued precedes, while the
        publisher waits, is numbered and fanned out at once instead: the same order,
        without waking the publisher for each of a fleet's reports.
        """
        if (
            self._publisher_waits
            and message["type"] == "hub.event"
            and isinstance(self.streams, MemoryStreams)
            and self._outbox.empty()
        ):
            metrics.published(message["channel"])
            self._store_in_memory(message)
            return
        self._idle.clear()
        self._outbox.put_nowait(message)

    async def _publish_loop(self) -> None:
        """Forward what this process publishes, in order: events to the channel streams
        (several per round trip when they queue up), control messages to the layer."""
        while True:
            if self._outbox.empty():
                self._idle.set()
            self._publisher_waits = True
            try:
                pending = [await self._outbox.get()]
            finally:
                self._publisher_waits = False
            while len(pending) < PUBLISH_BATCH and not self._outbox.empty():
                pending.append(self._outbox.get_nowait())
            events: list[EventMessage] = []
            for message in pending:
                if message["type"] == "hub.event":
                    events.append(message)
                    continue
                if events:
                    await self._store_events(events)
                    events = []
                await self._publish_one(message)
            if events:
                await self._store_events(events)

    async def settle(self) -> None:
        """Return once what this process published has been handed to the layer (before
        the process stops)."""
        await self._idle.wait()

    async def _store_events(self, events: list[EventMessage]) -> None:
        """Number and keep ``events`` on their channels' streams.

        In memory they are fanned out here at once; with Redis every process (this one
        included) reads them back from the streams (:meth:`_stream_loop`).
        """
        for message in events:
            metrics.published(message["channel"])
        if isinstance(self.streams, MemoryStreams):
            for message in events:
                self._store_in_memory(message)
            return
        batch = [(m["channel"], m["event"], m["data"], m["timestamp"]) for m in events]
        delay = RETRY_MIN
        for _attempt in range(PUBLISH_ATTEMPTS):
            try:
                await self.streams.publish(batch)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.layer_failed("publishing", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        self.publish_failures += len(events)
        logger.error(
            "dropped %d event(s) (%s) after %d attempts: Redis is unreachable",
            len(events),
            ", ".join(sorted({m["event"] for m in events})),
            PUBLISH_ATTEMPTS,
        )

    def _store_in_memory(self, message: EventMessage) -> None:
        assert isinstance(self.streams, MemoryStreams)
        entry = self.streams.append(
            message["channel"], message["event"], message["data"], message["timestamp"]
        )
        try:
            self.hub.dispatch_entry(entry)
        except Exception:
            logger.exception("node failed to fan out a %s event", entry.event)

    async def _stream_loop(self, source: RedisStreams) -> None:
        """Read every channel's stream from where this process is, and fan the events
        out in offset order; check the streams' epochs every ``LAYER_REJOIN_SECONDS``
        and after a failure, so that a Redis that restarted empty is noticed."""
        delay = RETRY_MIN
        check_heads = False
        failing_since = 0.0  # wall clock
        while True:
            try:
                due = time.monotonic() - self._heads_checked_at >= settings.LAYER_REJOIN_SECONDS
                if check_heads or due:
                    heads = await source.heads(TOPICS)
                    # Back from a failure: rejoin first, so that one notice covers both
                    # (the membership check may have told the clients as the layer came back).
                    told = check_heads and (
                        await self.check_membership() or self._told_at >= failing_since
                    )
                    lost = self.adopt_heads(heads)
                    if lost and not told:
                        self.stream_lost(lost, "its history was lost (Redis restarted empty)")
                    check_heads = False
                batches = await source.read_new(dict(self.hub.heads), READ_BLOCK_MS)
                delay = RETRY_MIN
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.layer_failed("reading the event streams", exc)
                if not check_heads:
                    failing_since = time.time()
                check_heads = True
                # retry after the delay, or as soon as a membership check finds the layer back
                self._layer_back.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._layer_back.wait()
                delay = min(delay * 2, RETRY_MAX)
                continue
            if batches:
                self.note_lag(batches)
            with self.hub.gathered():  # one write per socket for the whole read
                for _channel, entries in batches:
                    for entry in entries:
                        self.take_entry(entry)
            linger = settings.STREAM_READ_LINGER_SECONDS
            if batches and linger > 0 and sum(len(e) for _, e in batches) < streams.READ_BATCH:
                # Let the next events gather: one read per few milliseconds instead of one
                # per event, for a delay of at most this much.
                await asyncio.sleep(linger)

    @staticmethod
    def note_lag(batches: list[tuple[str, list[Entry]]]) -> None:
        """Observe the receive lag of one read: the oldest of its channels' first events
        (one timestamp read per channel, not per event)."""
        published = [at for _, entries in batches if (at := entries[0].published_at())]
        if published:
            metrics.received(time.time() - min(published))

    def take_entry(self, entry: Entry) -> None:
        """Fan out one event read from its stream, noting a history that went missing."""
        head = self.hub.heads.get(entry.channel)
        if head is not None and head.epoch != entry.position.epoch:
            # read past a reset we have not checked yet: start the new history over
            lost = self.adopt_heads({entry.channel: entry.position})
            self.stream_lost(lost, "its history was lost (Redis restarted empty)")
            return
        if head is not None and entry.position.offset > head.offset + 1:
            self.stream_lost(
                [entry.channel],
                f"events {head.offset + 1}..{entry.position.offset - 1} left its history "
                "before this process read them",
            )
        try:
            self.hub.dispatch_entry(entry)
        except Exception:
            logger.exception("node failed to fan out a %s event", entry.event)
        self.recent.add(entry)

    async def read_after(self, channel: str, since: StreamPosition) -> History:
        """(With Redis) the events after ``since`` on ``channel``: from this process's
        copy of the recent ones when it holds them all, else from Redis.  A storm of
        resuming clients then costs no round trip and no decoding each."""
        head = self.hub.heads.get(channel)
        if head is not None:
            found = self.recent.after(channel, since, head)
            if found is not None:
                return found
        assert isinstance(self.streams, RedisStreams)
        return await self.streams.read_after(channel, since)

    def adopt_heads(self, heads: Mapping[str, StreamPosition]) -> list[str]:
        """Compare the streams' epochs with this process's; a channel whose history was
        replaced (Redis restarted empty, or lost the key) is read again from its start.
        Return those channels."""
        self._heads_checked_at = time.monotonic()
        lost = []
        for channel, head in heads.items():
            known = self.hub.heads.get(channel)
            if known is None or known.epoch == head.epoch:
                continue
            self.hub.heads[channel] = StreamPosition(head.epoch, 0)
            self.recent.forget(channel)
            lost.append(channel)
        return lost

    def stream_lost(self, channels: list[str], why: str) -> None:
        """Say once that events of ``channels`` may be missing here, and tell the clients."""
        if not channels:
            return
        self.stream_losses += 1
        now = self._told_at = time.time()
        told = self.hub.notify_events_missed(now, now)
        logger.warning(
            "channel(s) %s: %s; %d client connections told that events may be missing",
            ", ".join(channels),
            why,
            told,
        )

    async def _publish_one(self, message: LayerMessage) -> None:
        delay = RETRY_MIN
        for _attempt in range(PUBLISH_ATTEMPTS):
            try:
                await self.layer.group_send(EVENTS_GROUP, dict(message))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.layer_failed("publishing", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        self.publish_failures += 1
        logger.error(
            "dropped event %s after %d attempts: the channel layer is unreachable",
            message.get("event") or message.get("action"),
            PUBLISH_ATTEMPTS,
        )

    # -- membership and outages of the layer -----------------------------------------

    def layer_failed(self, doing: str, exc: BaseException) -> None:
        """Note that the layer failed while ``doing`` something; log it once per outage
        and then once per :data:`OUTAGE_LOG_INTERVAL` while it lasts."""
        now = time.monotonic()
        if self.layer_down_since is None:
            self.layer_down_since = time.time()
            self._outage_began.set()
            logger.error(
                "channel layer unreachable (%s failed: %s: %s); events are not delivered "
                "until it returns",
                doing,
                type(exc).__name__,
                exc,
            )
        elif now - self._outage_logged_at >= OUTAGE_LOG_INTERVAL:
            logger.error(
                "channel layer still unreachable, for %.0fs (%s failed: %s: %s)",
                time.time() - self.layer_down_since,
                doing,
                type(exc).__name__,
                exc,
            )
        else:
            return
        self._outage_logged_at = now

    async def _rejoin_loop(self) -> None:
        while True:
            interval = settings.LAYER_REJOIN_SECONDS
            if self.layer_down_since is not None:
                interval = min(interval, OUTAGE_CHECK_INTERVAL)
            try:
                # an outage that begins meanwhile shortens the wait (layer_failed)
                async with asyncio.timeout(interval):
                    await self._outage_began.wait()
            except TimeoutError:
                await self.check_membership()
            self._outage_began.clear()

    async def check_membership(self) -> bool:
        """Check and renew this node's membership of the events group.

        If the membership was gone (Redis restarted empty or was flushed) or the layer
        was unreachable since the last check, rejoin, say so once in the log and tell
        every client connection of this process that events may have been missed.
        Return whether that happened.
        """
        async with self._membership_lock:  # the stream reader checks too, after a failure
            return await self._check_membership()

    async def _check_membership(self) -> bool:
        assert self.channel_name is not None
        try:
            member = await is_group_member(self.layer, EVENTS_GROUP, self.channel_name)
            await self.layer.group_add(EVENTS_GROUP, self.channel_name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.layer_failed("renewing the group membership", exc)
            return False
        self._layer_back.set()
        now = time.time()
        since, self.member_since = self.member_since, now
        down_since, self.layer_down_since = self.layer_down_since, None
        if member is not False and down_since is None:
            return False
        self.rejoins += 1
        if member is False:
            reason = "its membership was gone (the layer's Redis restarted empty or was flushed)"
        else:
            reason = f"the channel layer was unreachable for {now - (down_since or now):.0f}s"
        self._told_at = now
        told = self.hub.notify_events_missed(since, now)
        logger.warning(
            "node %s rejoined the events group: %s; events published since %s may not "
            "have reached this process (%d client connections told)",
            self.channel_name,
            reason,
            iso(datetime.fromtimestamp(since, UTC)),
            told,
        )
        return True


def _retrieve_error(task: asyncio.Future[Any]) -> None:
    """Take a finished task's error, if any, so that it is not reported as unretrieved."""
    if not task.cancelled():
        task.exception()


async def is_group_member(layer: ChannelLayer, group: str, channel: str) -> bool | None:
    """Whether ``channel`` is a member of ``group``; None if the layer cannot tell.

    The layers do not offer this, so it reads their storage, as they name it:
    channels-redis keeps a group as a sorted set (``_group_key``) on the shard that
    ``consistent_hash`` picks; the in-memory layer keeps a dict per group.  Other layers
    get None, and the node then only renews its membership.
    """
    key_of = getattr(layer, "_group_key", None)
    shard_of = getattr(layer, "consistent_hash", None)
    connection_of = getattr(layer, "connection", None)
    if callable(key_of) and callable(shard_of) and callable(connection_of):
        connection = connection_of(shard_of(group))
        return await connection.zscore(key_of(group), channel) is not None
    groups = getattr(layer, "groups", None)
    if isinstance(groups, dict):
        return channel in groups.get(group, {})
    return None


def make_streams() -> MemoryStreams | RedisStreams:
    """The channel streams this deployment keeps: in Redis with ``REDIS_URL``, else in memory."""
    if settings.REDIS_URL:
        return RedisStreams(settings.REDIS_URL)
    return MemoryStreams()


async def running_hub() -> Hub:
    """This process's hub, its node started on first use (see :meth:`Node.for_running_loop`)."""
    return (await Node.for_running_loop()).hub


def send_to_nodes(message: LayerMessage) -> None:
    """Hand ``message`` to the layer, from any thread, without waiting on the event loop.

    In a server process the local node's publisher task forwards it, keeping the order
    of publication; elsewhere (management commands, tests without a node) it is sent
    directly.
    """
    node = Node.current()
    if node is not None and node.accepts_messages():
        if node.owns_current_thread():
            node.enqueue_publish(message)
        else:
            node.call_soon_threadsafe(node.enqueue_publish, message)
        return
    _warn_if_unshared_layer()
    try:
        if message["type"] == "hub.event" and settings.REDIS_URL:
            streams.publish_blocking(
                settings.REDIS_URL,
                message["channel"],
                message["event"],
                message["data"],
                message["timestamp"],
            )
        else:
            async_to_sync(channel_layer().group_send)(EVENTS_GROUP, dict(message))
    except Exception:
        # The change itself is committed; failing the request now would only invite a
        # duplicate retry.  Say loudly which event was lost instead.
        logger.exception(
            "could not publish %s: the channel layer is unreachable",
            message.get("event") or message.get("action"),
        )


_warned = threading.Event()
_server_process = threading.Event()


metrics.set_node_source(Node.current)


def mark_server_process() -> None:
    """Note that this process serves clients: its events need no warning (see below)."""
    _server_process.set()


def _warn_if_unshared_layer() -> None:
    """Note once (at debug level) that events of a process without a node reach nobody on
    the in-memory layer.

    A server process without a node simply has no subscriber yet; any other process
    (a management command) is talking to nobody.  That is the embedded default working
    as designed, not a fault: the server's pages and sockets read the database again
    (rechecks, snapshots, page loads), so nothing is lost but the live event, and a
    warning on every command of a first run would only be noise.
    """
    if settings.REDIS_URL or _warned.is_set() or _server_process.is_set():
        return
    _warned.set()
    logger.debug(
        "Events published by this process reach no server: the in-memory channel layer "
        "is not shared between processes. Set REDIS_URL to deliver them."
    )
