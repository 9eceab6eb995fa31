"""
Fleet status: the fleet-wide counts on the ``fleet_status`` channel.

Services call :func:`fleet_changed` whenever a count may have moved.  In a server
process a :class:`FleetCoalescer` turns those calls into at most one recomputation per
``FLEET_STATUS_MIN_INTERVAL`` and publishes only when a figure really changed; in any
other process (a management command) the figures are published at once.  The counts
are always read from the database, so they stay right across processes and restarts.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import time
import weakref
from typing import Any

from django.conf import settings
from django.db import transaction

from sysmanage import dbgate
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.events import Event, publish_now
from sysmanage.hub import Hub
from sysmanage.node import Node
from sysmanage.permissions import HostScope
from sysmanage.protocol import MessageType, dumps, envelope
from sysmanage.topics import NOBODY, TOPICS, Viewer, snapshot_provider
from sysmanage.transport import Frame

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FleetStatusUpdated(Event):
    """The fleet's counts changed."""

    channel = "fleet_status"
    name = "fleet.status_updated"

    total_hosts: int
    online_hosts: int
    offline_hosts: int
    #: of the offline hosts, those never heard from (an extension of the protocol)
    unknown_hosts: int
    hosts_with_alerts: int
    pending_operations: int
    #: hosts with at least one pending security update
    hosts_with_security_updates: int
    #: hosts whose agent last reported that they need a reboot
    hosts_needing_reboot: int
    last_updated: str


def fleet_stats(scope: HostScope = None) -> dict[str, Any]:
    """The current counts, from the provider the apps registered (database reads): over
    every host (as no one in particular), or over the hosts of ``scope``."""
    provider = snapshot_provider("fleet_status")
    if provider is None:
        raise RuntimeError("no fleet_status snapshot provider is registered")
    return provider({}, NOBODY if scope is None else Viewer(None, scope=scope))


def figures_by_scope(scopes: set[frozenset[str]]) -> dict[frozenset[str], dict[str, Any]]:
    """The counts over each of ``scopes`` (database thread; a few queries per scope)."""
    return {scope: fleet_stats(scope) for scope in scopes}


def fleet_changed() -> None:
    """Note, after the current transaction commits, that fleet counts may have changed."""
    transaction.on_commit(_request_update)


def _request_update() -> None:
    node = Node.current()
    if node is not None and node.accepts_messages():
        if node.owns_current_thread():
            coalescer_for(node).request()
        else:  # the coalescer is made and used on the node's loop only
            node.call_soon_threadsafe(lambda: coalescer_for(node).request())
        return
    publish_now(FleetStatusUpdated(**fleet_stats()))


class _AtMostEveryInterval:
    """Runs :meth:`work` soon after a request, at most once per
    ``FLEET_STATUS_MIN_INTERVAL`` on the node's loop, merging requests made meanwhile."""

    #: what a failed run logs
    failure = "could not compute fleet status"

    def __init__(self, node: Node) -> None:
        self.node = node
        self._last_time = 0.0
        self._pending = False

    def _schedule(self) -> None:
        if self._pending:
            return
        self._pending = True
        interval = settings.FLEET_STATUS_MIN_INTERVAL
        delay = max(0.0, self._last_time + interval - time.monotonic())
        self.node.loop.call_later(
            delay, lambda: self.node.spawn(self._run()), context=contextvars.Context()
        )

    async def _run(self) -> None:
        self._pending = False
        self._last_time = time.monotonic()
        try:
            await self.work()
        except Exception:
            dbgate.log_exception(logger, self.failure)

    async def work(self) -> object:
        """What a run does."""
        raise NotImplementedError


class FleetCoalescer(_AtMostEveryInterval):
    """Publishes fleet status when it changes, at most once per interval per process."""

    def request(self) -> None:
        """Note that fleet figures may have changed; recompute them soon (on the loop)."""
        self._schedule()

    async def work(self) -> bool:
        """A run: :meth:`publish_if_changed`."""
        return await self.publish_if_changed()

    async def publish_if_changed(self) -> bool:
        """Recompute the counts and publish them if they differ from the last ones seen
        on the channel, from any process."""
        stats = await database_sync_to_async(fleet_stats)()
        if TOPICS["fleet_status"].repeats(self.node.hub.last_delivered("fleet_status"), stats):
            return False
        self.node.enqueue_publish(FleetStatusUpdated(**stats).to_message())
        return True


class ScopedFigures(_AtMostEveryInterval):
    """Fleet figures for the ``fleet_status`` subscribers of this process who see only some
    hosts: whenever the fleet-wide figures change (or a subscriber moves to a scope),
    each scope's are counted over its hosts, at most once per ``FLEET_STATUS_MIN_INTERVAL``,
    and sent to its subscribers when they differ from the last sent there.  Subscribers
    with the same grants share one count and one frame."""

    channel = "fleet_status"
    failure = "could not compute fleet status for scoped viewers"

    def __init__(self, node: Node) -> None:
        super().__init__(node)
        #: scope -> the figures last sent to its subscribers
        self._sent: dict[frozenset[str], dict[str, Any]] = {}

    def request(self, channel: str, newcomer: frozenset[str] | None = None) -> None:
        """Count the scoped figures again soon (``newcomer``: a scope whose subscribers
        get them even if unchanged)."""
        if newcomer is not None:
            self._sent.pop(newcomer, None)
        self._schedule()

    async def work(self) -> int:
        """A run: :meth:`send`."""
        return await self.send()

    async def send(self) -> int:
        """Count and send; return how many subscribers got figures."""
        hub = self.node.hub
        scopes = {key.scope for key, _ in hub.scoped_buckets(self.channel)}
        self._sent = {scope: sent for scope, sent in self._sent.items() if scope in scopes}
        if not scopes:
            return 0
        figures = await database_sync_to_async(figures_by_scope)(scopes)
        topic = TOPICS[self.channel]
        delivered = 0
        for key, conns in hub.scoped_buckets(self.channel):  # as they are now
            stats = figures.get(key.scope)
            if stats is None or topic.repeats(self._sent.get(key.scope), stats):
                continue
            # at the channel's place that the fleet-wide figures they follow had
            frame = Frame(
                dumps(
                    envelope(
                        MessageType.EVENT, self.channel, stats, position=hub.head(self.channel)
                    )
                )
            )
            for conn in list(conns):
                conn.deliver(frame)
            delivered += len(conns)
        for scope, stats in figures.items():
            self._sent[scope] = stats
        return delivered


_COALESCERS: weakref.WeakKeyDictionary[Node, FleetCoalescer] = weakref.WeakKeyDictionary()
_SCOPED: weakref.WeakKeyDictionary[Node, ScopedFigures] = weakref.WeakKeyDictionary()


def on_figures_changed(hub: Hub, channel: str, newcomer: frozenset[str] | None) -> None:
    """Hub listener (:data:`sysmanage.hub.FIGURES_LISTENERS`): count the figures of the
    subscribers who see only some hosts again, in the process whose hub it is."""
    node = Node.current()
    if node is not None and node.hub is hub:
        scoped_figures_for(node).request(channel, newcomer)


def scoped_figures_for(node: Node) -> ScopedFigures:
    """The scoped fleet figures of ``node``'s process."""
    scoped = _SCOPED.get(node)
    if scoped is None:
        scoped = _SCOPED[node] = ScopedFigures(node)
    return scoped


def coalescer_for(node: Node) -> FleetCoalescer:
    """The fleet coalescer of ``node``'s process."""
    coalescer = _COALESCERS.get(node)
    if coalescer is None:
        coalescer = _COALESCERS[node] = FleetCoalescer(node)
    return coalescer
