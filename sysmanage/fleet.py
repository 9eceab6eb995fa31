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
from sysmanage.node import Node
from sysmanage.topics import NOBODY, TOPICS, snapshot_provider

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


def fleet_stats() -> dict[str, Any]:
    """The current counts, from the provider the apps registered (database reads; the
    same for every subscriber, so read as no one in particular)."""
    provider = snapshot_provider("fleet_status")
    if provider is None:
        raise RuntimeError("no fleet_status snapshot provider is registered")
    return provider({}, NOBODY)


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


class FleetCoalescer:
    """Publishes fleet status when it changes, at most once per interval per process."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._last_time = 0.0
        self._pending = False

    def request(self) -> None:
        """Note that fleet figures may have changed; recompute them soon (on the loop)."""
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
            await self.publish_if_changed()
        except Exception:
            dbgate.log_exception(logger, "could not compute fleet status")

    async def publish_if_changed(self) -> bool:
        """Recompute the counts and publish them if they differ from the last ones seen
        on the channel, from any process."""
        stats = await database_sync_to_async(fleet_stats)()
        if TOPICS["fleet_status"].repeats(self.node.hub.last_delivered("fleet_status"), stats):
            return False
        self.node.enqueue_publish(FleetStatusUpdated(**stats).to_message())
        return True


_COALESCERS: weakref.WeakKeyDictionary[Node, FleetCoalescer] = weakref.WeakKeyDictionary()


def coalescer_for(node: Node) -> FleetCoalescer:
    """The fleet coalescer of ``node``'s process."""
    coalescer = _COALESCERS.get(node)
    if coalescer is None:
        coalescer = _COALESCERS[node] = FleetCoalescer(node)
    return coalescer
