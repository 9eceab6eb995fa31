"""
One host's conversation with its SysManage agent, whichever transport carries it.

:class:`AgentSession` checks each message, proves the agent's identity (``host_id`` and
``host_token`` in ``data``: the connection token alone is handed to anyone who names
the host), feeds the product's services, and returns what to send back.  The socket
consumer keeps one session per connection; the polling view makes one per request.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

from hosts import services
from hosts.events import HostMetricsReported
from hosts.models import Host, HostInventory, InventoryKind
from hosts.smagent import deliveries, enrollment, protocol
from hosts.smagent.protocol import AgentProtocolError
from sysmanage.events import publish_control_now, publish_now
from sysmanage.protocol import iso

logger = logging.getLogger(__name__)

INVENTORY_TYPES = {
    "os_version_update": InventoryKind.OS,
    "hardware_update": InventoryKind.HARDWARE,
    "software_inventory_update": InventoryKind.SOFTWARE,
    "package_updates_update": InventoryKind.UPDATES,
}
#: Messages held while a connection has not proved its identity yet.
MAX_HELD = 100
MAX_HELD_BYTES = 8 * 1024 * 1024


def _load_mounts(host_id: str) -> list[str]:
    row = HostInventory.objects.filter(host_id=host_id, kind=InventoryKind.HARDWARE).first()
    return protocol.mounts_from_hardware(row.data) if row is not None else []


class AgentSession:
    """What the server knows of one agent connection (or one poll)."""

    def __init__(self, host: Host, *, polled: bool) -> None:
        self.host = host
        self.host_id = str(host.id)
        self.hostname = host.hostname
        self.cpu_count = host.cpu_count
        self.polled = polled
        self.verified = False
        self.refusals = 0
        self.held: list[tuple[str, str, dict[str, Any]]] = []
        self.held_bytes = 0
        self.mounts: list[str] | None = None
        self.last_seen = services.LastSeen(self.host_id)

    # -- identity ------------------------------------------------------------------------

    def _identify(self, message_type: str, message_id: str, data: dict[str, Any]) -> bool:
        """Check the identity a message claims: True if it may be processed now, False if
        it is the host's but must wait for proof; refused if it claims another identity.

        The agent sends ``host_token`` only in messages to which it added ``host_id``
        itself; ``system_info``, ``hardware_update`` and some others name the host alone.
        Those are held until a message with both proves the connection.
        """
        claimed_id, claimed_token = data.get("host_id"), data.get("host_token")
        if claimed_token is None and claimed_id is not None and str(claimed_id) == self.host_id:
            return self.verified
        if claimed_id is None and claimed_token is None:
            if self.verified:
                return True
            why = "Identify with host_id and host_token first"
        elif str(claimed_id) != self.host_id:
            why = "This host is not registered here (unknown host_id)"
        elif not enrollment.host_token_matches(self.host, claimed_token):
            why = "This host is not registered here (host_token does not match)"
        else:
            self.verified = True
            return True
        self.refusals += 1
        raise AgentProtocolError("host_not_registered", why, message_type=message_type,
                                 message_id=message_id)

    # -- handling ------------------------------------------------------------------------

    async def handle(self, raw: dict[str, Any],
                     size: int = 0) -> tuple[list[dict[str, Any]], bool]:
        """Handle one message: ``(replies, first_proof)``; ``first_proof`` is True when
        this message proved the agent's identity for the first time (the messages held
        until then are handled with it)."""
        message_type, message_id, data = protocol.check_envelope(raw, polled=self.polled)
        if message_type == "command_acknowledgment":
            await database_sync_to_async(deliveries.acknowledge)(
                host_id=self.host_id, delivery_id=message_id)
            return [], False
        was_verified = self.verified
        if not self._identify(message_type, message_id, data):
            self._hold(message_type, message_id, data, size)
            return [], False
        replies = await self._process(message_type, message_id, data)
        if was_verified:
            return replies, False
        return replies + await self.release_held(), True

    def _hold(self, message_type: str, message_id: str, data: dict[str, Any],
              size: int) -> None:
        if len(self.held) >= MAX_HELD or self.held_bytes + size > MAX_HELD_BYTES:
            logger.warning("agent of %s: %s not processed, too many messages before it "
                           "proved its identity", self.hostname, message_type)
            raise AgentProtocolError(
                "identification_pending", "Not processed: too many messages before one with "
                "host_id and host_token", message_type=message_type, message_id=message_id)
        self.held.append((message_type, message_id, data))
        self.held_bytes += size

    async def release_held(self) -> list[dict[str, Any]]:
        """Handle the messages held for proof (once it came, or when the transport trusts
        the host anyway)."""
        held, self.held, self.held_bytes = self.held, [], 0
        replies: list[dict[str, Any]] = []
        for message_type, message_id, data in held:
            try:
                replies += await self._process(message_type, message_id, data)
            except AgentProtocolError as exc:
                replies.append(exc.to_message())
        return replies

    def refuse_held(self) -> list[dict[str, Any]]:
        """Errors for the held messages of a poll that never proved its identity."""
        held, self.held, self.held_bytes = self.held, [], 0
        return [protocol.error_message(
            "identification_pending", "Not processed: send it with host_token, or together "
            "with a message that has host_id and host_token", message_type=message_type,
            message_id=message_id) for message_type, message_id, _ in held]

    async def _process(self, message_type: str, message_id: str,
                       data: dict[str, Any]) -> list[dict[str, Any]]:
        handler = self.HANDLERS.get(message_type)
        replies: list[dict[str, Any]] = []
        if handler is not None:
            replies += await handler(self, data, message_id)
        replies.append(protocol.ack_message(message_id))
        return replies

    async def on_system_info(self, data: dict[str, Any], message_id: str) -> list[dict[str, Any]]:
        """Facts about the host: stored (the first one on a connection also comes online)."""
        await database_sync_to_async(services.host_update_facts)(
            host_id=self.host_id, facts=protocol.facts_from_system_info(data))
        await self.seen()
        return []

    async def on_heartbeat(self, data: dict[str, Any], message_id: str) -> list[dict[str, Any]]:
        """The agent is alive."""
        await self.seen()
        return []

    async def on_command_result(self, data: dict[str, Any],
                                message_id: str) -> list[dict[str, Any]]:
        """A command's result: stored once, whether it comes before the ack or after."""
        await database_sync_to_async(deliveries.record_result)(host_id=self.host_id, data=data)
        await self.seen()
        return []

    async def on_custom_metric_samples(self, data: dict[str, Any],
                                       message_id: str) -> list[dict[str, Any]]:
        """Samples of the metric scripts: published as ``host_metrics``, kept per minute."""
        metrics = protocol.metrics_from_samples(data.get("samples"))
        if metrics is not None:
            now = timezone.now()
            publish_now(HostMetricsReported(host_id=self.host_id, hostname=self.hostname,
                                            timestamp=iso(now) or "", metrics=metrics,
                                            cpu_count=self.cpu_count))
            averages = {key: metrics.get(key) for key in ("cpu_usage", "memory_usage")}
            averages["disk_usage"] = metrics.get("disk_usage") or {}
            averages["load_average"] = metrics.get("load_average") or []
            await database_sync_to_async(services.metric_sample_save)(
                host_id=self.host_id, minute=now.replace(second=0, microsecond=0), samples=1,
                averages=averages)
        await self.seen()
        return []

    async def on_inventory(self, message_type: str, data: dict[str, Any]) -> list[dict[str, Any]]:
        """An inventory report: stored as the host's latest of its kind."""
        kind = INVENTORY_TYPES[message_type]
        facts: dict[str, Any] = {}
        if kind == InventoryKind.OS:
            facts = protocol.facts_from_system_info(data)
        elif kind == InventoryKind.HARDWARE:
            facts = protocol.facts_from_hardware(data)
            self.cpu_count = facts.get("cpu_count", self.cpu_count)
        stored = protocol.storable({k: v for k, v in data.items()
                                    if k not in ("host_id", "host_token")})
        await database_sync_to_async(services.host_inventory_save)(
            host_id=self.host_id, kind=kind, data=stored,
            item_count=protocol.inventory_items(kind, data), facts=facts,
            digest=protocol.digest(stored))
        await self.seen()
        if kind == InventoryKind.HARDWARE:
            mounts = protocol.mounts_from_hardware(data)
            if mounts and mounts != self.mounts:
                return [self.metrics_command(mounts)]
        return []

    HANDLERS: dict[str, Any] = {
        "system_info": on_system_info,
        "heartbeat": on_heartbeat,
        "command_result": on_command_result,
        "custom_metric_samples": on_custom_metric_samples,
        **{name: (lambda self, data, message_id, _name=name: self.on_inventory(_name, data))
           for name in INVENTORY_TYPES},
    }

    # -- what the server sends ---------------------------------------------------------------

    def metrics_command(self, mounts: list[str]) -> dict[str, Any]:
        """``sync_custom_metrics`` with the scripts behind live metrics."""
        mounts = list(mounts) or ["/"]
        self.mounts = mounts
        return protocol.command_message(
            str(uuid.uuid4()), "sync_custom_metrics",
            {"metrics": protocol.metric_definitions(
                mounts, settings.SYSMANAGE_AGENT_METRICS_CADENCE)}, 60)

    async def initial_metrics_command(self) -> dict[str, Any]:
        """The metrics set for a newly proven connection (mounts from the last hardware
        report, or ``/`` until one arrives)."""
        mounts = await database_sync_to_async(_load_mounts)(self.host_id)
        return self.metrics_command(mounts)

    async def due_commands(self, *, resend_all: bool = False) -> list[dict[str, Any]]:
        """Queued commands to send now; each is confirmed to its requester as taken."""
        due = await database_sync_to_async(deliveries.take_due)(self.host_id,
                                                                 resend_all=resend_all)
        for item in due:
            publish_control_now("agent_took", ref=item.ref, host_id=self.host_id)
        return [item.message for item in due]

    async def seen(self) -> None:
        """The agent was heard from."""
        await self.last_seen.touch()
