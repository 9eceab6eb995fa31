"""
Every host at once: the latest event of each host, coalesced into one summary a second.

A dashboard that shows the whole fleet's live metrics would need a socket (or a
subscription) per host, and would get a frame per report: 1,000 hosts reporting every
second are 1,000 frames a second for each such viewer.  A summarized channel
(``Topic.summarized``: ``host_metrics``) offers instead ``host_id: "*"``.  The hub of each
process keeps a :class:`HostSummary` per summarized channel: the latest payload of each
host (one dictionary store per event, whoever is subscribed), and the hosts that reported
since the last summary.  Every ``WS_FLEET_METRICS_INTERVAL`` the process sends each
all-hosts subscriber one ``event`` listing the latest payload of each of those hosts.

The cost is bounded whatever the fleet does: one frame per interval per subscriber, of at
most ``max_hosts`` hosts and ``max_bytes`` bytes of host payloads.  The hosts left out
stay due and lead the next summary, with their latest figures, so a fleet larger than one
summary is covered over a few.  The JSON of a summary is built once per payload shape
(the ``metrics`` filter) and shared by every subscriber of that shape.

Such subscriptions are not resumable: a summary has no place on the channel's stream.
Subscribing (again) brings a ``status`` snapshot of the latest payload of every host heard
from in the last :data:`LATEST_MAX_AGE` seconds, bounded like a summary.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from django.conf import settings

from sysmanage.protocol import MessageType, dumps, envelope
from sysmanage.topics import Filters, Topic
from sysmanage.transport import Frame

if TYPE_CHECKING:
    from sysmanage.streams import Entry

#: A host's latest payload is forgotten once it is this old (seconds): its host stopped
#: reporting (agents report every few seconds; the SysManage agent once a minute).
LATEST_MAX_AGE = 180.0
#: How often those are looked for (seconds).
PRUNE_INTERVAL = 60.0
#: The key of the host list in a summary's ``data``: the host payloads' JSON is spliced in
#: after it, so that each is serialized once however many summaries it goes into.
_HOSTS_MARK = '"hosts":[]'


class Recipient(Protocol):
    """What a summary is delivered to (a client connection)."""

    def deliver(self, frame: Frame) -> None:
        """Send ``frame`` without blocking."""


#: The all-hosts subscribers of one payload shape: their filters, and them.
Audience = tuple[Filters, Iterable[Recipient]]


class HostSummary:
    """The latest payload of each host on one channel, and the hosts due in the next
    summary (those that reported since the last one, in the order they first did)."""

    __slots__ = ("channel", "due", "latest", "now", "pruned_at", "stats", "topic")

    def __init__(self, topic: Topic) -> None:
        self.topic = topic
        self.channel = topic.name
        #: host_id -> (latest payload, when it came: the ``now`` of then); an event read
        #: from a stream is kept as its entry, decoded only if a summary takes it
        self.latest: dict[str, tuple[dict[str, Any] | Entry, float]] = {}
        #: host_id -> None: an ordered set of the hosts not yet in a summary
        self.due: dict[str, None] = {}
        #: the time of the last summary (``time.monotonic()``, or as given to :meth:`send`)
        self.now = self.pruned_at = time.monotonic()
        self.stats = {"summaries": 0, "frames": 0, "deliveries": 0, "hosts": 0, "truncated": 0}

    def note(self, data: dict[str, Any]) -> None:
        """Called by the hub with each event of the channel: keep it as its host's latest."""
        host_id = data.get("host_id")
        if host_id is not None:
            self.latest[host_id] = (data, self.now)
            self.due[host_id] = None

    def note_entry(self, entry: Entry) -> None:
        """Like :meth:`note`, for an event read from its stream that the hub did not
        decode: kept as it is (a host reporting every second is decoded at most once per
        summary it goes into, not once per report)."""
        host_id = entry.host
        if host_id is not None:
            self.latest[host_id] = (entry, self.now)
            self.due[host_id] = None

    def _payload(self, host_id: str) -> dict[str, Any]:
        kept = self.latest[host_id][0]
        return kept if isinstance(kept, dict) else kept.data

    def send(
        self,
        audiences: list[Audience],
        *,
        max_hosts: int,
        max_bytes: int,
        now: float | None = None,
    ) -> int:
        """Send each audience the summary of the hosts due (if any); return how many
        subscribers got one.  Without subscribers the due hosts are simply forgotten."""
        self.now = now = time.monotonic() if now is None else now
        if now - self.pruned_at >= PRUNE_INTERVAL:
            self._forget_stale(now)
        if not audiences:
            self.due.clear()
            return 0
        if not self.due:
            return 0
        count = len(self.due)
        chosen, texts = self._take(list(self.due), max_hosts, max_bytes)
        for host_id in chosen:
            del self.due[host_id]
        extra = {"count": count, "truncated": bool(self.due)}
        sent = 0
        for filters, recipients in audiences:
            frame = self._frame(MessageType.EVENT, filters, chosen, texts, extra, None)
            self.stats["frames"] += 1
            for recipient in recipients:
                recipient.deliver(frame)
                sent += 1
        self.stats["summaries"] += 1
        self.stats["deliveries"] += sent
        self.stats["hosts"] += len(chosen)
        self.stats["truncated"] += bool(self.due)
        return sent

    def snapshot(
        self, filters: Filters, *, max_hosts: int, max_bytes: int, id_: str | int | None
    ) -> Frame:
        """The ``status`` a new all-hosts subscriber gets: the latest payload of every host
        heard from lately, the most recent first, bounded like a summary."""
        horizon = self.now - LATEST_MAX_AGE
        recent = [host for host, (_, at) in self.latest.items() if at >= horizon]
        recent.sort(key=lambda host: -self.latest[host][1])
        chosen, texts = self._take(recent, max_hosts, max_bytes)
        extra = {"count": len(recent), "truncated": len(chosen) < len(recent)}
        return self._frame(MessageType.STATUS, filters, chosen, texts, extra, id_)

    def _take(
        self, hosts: list[str], max_hosts: int, max_bytes: int
    ) -> tuple[list[str], dict[str, str]]:
        """The first of ``hosts`` whose payloads fit the bounds, and their full JSON."""
        chosen: list[str] = []
        texts: dict[str, str] = {}
        size = 0
        for host_id in hosts[:max_hosts]:
            text = dumps(self._payload(host_id))
            size += len(text) + 1  # ASCII, and a comma
            if size > max_bytes:
                break
            chosen.append(host_id)
            texts[host_id] = text
        return chosen, texts

    def _frame(
        self,
        type_: str,
        filters: Filters,
        hosts: list[str],
        texts: dict[str, str],
        extra: dict[str, Any],
        id_: str | int | None,
    ) -> Frame:
        """One message listing ``hosts``' payloads as a subscriber with ``filters`` gets
        them: the full JSON in ``texts`` when the filters trim nothing."""
        topic = self.topic
        if topic.variant(filters) is None:
            parts = [texts[host] for host in hosts]
        else:
            parts = [dumps(topic.render(filters, self._payload(host))) for host in hosts]
        head = dumps(envelope(type_, self.channel, {"hosts": [], **extra}, id_=id_))
        cut = head.index(_HOSTS_MARK) + len(_HOSTS_MARK) - 1  # inside the brackets
        return Frame(head[:cut] + ",".join(parts) + head[cut:])

    def _forget_stale(self, now: float) -> None:
        """Drop the payloads of hosts that stopped reporting."""
        self.pruned_at = now
        horizon = now - LATEST_MAX_AGE
        for host_id in [h for h, (_, at) in self.latest.items() if at < horizon]:
            del self.latest[host_id]
            self.due.pop(host_id, None)


class Summarizing(Protocol):
    """What the periodic job needs of the hub."""

    def send_summaries(self, *, max_hosts: int, max_bytes: int) -> int:
        """Send every all-hosts subscriber its summary; return how many got one."""


async def send_summaries(hub: Summarizing) -> None:
    """Periodic job (every ``WS_FLEET_METRICS_INTERVAL``): send the summaries."""
    hub.send_summaries(
        max_hosts=settings.WS_FLEET_METRICS_MAX_HOSTS,
        max_bytes=settings.WS_FLEET_METRICS_MAX_BYTES,
    )
