"""
The per-process hub: the local registry of connections and subscriptions, and fan-out.

Each server process has one hub, held by its :class:`~sysmanage.node.Node`, which
talks to the channel layer and so to the other processes.  The hub knows this process's
connections (clients by user and by session, agents by host) and the filters each
subscription has; :meth:`Hub.dispatch` hands one event to the local connections whose
subscriptions match, serializing each distinct payload once.  Going through the layer
once per process instead of once per connection is what lets fan-out keep up (see
``docs/architecture.md``).  Nothing here waits on the layer.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

from sysmanage.protocol import (
    ALL_HOSTS,
    MessageType,
    ServerMessage,
    StreamPosition,
    dumps,
    envelope,
    iso,
)
from sysmanage.summary import Audience, HostSummary
from sysmanage.topics import TOPICS, Filters, Topic
from sysmanage.transport import Frame, FrameRun

if TYPE_CHECKING:
    from sysmanage.streams import Entry, History

#: ``data.event`` of the ``status`` message on ``system`` telling a client that events may
#: have been lost (docs/websocket-protocol.md).
EVENTS_MISSED = "events_missed"


class PlainReason(TypedDict):
    """A reason for closing given as text alone (no envelope of the seed protocol)."""

    message: str


#: Why a connection is closed: an ``error`` envelope, or text alone.  Each connection
#: puts it to its peer in its own protocol.
CloseReason = ServerMessage | PlainReason


class Closable(Protocol):
    """A connection the hub (or a control message's handler) may close."""

    def close_from_hub(self, code: int, error: CloseReason) -> None:
        """Send ``error`` and close the connection with ``code`` (scheduled, not awaited)."""


class Subscriber(Closable, Protocol):
    """What the hub needs of a client connection."""

    user_id: str | None
    session_tag: str | None
    #: what the connection's user may see (``sysmanage.permissions.SOCKET_RIGHTS``)
    rights: frozenset[str]
    #: the hosts the connection's user sees (None: every host;
    #: ``sysmanage.permissions.HostScope``)
    host_scope: frozenset[str] | None

    def deliver(self, frame: Frame) -> None:
        """Send ``frame`` without blocking."""


class AgentLink(Closable, Protocol):
    """What the hub needs of a host's agent connection."""

    def nudge(self) -> None:
        """Look for work queued for this host."""


class HistoryReader(Protocol):
    """Where a resuming subscription's missed events are read (:mod:`sysmanage.streams`)."""

    async def read_after(self, channel: str, since: StreamPosition) -> History:
        """The events after ``since`` on ``channel``, if all are still kept."""


@dataclass(slots=True)
class _Resume:
    """A subscription being resumed: its live events wait (``held``) while the missed
    ones are read; then those the replay already covered (up to ``until``) are skipped."""

    held: list[tuple[StreamPosition | None, Frame]] | None = field(default_factory=list)
    until: StreamPosition | None = None

    def covers(self, position: StreamPosition | None) -> bool:
        """Whether the replay already sent the event at ``position``."""
        until = self.until
        return (
            until is not None
            and position is not None
            and position.epoch == until.epoch
            and position.offset <= until.offset
        )


#: Called with a hub and a channel of fleet figures when new figures arrive there and some
#: of its subscribers see only some hosts, or with the scope a subscriber moved to (whose
#: figures it needs whether or not they changed): ``sysmanage.fleet`` counts theirs.
FigureListener = Callable[["Hub", str, "frozenset[str] | None"], None]
FIGURES_LISTENERS: list[FigureListener] = []


@dataclass(frozen=True)
class Scoped:
    """The bucket key of subscribers to every host of a channel who see only some hosts:
    their payload variant and the hosts they see.  Subscribers with the same grants
    share a bucket, and so a frame; those who see every host are keyed by their variant
    alone and cost dispatch nothing more."""

    variant: Hashable
    scope: frozenset[str]

    def admits(self, topic: Topic, host_id: str | None) -> bool:
        """Whether an event of ``topic`` about ``host_id`` goes to this bucket: events
        about a host they see, and events about no host, except fleet figures (counted
        over every host: these subscribers get theirs counted over what they see)."""
        if host_id is None:
            return not topic.scoped_figures
        return host_id in self.scope


class Hub:
    """The connections of this process and their subscriptions; fans events out to them."""

    def __init__(self) -> None:
        self.subscriptions: dict[str, dict[Subscriber, Filters]] = defaultdict(dict)
        # channel -> host_id (None: all hosts) -> payload variant -> subscribers.  Dispatch
        # walks only the buckets an event can match and frames each variant once.
        self._index: dict[str, dict[Any, dict[Any, set[Subscriber]]]] = defaultdict(dict)
        self.by_user: dict[str, set[Subscriber]] = defaultdict(set)
        self.by_session: dict[str, set[Subscriber]] = defaultdict(set)
        self.agents: dict[str, AgentLink] = {}
        # channel -> its last payload, for the topics that drop repeated events
        self._last: dict[str, dict[str, Any]] = {}
        #: channel -> the position of the last event dispatched here (set by the node)
        self.heads: dict[str, StreamPosition] = {}
        #: channel -> subscriptions being resumed (see :meth:`resume`)
        self._resuming: dict[str, dict[Subscriber, _Resume]] = defaultdict(dict)
        #: the streams' history, for resuming subscriptions (set by the node)
        self.history: HistoryReader | None = None
        self.stats = {"events": 0, "deliveries": 0, "frames": 0, "writes": 0}
        #: channel -> event frames handed to sockets (``/metrics``)
        self.deliveries: dict[str, int] = defaultdict(int)
        #: channel -> its hosts' latest events, for all-hosts subscribers (who are indexed
        #: under the host ``"*"``, which no event has: dispatch never walks them)
        self.summaries = {
            name: HostSummary(topic) for name, topic in TOPICS.items() if topic.summarized
        }
        #: while gathering (:meth:`gathered`): bucket id -> (bucket, its frames so far)
        self._gathering: dict[int, tuple[set[Subscriber], list[Frame]]] | None = None

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Gather the frames of the events dispatched inside the block, and write them
        at its end: each bucket's frames joined once, each socket written to once.

        The node wraps each read from the streams in it.  Nothing may await inside the
        block (no subscription changes meanwhile).  A delivery that cannot be gathered
        (a per-viewer or per-subscriber topic, a subscription being resumed, a notice)
        writes what was gathered first, so that every socket keeps the order of events.
        """
        outer = self._gathering is None
        if outer:
            self._gathering = {}
        try:
            yield
        finally:
            if outer:
                self._write_gathered()
                self._gathering = None

    def _write_gathered(self) -> None:
        """Write every gathered bucket's frames to its sockets, one write each."""
        gathering = self._gathering
        if not gathering:
            return
        self._gathering = {}
        for conns, frames in gathering.values():
            frame = frames[0] if len(frames) == 1 else FrameRun(frames)
            for conn in list(conns):
                conn.deliver(frame)
            self.stats["writes"] += len(conns)

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

    def retag(self, conn: Subscriber, session_tag: str | None) -> None:
        """File ``conn`` under another sign-in (its token was refreshed in band), keeping
        its subscriptions: control messages closing that sign-in then reach it."""
        old = conn.session_tag
        if old == session_tag:
            return
        if old is not None and old in self.by_session:
            self.by_session[old].discard(conn)
            if not self.by_session[old]:
                del self.by_session[old]
        conn.session_tag = session_tag
        if session_tag is not None:
            self.by_session[session_tag].add(conn)

    def _indexes(self, conn: Subscriber) -> list[tuple[dict[str, set[Subscriber]], str]]:
        found = []
        if conn.user_id is not None:
            found.append((self.by_user, conn.user_id))
        tag = getattr(conn, "session_tag", None)
        if tag is not None:
            found.append((self.by_session, tag))
        return found

    def register_agent(self, host_id: str, conn: AgentLink) -> AgentLink | None:
        """Record ``conn`` as ``host_id``'s agent here; return the connection it replaces."""
        previous = self.agents.get(host_id)
        self.agents[host_id] = conn
        return previous if previous is not conn else None

    def unregister_agent(self, host_id: str, conn: AgentLink) -> bool:
        """Forget ``conn`` as ``host_id``'s agent; False if another connection replaced it."""
        if self.agents.get(host_id) is conn:
            del self.agents[host_id]
            return True
        return False

    def subscribe(self, conn: Subscriber, channel: str, filters: Filters) -> None:
        """Subscribe ``conn`` to ``channel``, replacing any filters it had there."""
        self.unsubscribe(conn, channel)
        self.subscriptions[channel][conn] = filters
        self._bucket(channel, filters, conn).add(conn)

    def scoped_buckets(self, channel: str) -> list[tuple[Scoped, set[Subscriber]]]:
        """The subscribers to every host of ``channel`` who see only some hosts, by
        scope and payload variant."""
        variants = self._index.get(channel, {}).get(None, {})
        return [(key, conns) for key, conns in variants.items() if type(key) is Scoped and conns]

    def _figures_changed(self, channel: str, newcomer: frozenset[str] | None) -> None:
        for listener in FIGURES_LISTENERS:
            listener(self, channel, newcomer)

    def rescope(self, conn: Subscriber, scope: frozenset[str] | None) -> None:
        """Make ``scope`` the hosts ``conn`` sees, moving its subscriptions to every host
        to the bucket of that scope.  (Those to one host it no longer sees the caller
        ends first.)"""
        if scope == getattr(conn, "host_scope", None):
            conn.host_scope = scope
            return
        moved = [
            (channel, filters)
            for channel, subscribers in self.subscriptions.items()
            if (filters := subscribers.get(conn)) is not None and filters.get("host_id") is None
        ]
        for channel, filters in moved:
            self._unbucket(channel, filters, conn)
        conn.host_scope = scope
        for channel, filters in moved:
            self._bucket(channel, filters, conn).add(conn)
            if TOPICS[channel].scoped_figures and scope is not None:
                self._figures_changed(channel, scope)

    def head(self, channel: str) -> StreamPosition | None:
        """The position of the last event dispatched on ``channel`` (where a subscription
        made now starts), if the channel has a stream."""
        return self.heads.get(channel)

    async def resume(
        self, conn: Subscriber, channel: str, filters: Filters, since: StreamPosition
    ) -> tuple[bool, StreamPosition | None, list[Entry]]:
        """Subscribe ``conn`` and read what it missed since ``since``.

        Return whether every missed event is still kept, the position the subscription
        continues from, and the missed events (empty unless all are kept).  Live events
        that arrive meanwhile wait until :meth:`release`, which the caller must call once
        it has sent the missed ones (:meth:`replay`): none is lost, none sent twice.
        """
        self.subscribe(conn, channel, filters)
        self._resuming[channel][conn] = _Resume()
        if self.history is None:
            return False, self.head(channel), []
        history = await self.history.read_after(channel, since)
        return history.complete, history.head, history.entries

    def replay(
        self,
        conn: Subscriber,
        channel: str,
        filters: Filters,
        entries: Iterable[Entry],
        *,
        first: Frame | None = None,
    ) -> int:
        """Send ``conn`` the events of ``entries`` that its subscription matches, as the
        live path would have, in one write after ``first`` (the subscribe response);
        return how many events were sent.

        Each event is framed once per payload shape and kept on its entry: clients
        resuming from overlapping positions share the frames (and their wire bytes).
        """
        topic = TOPICS[channel]
        variant = topic.variant(filters)
        key = self._key(channel, filters, conn)
        frames: list[Frame] = [first] if first is not None else []
        last: dict[str, Any] | None = None
        for entry in entries:
            data = entry.data
            if topic.drops_repeats:
                if topic.repeats(last, data):
                    continue
                last = data
            if not topic.matches(filters, data):
                continue
            if type(key) is Scoped and not key.admits(topic, data.get("host_id")):
                continue
            if topic.per_viewer and topic.withholds(conn, data):
                continue
            audience = topic.audience(conn, data) if topic.per_viewer else None
            frames.append(
                entry.frame(
                    (variant, audience),
                    lambda e: _event_frame(topic, filters, e, audience),  # noqa: B023 - used at once
                )
            )
        if frames:
            conn.deliver(frames[0] if len(frames) == 1 else FrameRun(frames))
        return len(frames) - (first is not None)

    def release(self, conn: Subscriber, channel: str, until: StreamPosition | None) -> None:
        """End the wait of a resumed subscription: send the live events held meanwhile
        that come after ``until`` (what the replay covered), and skip later arrivals up
        to it (a process reading its streams behind the history)."""
        pending = self._resuming[channel].pop(conn, None)
        if pending is None or conn not in self.subscriptions[channel]:
            return
        done = _Resume(held=None, until=until)
        for position, frame in pending.held or ():
            if not done.covers(position):
                conn.deliver(frame)
        head = self.heads.get(channel)
        caught_up = (
            head is not None
            and until is not None
            and head.epoch == until.epoch
            and head.offset >= until.offset
        )
        if until is not None and not caught_up:
            self._resuming[channel][conn] = done

    def unsubscribe(self, conn: Subscriber, channel: str) -> bool:
        """Unsubscribe ``conn`` from ``channel``; return whether it was subscribed."""
        resuming = self._resuming.get(channel)
        if resuming:
            resuming.pop(conn, None)
        filters = self.subscriptions[channel].pop(conn, None)
        if filters is None:
            return False
        self._unbucket(channel, filters, conn)
        return True

    @staticmethod
    def _key(channel: str, filters: Filters, conn: Subscriber) -> Hashable:
        variant = TOPICS[channel].variant(filters)
        scope = getattr(conn, "host_scope", None)
        if scope is None or filters.get("host_id") is not None:
            return variant
        return Scoped(variant, scope)

    def _bucket(self, channel: str, filters: Filters, conn: Subscriber) -> set[Subscriber]:
        """The set of subscribers sharing ``filters``' host and payload shape (and, for
        subscribers to every host, ``conn``'s scope)."""
        variants = self._index[channel].setdefault(filters.get("host_id"), {})
        return variants.setdefault(self._key(channel, filters, conn), set())

    def _unbucket(self, channel: str, filters: Filters, conn: Subscriber) -> None:
        hosts = self._index[channel]
        host = filters.get("host_id")
        variants = hosts[host]
        key = self._key(channel, filters, conn)
        bucket = variants[key]
        bucket.discard(conn)
        if not bucket:
            del variants[key]
            if not variants:
                del hosts[host]

    def send_summaries(self, *, max_hosts: int, max_bytes: int) -> int:
        """Send every all-hosts subscriber the summary of the hosts that reported since
        the last one (:mod:`sysmanage.summary`); return how many got one."""
        sent = 0
        for channel, summary in self.summaries.items():
            variants = self._index.get(channel, {}).get(ALL_HOSTS, {})
            filters_of = self.subscriptions[channel]
            audiences: list[Audience] = [
                (filters_of[next(iter(conns))], conns) for conns in variants.values() if conns
            ]
            sent += summary.send(audiences, max_hosts=max_hosts, max_bytes=max_bytes)
        return sent

    def last_delivered(self, channel: str) -> dict[str, Any] | None:
        """The last payload seen on ``channel``, from any process (``drops_repeats`` topics)."""
        return self._last.get(channel)

    def subscriber_count(self, channel: str | None = None) -> int:
        """How many local subscriptions exist (on ``channel``, or on all channels)."""
        if channel is not None:
            return len(self.subscriptions.get(channel, {}))
        return sum(len(s) for s in self.subscriptions.values())

    def connections(self) -> set[Subscriber]:
        """Every client connection registered here."""
        found: set[Subscriber] = set()
        for index in (self.by_user, self.by_session):
            for conns in index.values():
                found.update(conns)
        return found

    def notify_events_missed(self, since: float, until: float) -> int:
        """Tell every client connection that events published between ``since`` and
        ``until`` (epoch seconds) may not have reached it; return how many were told.

        The node calls this when it finds it was cut off from the channel layer.
        """
        frame = Frame(
            dumps(
                envelope(
                    MessageType.STATUS,
                    "system",
                    {
                        "event": EVENTS_MISSED,
                        "message": "Events of this period may not have reached this "
                        "connection. Subscribe again with 'since' to recover them, or fetch "
                        "the current state again.",
                        "since": iso(datetime.fromtimestamp(since, UTC)),
                        "until": iso(datetime.fromtimestamp(until, UTC)),
                    },
                )
            )
        )
        self._write_gathered()  # the events read before the notice go first
        conns = self.connections()
        for conn in conns:
            conn.deliver(frame)
        return len(conns)

    def dispatch_entry(self, entry: Entry) -> int:
        """Deliver one event read from its channel's stream (see :meth:`dispatch`); one
        that no local subscription can want is only counted, its payload not decoded."""
        if not self.wants(entry.channel, entry.host):
            self.heads[entry.channel] = entry.position
            self.stats["events"] += 1
            summary = self.summaries.get(entry.channel)
            if summary is not None:
                summary.note_entry(entry)
            return 0
        return self.dispatch(entry.channel, entry.data, entry.timestamp, entry.position)

    def wants(self, channel: str, host_id: str | None) -> bool:
        """Whether an event of ``channel`` about ``host_id`` may match a local subscription
        (topics that drop repeats always look: they remember the last payload)."""
        hosts = self._index.get(channel)
        if TOPICS[channel].drops_repeats:
            return True
        if not hosts:
            return False
        return None in hosts or (host_id is not None and host_id in hosts)

    def dispatch(
        self,
        channel: str,
        data: dict[str, Any],
        timestamp: str | None = None,
        position: StreamPosition | None = None,
    ) -> int:
        """Deliver one event to each matching local subscriber; return how many got it.

        ``position`` is the event's place on its channel's stream, sent with it so that
        clients can resume from there.
        """
        topic = TOPICS[channel]
        if position is not None:
            self.heads[channel] = position
        if topic.drops_repeats:
            if topic.repeats(self._last.get(channel), data):
                return 0
            self._last[channel] = data
        self.stats["events"] += 1
        summary = self.summaries.get(channel)
        if summary is not None:
            summary.note(data)
        hosts = self._index.get(channel)
        if not hosts:
            return 0
        if topic.scoped_figures and self.scoped_buckets(channel):
            self._figures_changed(channel, None)
        host_id = data.get("host_id")
        buckets = [hosts.get(None)] + ([hosts.get(host_id)] if host_id is not None else [])
        frames = delivered = 0
        filters_of = self.subscriptions[channel]
        resuming = self._resuming.get(channel)
        gathering = self._gathering
        if gathering is not None and (topic.extra_match or topic.per_viewer or resuming):
            self._write_gathered()
            gathering = None
        for variants in buckets:
            for key, conns in (variants or {}).items():
                if type(key) is Scoped and not key.admits(topic, host_id):
                    continue
                if gathering is not None:
                    delivered += self._gather(gathering, conns, channel, data, timestamp, position)
                    frames += 1
                    continue
                # one frame per audience (None for topics whose payload is the same for all)
                framed: dict[Any, Frame] = {}
                for conn in list(conns):
                    filters = filters_of[conn]
                    if topic.extra_match and not topic.matches(filters, data):
                        continue
                    if topic.per_viewer and topic.withholds(conn, data):
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
                                    timestamp=timestamp,
                                    position=position,
                                )
                            )
                        )
                        frames += 1
                    if (
                        resuming
                        and conn in resuming
                        and self._withheld(resuming, conn, position, frame)
                    ):
                        continue
                    conn.deliver(frame)
                    delivered += 1
        self.stats["deliveries"] += delivered
        self.deliveries[channel] += delivered
        self.stats["frames"] += frames
        return delivered

    def _gather(
        self,
        gathering: dict[int, tuple[set[Subscriber], list[Frame]]],
        conns: set[Subscriber],
        channel: str,
        data: dict[str, Any],
        timestamp: str | None,
        position: StreamPosition | None,
    ) -> int:
        """Frame an event once for a bucket whose subscribers all get the same payload,
        and add it to the bucket's gathered frames; return how many subscribers get it."""
        topic = TOPICS[channel]
        filters = self.subscriptions[channel][next(iter(conns))]
        frame = Frame(
            dumps(
                envelope(
                    MessageType.EVENT,
                    channel,
                    topic.render_for(filters, data, None),
                    timestamp=timestamp,
                    position=position,
                )
            )
        )
        pending = gathering.get(id(conns))
        if pending is None:
            gathering[id(conns)] = (conns, [frame])
        else:
            pending[1].append(frame)
        return len(conns)

    @staticmethod
    def _withheld(
        resuming: dict[Subscriber, _Resume],
        conn: Subscriber,
        position: StreamPosition | None,
        frame: Frame,
    ) -> bool:
        """Whether a resuming subscription does not get this live event now: held until
        its replay is sent, or skipped as covered by the replay."""
        pending = resuming[conn]
        if pending.held is not None:
            pending.held.append((position, frame))
            return True
        if pending.covers(position):
            return True
        del resuming[conn]  # past the replay: live from here on
        return False


def _event_frame(topic: Topic, filters: Filters, entry: Entry, audience: Hashable) -> Frame:
    """The frame of a stored event as a subscriber with ``filters`` in ``audience`` gets
    it (what :meth:`Hub.dispatch` sends live)."""
    return Frame(
        dumps(
            envelope(
                MessageType.EVENT,
                topic.name,
                topic.render_for(filters, entry.data, audience),
                timestamp=entry.timestamp,
                position=entry.position,
            )
        )
    )
