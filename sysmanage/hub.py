"""
The per-process hub: two-level fan-out of events to WebSocket connections.

Each server process runs one hub.  It joins :data:`~sysmanage.events.EVENTS_GROUP`
once, receives every event from the channel layer (in-memory or Redis), and hands it
to the local connections whose subscriptions match, serializing each distinct payload
once.  Going through the layer once per process instead of once per connection is what
lets fan-out keep up (see ``docs/architecture.md``).  The hub also forwards events
published in this process to the layer, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from channels.layers import BaseChannelLayer, get_channel_layer

from sysmanage.events import EVENTS_GROUP
from sysmanage.protocol import CloseCode, MessageType, auth_failed_envelope, dumps, envelope
from sysmanage.topics import TOPICS, Filters
from sysmanage.transport import Frame

logger = logging.getLogger(__name__)

#: Re-join the group this often: channels-redis expires members after ``group_expiry``.
REJOIN_INTERVAL = 3600.0
#: Back-off bounds when the layer fails (Redis restarting, network blip).
RETRY_MIN, RETRY_MAX = 0.2, 5.0
#: Messages received from the layer and waiting for fan-out, at most.
INBOX_SIZE = 1000
#: Attempts to hand one published message to the layer before giving up on it.
PUBLISH_ATTEMPTS = 5


#: A sync function run in the database thread, or a coroutine function given the hub
#: and run on its loop (for jobs that read the hub's connections).
PeriodicJob = Callable[..., Any]
_PERIODIC: dict[str, tuple[Callable[[], float], PeriodicJob]] = {}
ControlHandler = Callable[["Hub", dict[str, Any]], None]


def register_periodic(name: str, interval: Callable[[], float], job: PeriodicJob) -> None:
    """Run ``job`` every ``interval()`` seconds in each server process (after a first run).

    Apps register maintenance here from ``AppConfig.ready``; jobs must be safe to run in
    several processes at once.
    """
    if name in _PERIODIC and _PERIODIC[name][1] is not job:
        raise ValueError(f"periodic job {name!r} is registered already")
    _PERIODIC[name] = (interval, job)


def register_control(action: str, handler: ControlHandler) -> None:
    """Make every hub call ``handler(hub, message)`` for control messages of ``action``
    (called on the hub's loop; it must not block).  Refuses duplicates."""
    if action in _CONTROL_HANDLERS and _CONTROL_HANDLERS[action] is not handler:
        raise ValueError(f"control action {action!r} is registered already")
    _CONTROL_HANDLERS[action] = handler


class Subscriber(Protocol):
    """What the hub needs of a connection."""

    user_id: str | None
    session_tag: str | None
    #: what the connection's user may see (``sysmanage.permissions.SOCKET_RIGHTS``)
    rights: frozenset[str]

    def deliver(self, frame: Frame) -> None:
        """Send ``frame`` without blocking."""

    def close_from_hub(self, code: int, error: dict[str, Any]) -> None:
        """Send ``error`` and close the connection with ``code`` (scheduled, not awaited)."""

    def nudge(self) -> None:
        """(Agents only) look for work queued for this host."""


class Hub:
    """Fans events out to this process's connections; one per process (per event loop)."""

    _current: ClassVar[Hub | None] = None
    _start_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, layer: BaseChannelLayer, loop: asyncio.AbstractEventLoop) -> None:
        self.layer = layer
        self.loop = loop
        self.channel_name: str | None = None
        self.subscriptions: dict[str, dict[Subscriber, Filters]] = defaultdict(dict)
        # channel -> host_id (None: all hosts) -> payload variant -> subscribers.  Dispatch
        # walks only the buckets an event can match and frames each variant once.
        self._index: dict[str, dict[Any, dict[Any, set[Subscriber]]]] = defaultdict(dict)
        self.by_user: dict[str, set[Subscriber]] = defaultdict(set)
        self.by_session: dict[str, set[Subscriber]] = defaultdict(set)
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        # Received but not yet fanned out; bounded so a backlog stays in the layer.
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=INBOX_SIZE)
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: asyncio.Future[None] = loop.create_future()
        self._closed = False
        self.agents: dict[str, Subscriber] = {}
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = defaultdict(list)
        # channel -> its last payload, for the topics that drop repeated events
        self._last: dict[str, dict[str, Any]] = {}
        self.stats = {"events": 0, "deliveries": 0, "frames": 0, "publish_failures": 0}

    # -- life cycle ---------------------------------------------------------------

    @classmethod
    def current(cls) -> Hub | None:
        """The hub of this process, if one was started."""
        return cls._current

    @classmethod
    async def for_running_loop(cls) -> Hub:
        """Return this process's hub for the running loop, starting it on first use.

        Raises whatever the channel layer raised if the hub cannot start (e.g. Redis
        is unreachable); the next caller tries again.
        """
        loop = asyncio.get_running_loop()
        hub = cls._current
        if hub is not None and hub.loop is loop and not hub._closed:
            await asyncio.shield(hub._ready)
            return hub
        hub = cls(get_channel_layer(), loop)
        cls._current = hub
        try:
            await hub.start()
        except BaseException as exc:
            if cls._current is hub:
                cls._current = None
            hub._ready.set_exception(exc)
            hub._ready.exception()  # retrieved here, so no "never retrieved" warning
            raise
        hub._ready.set_result(None)
        return hub

    async def start(self) -> None:
        """Create this hub's layer channel, join the events group and start its tasks."""
        self.channel_name = await self.layer.new_channel(prefix="hub")
        await self.layer.group_add(EVENTS_GROUP, self.channel_name)
        self._tasks = [
            self.spawn(self._receive_loop()),
            self.spawn(self._dispatch_loop()),
            self.spawn(self._publish_loop()),
            self.spawn(self._rejoin_loop()),
            *(
                self.spawn(self._periodic_loop(name, interval, job))
                for name, (interval, job) in _PERIODIC.items()
            ),
        ]
        logger.info("hub %s started", self.channel_name)

    async def close(self) -> None:
        """Stop the hub's tasks and leave the group (tests and shutdown)."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.channel_name is not None:
            with contextlib.suppress(Exception):
                await self.layer.group_discard(EVENTS_GROUP, self.channel_name)
        if Hub._current is self:
            Hub._current = None

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of the hub with a fresh context.

        A task inherits the context of whoever created it; if that was a
        ``sync_to_async`` worker, asgiref would refuse the hub's own database calls
        as a deadlock.  The hub's work belongs to no request, so it starts clean.
        """
        return self.loop.create_task(coro, context=contextvars.Context())

    def call_soon_threadsafe(self, callback: Any, *args: Any) -> None:
        """Run ``callback(*args)`` on the hub's loop, from any thread, in a fresh context."""
        self.loop.call_soon_threadsafe(callback, *args, context=contextvars.Context())

    def run_in_background(self, job: Callable[..., Any], *args: Any) -> None:
        """Run blocking ``job(*args)`` in the database thread without awaiting it."""
        from channels.db import database_sync_to_async

        async def run() -> None:
            try:
                await database_sync_to_async(job)(*args)
            except Exception:
                logger.exception("background job %s failed", getattr(job, "__name__", job))

        self.spawn(run())

    def accepts_messages(self) -> bool:
        """Whether the hub's loop is alive to take published messages."""
        return not self._closed and self.loop.is_running() and not self.loop.is_closed()

    def owns_current_thread(self) -> bool:
        """Whether the caller runs on the hub's own event loop thread."""
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    # -- connections ----------------------------------------------------------------

    def register(self, conn: Subscriber) -> None:
        """Track ``conn`` so that control messages (revocations) can reach it."""
        for index, key in self._indexes(conn):
            index[key].add(conn)

    def unregister(self, conn: Subscriber) -> None:
        """Forget ``conn`` and all its subscriptions."""
        for channel in list(self.subscriptions):
            self.unsubscribe(conn, channel)
        for index, key in self._indexes(conn):
            members = index.get(key)
            if members is not None:
                members.discard(conn)
                if not members:
                    del index[key]

    def _indexes(self, conn: Subscriber) -> list[tuple[dict[str, set[Subscriber]], str]]:
        found = []
        if conn.user_id is not None:
            found.append((self.by_user, conn.user_id))
        tag = getattr(conn, "session_tag", None)
        if tag is not None:
            found.append((self.by_session, tag))
        return found

    def register_agent(self, host_id: str, conn: Subscriber) -> Subscriber | None:
        """Record ``conn`` as ``host_id``'s agent here; return the connection it replaces."""
        previous = self.agents.get(host_id)
        self.agents[host_id] = conn
        return previous if previous is not conn else None

    def unregister_agent(self, host_id: str, conn: Subscriber) -> bool:
        """Forget ``conn`` as ``host_id``'s agent; False if another connection replaced it."""
        if self.agents.get(host_id) is conn:
            del self.agents[host_id]
            return True
        return False

    def wait_for(self, key: str) -> asyncio.Future[dict[str, Any]]:
        """A future resolved by :meth:`resolve` for ``key`` (e.g. an execution's end)."""
        future: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self._waiters[key].append(future)
        future.add_done_callback(lambda f: self._forget_waiter(key, f))
        return future

    def resolve(self, key: str, value: dict[str, Any]) -> None:
        """Resolve every waiter of ``key`` with ``value``."""
        for future in self._waiters.pop(key, ()):
            if not future.done():
                future.set_result(value)

    def _forget_waiter(self, key: str, future: asyncio.Future[dict[str, Any]]) -> None:
        waiters = self._waiters.get(key)
        if waiters and future in waiters:
            waiters.remove(future)
            if not waiters:
                del self._waiters[key]

    def subscribe(self, conn: Subscriber, channel: str, filters: Filters) -> None:
        """Subscribe ``conn`` to ``channel``, replacing any filters it had there."""
        self.unsubscribe(conn, channel)
        self.subscriptions[channel][conn] = filters
        self._bucket(channel, filters).add(conn)

    def unsubscribe(self, conn: Subscriber, channel: str) -> bool:
        """Unsubscribe ``conn`` from ``channel``; return whether it was subscribed."""
        filters = self.subscriptions[channel].pop(conn, None)
        if filters is None:
            return False
        hosts = self._index[channel]
        key = filters.get("host_id")
        variants = hosts[key]
        bucket = variants[TOPICS[channel].variant(filters)]
        bucket.discard(conn)
        if not bucket:
            del variants[TOPICS[channel].variant(filters)]
            if not variants:
                del hosts[key]
        return True

    def _bucket(self, channel: str, filters: Filters) -> set[Subscriber]:
        """The set of subscribers sharing ``filters``' host and payload shape."""
        variants = self._index[channel].setdefault(filters.get("host_id"), {})
        return variants.setdefault(TOPICS[channel].variant(filters), set())

    def last_delivered(self, channel: str) -> dict[str, Any] | None:
        """The last payload seen on ``channel``, from any process (``drops_repeats`` topics)."""
        return self._last.get(channel)

    def subscriber_count(self, channel: str | None = None) -> int:
        """How many local subscriptions exist (on ``channel``, or on all channels)."""
        if channel is not None:
            return len(self.subscriptions.get(channel, {}))
        return sum(len(s) for s in self.subscriptions.values())

    # -- inbound: layer -> connections ---------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self.channel_name is not None
        delay = RETRY_MIN
        while True:
            try:
                message = await self.layer.receive(self.channel_name)
                delay = RETRY_MIN
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("hub receive failed; retrying in %.1fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            await self._inbox.put(message)

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
                logger.exception("hub failed to handle a %s message", message.get("type"))

    def handle(self, message: dict[str, Any]) -> None:
        """Act on one layer message: an event to fan out, or a control message."""
        kind = message.get("type")
        if kind == "hub.event":
            self.dispatch(message)
        elif kind == "hub.control":
            self.control(message)
        else:
            logger.warning("hub ignored a message of unknown type %r", kind)

    def dispatch(self, message: dict[str, Any]) -> int:
        """Deliver one event to each matching local subscriber; return how many got it."""
        channel = message["channel"]
        data = message["data"]
        topic = TOPICS[channel]
        if topic.drops_repeats:
            if topic.repeats(self._last.get(channel), data):
                return 0
            self._last[channel] = data
        if data.get("final") and data.get("execution_id"):
            self.resolve(f"done:{data['execution_id']}", data)
        self.stats["events"] += 1
        hosts = self._index.get(channel)
        if not hosts:
            return 0
        host_id = data.get("host_id")
        buckets = [hosts.get(None)] + ([hosts.get(host_id)] if host_id is not None else [])
        frames = delivered = 0
        filters_of = self.subscriptions[channel]
        for variants in buckets:
            for conns in (variants or {}).values():
                # one frame per audience (None for topics whose payload is the same for all)
                framed: dict[Any, Frame] = {}
                for conn in list(conns):
                    filters = filters_of[conn]
                    if topic.extra_match and not topic.matches(filters, data):
                        continue
                    audience = topic.audience(conn, data) if topic.per_viewer else None
                    frame = framed.get(audience)
                    if frame is None:
                        frame = framed[audience] = Frame(
                            dumps(
                                envelope(
                                    MessageType.EVENT,
                                    channel,
                                    topic.render_for(filters, data, audience),
                                    timestamp=message.get("timestamp"),
                                )
                            )
                        )
                        frames += 1
                    conn.deliver(frame)
                    delivered += 1
        self.stats["deliveries"] += delivered
        self.stats["frames"] += frames
        return delivered

    def control(self, message: dict[str, Any]) -> None:
        """Act on a control message: close revoked sockets, nudge agents, wake waiters."""
        action = message.get("action")
        handler = _CONTROL_HANDLERS.get(str(action))
        if handler is None:
            logger.warning("hub ignored unknown control action %r", action)
            return
        handler(self, message)

    # -- outbound: this process -> layer ---------------------------------------------------

    def enqueue_publish(self, message: dict[str, Any]) -> None:
        """Queue ``message`` for the layer; called on the hub's loop only."""
        self._outbox.put_nowait(message)

    async def _publish_loop(self) -> None:
        while True:
            message = await self._outbox.get()
            await self._publish_one(message)

    async def _publish_one(self, message: dict[str, Any]) -> None:
        delay = RETRY_MIN
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            try:
                await self.layer.group_send(EVENTS_GROUP, message)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning(
                    "publishing %s failed (attempt %d)",
                    message.get("event"),
                    attempt,
                    exc_info=True,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        self.stats["publish_failures"] += 1
        logger.error(
            "dropped event %s after %d attempts: the channel layer is unreachable",
            message.get("event") or message.get("action"),
            PUBLISH_ATTEMPTS,
        )

    async def _rejoin_loop(self) -> None:
        while True:
            await asyncio.sleep(REJOIN_INTERVAL)
            try:
                await self.layer.group_add(EVENTS_GROUP, self.channel_name or "")
            except Exception:
                logger.exception("hub could not renew its group membership")

    async def _periodic_loop(
        self, name: str, interval: Callable[[], float], job: PeriodicJob
    ) -> None:
        from channels.db import database_sync_to_async

        while True:
            try:
                if inspect.iscoroutinefunction(job):
                    await job(self)
                else:
                    await database_sync_to_async(job)()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("periodic job %s failed", name)
            await asyncio.sleep(interval())


def _close_user(hub: Hub, message: dict[str, Any]) -> None:
    error = auth_failed_envelope(message.get("reason") or "Session revoked")
    for conn in list(hub.by_user.get(str(message.get("user_id")), ())):
        conn.close_from_hub(int(message.get("code") or CloseCode.AUTH_FAILED), error)


def _close_session(hub: Hub, message: dict[str, Any]) -> None:
    error = auth_failed_envelope(message.get("reason") or "Logged out")
    for conn in list(hub.by_session.get(str(message.get("session")), ())):
        conn.close_from_hub(int(message.get("code") or CloseCode.AUTH_FAILED), error)


def _close_agent(hub: Hub, message: dict[str, Any]) -> None:
    conn = hub.agents.get(str(message.get("host_id")))
    if conn is not None:
        conn.close_from_hub(
            CloseCode.AUTH_FAILED, auth_failed_envelope(message.get("reason") or "Token revoked")
        )


def _agent_dispatch(hub: Hub, message: dict[str, Any]) -> None:
    conn = hub.agents.get(str(message.get("host_id")))
    if conn is not None:
        conn.nudge()


def _agent_took(hub: Hub, message: dict[str, Any]) -> None:
    hub.resolve(f"took:{message.get('ref')}", message)


_CONTROL_HANDLERS: dict[str, ControlHandler] = {
    "close_user": _close_user,
    "close_session": _close_session,
    "close_agent": _close_agent,
    "agent_dispatch": _agent_dispatch,
    "agent_took": _agent_took,
}
