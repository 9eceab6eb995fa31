"""
Fleet status: the fleet-wide counts on the ``fleet_status`` channel.

Services call :func:`fleet_changed` whenever a count may have moved.  In a server
process the hub coalesces those calls to at most one recomputation per
``FLEET_STATUS_MIN_INTERVAL`` and publishes only when a figure really changed; in any
other process (a management command) the figures are published at once.  The counts
are always read from the database, so they stay right across processes and restarts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from channels.db import database_sync_to_async
from django.db import transaction

from sysmanage.events import Event, send_to_hubs
from sysmanage.topics import snapshot_provider


@dataclasses.dataclass(frozen=True, kw_only=True)
class FleetStatusUpdated(Event):
    """The fleet's counts changed."""

    channel = "fleet_status"
    name = "fleet.status_updated"

    total_hosts: int
    online_hosts: int
    offline_hosts: int
    hosts_with_alerts: int
    pending_operations: int
    last_updated: str


def fleet_stats() -> dict[str, Any]:
    """The current counts, from the provider the apps registered (database reads)."""
    provider = snapshot_provider("fleet_status")
    if provider is None:
        raise RuntimeError("no fleet_status snapshot provider is registered")
    return dict(provider({}))


def same_figures(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    """Whether two fleet statuses have the same figures (``last_updated`` aside)."""
    if a is None:
        return False
    return all(a.get(k) == v for k, v in b.items() if k != "last_updated")


def fleet_changed() -> None:
    """Note, after the current transaction commits, that fleet counts may have changed."""
    transaction.on_commit(_request_update)


def _request_update() -> None:
    from sysmanage.hub import Hub

    hub = Hub.current()
    if hub is not None and hub.accepts_messages():
        if hub.owns_current_thread():
            hub.fleet.request()
        else:
            hub.call_soon_threadsafe(hub.fleet.request)
        return
    send_to_hubs(FleetStatusUpdated(**fleet_stats()).to_message())


async def apublish_if_changed(last_sent: dict[str, Any] | None) -> bool:
    """Recompute the counts and publish them if they differ from ``last_sent``."""
    from sysmanage.hub import Hub

    stats = await database_sync_to_async(fleet_stats)()
    if same_figures(last_sent, stats):
        return False
    hub = await Hub.for_running_loop()
    hub.enqueue_publish(FleetStatusUpdated(**stats).to_message())
    return True
