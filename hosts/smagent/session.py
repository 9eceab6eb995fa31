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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from django.conf import settings
from django.utils import timezone

from hosts import certificates, patching, services
from hosts.agent_protocol import HostFacts
from hosts.events import AgentTook
from hosts.metrics import MinuteAverages
from hosts.models import Host, HostInventory, InventoryKind
from hosts.smagent import deliveries, enrollment, inventory, protocol
from hosts.smagent.protocol import (
    AgentProtocolError,
    CommandMessage,
    MessageData,
    RawMessage,
    ServerMessage,
)
from sysmanage import metrics
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.events import publish_control_now

logger = logging.getLogger(__name__)

INVENTORY_TYPES = {
    "os_version_update": InventoryKind.OS,
    "hardware_update": InventoryKind.HARDWARE,
    "software_inventory_update": InventoryKind.SOFTWARE,
    "package_updates_update": InventoryKind.UPDATES,
    "user_access_update": InventoryKind.USERS,
    "role_data": InventoryKind.SERVICES,
}


def _take_due(host_id: str, resend_all: bool) -> tuple[list[deliveries.Outgoing], bool]:
    """The queued commands due, and whether a check of updates asked for is due (one
    trip to the database threads)."""
    return (
        deliveries.take_due(host_id, resend_all=resend_all),
        services.host_updates_check_take(host_id=host_id),
    )


def _load_mounts(host_id: str) -> list[str]:
    row = HostInventory.objects.filter(host_id=host_id, kind=InventoryKind.HARDWARE).first()
    return protocol.mounts_from_hardware(row.data) if row is not None else []


class HeldBytes:
    """The bytes of messages held for proof by every connection of this process, so
    that many unproven connections together stay within a budget too."""

    total = 0

    @classmethod
    def reserve(cls, size: int) -> bool:
        """Count ``size`` more bytes, if the budget allows it."""
        if cls.total + size > settings.SYSMANAGE_AGENT_HELD_BYTES_TOTAL:
            return False
        cls.total += size
        return True

    @classmethod
    def release(cls, size: int) -> None:
        """Give ``size`` bytes back."""
        cls.total = max(0, cls.total - size)


@dataclass(frozen=True)
class Held:
    """A message received before the connection proved its identity: its frame as it
    came (parsed only once proof arrives), or the message of a poll."""

    text: str | None
    raw: RawMessage | None
    size: int


#: How the session handles one type of message: the replies to send besides the ack.
Handler = Callable[["AgentSession", MessageData, str], Awaitable[list[ServerMessage]]]


def _inventory_handler(message_type: str) -> Handler:
    async def handle(
        session: AgentSession, data: MessageData, message_id: str
    ) -> list[ServerMessage]:
        return await session.on_inventory(message_type, data)

    return handle


class AwaitingApproval(AgentProtocolError):
    """The agent holds the token of a re-registration staff have not approved yet."""


class AgentSession:
    """What the server knows of one agent connection (or one poll).

    It speaks for no host until a message proves one: ``host_id`` and ``host_token`` of
    a host that the name its connection token was issued for may be.  Until then nothing
    it sends changes anything, it gets no command, and its messages are held, within a
    budget, and handled in order once proof comes.
    """

    def __init__(self, name: str, *, polled: bool, candidates: set[str]) -> None:
        self.name = name
        self.candidates = candidates
        self.polled = polled
        self.host: Host | None = None
        self.host_id = ""
        self.hostname = name
        self.token_hash = ""
        self.cpu_count: int | None = None
        self.refusals = 0
        self.held: list[Held] = []
        self.held_bytes = 0
        self.mounts: list[str] | None = None
        self.last_seen: services.LastSeen | None = None

    @property
    def verified(self) -> bool:
        """Whether a message proved whose agent this is."""
        return self.host is not None

    def bind(self, host: Host) -> None:
        """Speak for ``host`` from now on (it was proven, or the transport trusts it)."""
        self.host, self.host_id, self.hostname = host, str(host.id), host.hostname
        self.token_hash, self.cpu_count = host.token_hash, host.cpu_count
        self.last_seen = services.LastSeen(self.host_id)

    # -- identity ------------------------------------------------------------------------

    def _refuse(self, why: str, message_type: str, message_id: str) -> AgentProtocolError:
        self.refusals += 1
        return AgentProtocolError(
            "host_not_registered", why, message_type=message_type, message_id=message_id
        )

    async def _prove(self, message_type: str, message_id: str, data: MessageData) -> bool:
        """Before proof: True if this message proves the connection; False if it must be
        held (it names no identity, or only a ``host_id`` it may prove later); refused
        if it claims an identity this connection cannot have.

        The agent adds ``host_token`` only to messages to which it adds ``host_id``
        itself: ``system_info`` and others name the host alone, and its periodic
        ``os_version_update`` names nothing.  Its ``pong`` always carries what it has.
        """
        claimed_id, claimed_token = data.get("host_id"), data.get("host_token")
        if claimed_id is not None and str(claimed_id) not in self.candidates:
            raise self._refuse(
                "This host is not registered here (unknown host_id)", message_type, message_id
            )
        if claimed_token is None:
            if claimed_id is None and message_type == "pong":
                # The answer to the server's ping carries whatever identity the agent
                # holds: none at all means it lost it.  Telling it so is what makes it
                # register again (after three such errors).
                raise self._refuse(
                    "This agent sent no host_id and host_token; it is not registered here",
                    message_type,
                    message_id,
                )
            return False
        if claimed_id is None:
            raise self._refuse("Send host_token together with host_id", message_type, message_id)
        proof = await database_sync_to_async(enrollment.prove)(
            name=self.name, host_id=claimed_id, host_token=claimed_token
        )
        if proof is enrollment.Proof.AWAITING_APPROVAL:
            raise AwaitingApproval(
                "host_not_approved",
                "This host's registration is waiting for approval by an administrator",
                message_type=message_type,
                message_id=message_id,
            )
        if not isinstance(proof, Host):
            raise self._refuse(
                "This host is not registered here (host_token does not match)",
                message_type,
                message_id,
            )
        self.bind(proof)
        return True

    def _check_claim(self, message_type: str, message_id: str, data: MessageData) -> None:
        """After proof: a message may name this host (or nothing), never another."""
        claimed_id, claimed_token = data.get("host_id"), data.get("host_token")
        assert self.host is not None
        if claimed_id is not None and str(claimed_id) != self.host_id:
            raise self._refuse(
                "This host is not registered here (unknown host_id)", message_type, message_id
            )
        if claimed_token is not None and not enrollment.host_token_matches(
            self.host, claimed_token
        ):
            raise self._refuse(
                "This host is not registered here (host_token does not match)",
                message_type,
                message_id,
            )

    # -- handling ------------------------------------------------------------------------

    async def receive_text(self, text: str, size: int) -> tuple[list[ServerMessage], bool]:
        """Handle one frame of the socket (``size`` bytes), as :meth:`handle` does.
        Before proof a large frame is held as it came, unparsed: parsing megabytes for a
        connection that may be anybody's is work (and memory) an attacker could make the
        server do."""
        if not self.verified and size > settings.SYSMANAGE_AGENT_UNPROVEN_PARSE_BYTES:
            self._hold(Held(text, None, size), "", "")
            return [], False
        return await self.handle(protocol.decode(text), text=text, size=size)

    async def handle(
        self, raw: RawMessage, *, text: str | None = None, size: int = 0
    ) -> tuple[list[ServerMessage], bool]:
        """Handle one message: ``(replies, first_proof)``; ``first_proof`` is True when
        this message proved the agent's identity (the messages held until then are
        handled with it)."""
        message_type, message_id, data = protocol.check_envelope(raw, polled=self.polled)
        metrics.agent_message("sysmanage_agent", message_type)
        if self.verified:
            self._check_claim(message_type, message_id, data)
            return await self._process(message_type, message_id, data), False
        if not await self._prove(message_type, message_id, data):
            held = Held(text, None, size) if text is not None else Held(None, raw, size)
            self._hold(held, message_type, message_id)
            return [], False
        # The held messages were sent first: they are handled first.
        replies = await self.release_held()
        return replies + await self._process(message_type, message_id, data), True

    def _hold(self, held: Held, message_type: str, message_id: str) -> None:
        if (
            len(self.held) >= settings.SYSMANAGE_AGENT_HELD_MESSAGES
            or self.held_bytes + held.size > settings.SYSMANAGE_AGENT_HELD_BYTES
            or not HeldBytes.reserve(held.size)
        ):
            logger.warning(
                "agent of %s: %s not processed, too much sent before it proved its identity",
                self.name,
                message_type or "a large frame",
            )
            ids = {"message_type": message_type, "message_id": message_id} if message_type else {}
            raise AgentProtocolError(
                "identification_pending",
                "Not processed: too much sent before a message with host_id and host_token",
                **ids,
            )
        self.held.append(held)
        self.held_bytes += held.size

    def _take_held(self) -> list[Held]:
        held, self.held = self.held, []
        HeldBytes.release(self.held_bytes)
        self.held_bytes = 0
        return held

    async def release_held(self) -> list[ServerMessage]:
        """Handle the messages held for proof, in order, once it came."""
        replies: list[ServerMessage] = []
        for held in self._take_held():
            try:
                raw = held.raw if held.raw is not None else protocol.decode(held.text or "")
                answers, _ = await self.handle(raw)
                replies += answers
            except AgentProtocolError as exc:
                replies.append(exc.to_message())
        return replies

    def refuse_held(self) -> list[ServerMessage]:
        """Errors for the held messages of a poll (or a closing connection) that never
        proved its identity: they were not processed, and the agent is told so."""
        return [
            protocol.error_message(
                "identification_pending",
                "Not processed: send it with host_token, or together "
                "with a message that has host_id and host_token",
                **_ids(held),
            )
            for held in self._take_held()
        ]

    async def _process(
        self, message_type: str, message_id: str, data: MessageData
    ) -> list[ServerMessage]:
        if message_type == "command_acknowledgment":  # acknowledged by not resending
            await database_sync_to_async(deliveries.acknowledge)(
                host_id=self.host_id, delivery_id=message_id
            )
            return []
        handler = self.HANDLERS.get(message_type)
        replies: list[ServerMessage] = []
        if handler is not None:
            replies += await handler(self, data, message_id)
        replies.append(protocol.ack_message(message_id))
        return replies

    async def on_system_info(self, data: MessageData, message_id: str) -> list[ServerMessage]:
        """Facts about the host: stored (the first one on a connection also comes online)."""
        await database_sync_to_async(services.host_update_facts)(
            host_id=self.host_id, facts=protocol.facts_from_system_info(data)
        )
        self.seen()
        return []

    async def on_heartbeat(self, data: MessageData, message_id: str) -> list[ServerMessage]:
        """The agent is alive."""
        self.seen()
        return []

    async def on_command_result(self, data: MessageData, message_id: str) -> list[ServerMessage]:
        """A command's result: stored once, whether it comes before the ack or after."""
        await database_sync_to_async(deliveries.record_result)(host_id=self.host_id, data=data)
        self.seen()
        return []

    async def on_custom_metric_samples(
        self, data: MessageData, message_id: str
    ) -> list[ServerMessage]:
        """Samples of the metric scripts: published as ``host_metrics``, kept per minute."""
        metrics = protocol.metrics_from_samples(data.get("samples"))
        if metrics is not None:
            now = timezone.now()
            services.host_metrics_publish(
                host_id=self.host_id,
                hostname=self.hostname,
                metrics=metrics,
                cpu_count=self.cpu_count,
                at=now,
            )
            averages: MinuteAverages = {
                "cpu_usage": metrics.get("cpu_usage"),
                "memory_usage": metrics.get("memory_usage"),
                "disk_usage": metrics.get("disk_usage") or {},
                "load_average": metrics.get("load_average") or [],
            }
            await database_sync_to_async(services.metric_sample_save)(
                host_id=self.host_id,
                minute=now.replace(second=0, microsecond=0),
                samples=1,
                averages=averages,
            )
        self.seen()
        return []

    async def on_inventory(self, message_type: str, data: MessageData) -> list[ServerMessage]:
        """An inventory report: stored as the host's latest of its kind (users and
        services in the normalized form of :mod:`hosts.smagent.inventory`)."""
        kind = INVENTORY_TYPES[message_type]
        facts: HostFacts = {}
        if kind == InventoryKind.OS:
            facts = protocol.facts_from_system_info(data)
        elif kind == InventoryKind.HARDWARE:
            facts = protocol.facts_from_hardware(data)
            self.cpu_count = facts.get("cpu_count", self.cpu_count)
        if kind == InventoryKind.UPDATES:
            await database_sync_to_async(services.host_patch_updates_save)(
                host_id=self.host_id, report=patching.updates_from_sysmanage(data)
            )
        normalize = inventory.NORMALIZED.get(kind)
        stored: dict[str, object] | None
        if normalize is not None:
            # kept in the form the server shows, bounded; a report without its list
            # (nothing to store) leaves the last one in place
            normalized = normalize(data)
            stored = dict(normalized[0]) if normalized is not None else None
            items = normalized[1] if normalized is not None else None
        else:
            stored = protocol.storable_object(
                {k: v for k, v in data.items() if k not in ("host_id", "host_token")}
            )
            items = protocol.inventory_items(kind, data)
        if stored is not None:
            await database_sync_to_async(services.host_inventory_save)(
                host_id=self.host_id,
                kind=kind,
                data=stored,
                item_count=items,
                facts=facts,
                digest=protocol.digest(stored),
            )
        self.seen()
        if kind == InventoryKind.HARDWARE:
            mounts = protocol.mounts_from_hardware(data)
            if mounts and mounts != self.mounts:
                return [self.metrics_command(mounts)]
        return []

    async def on_reboot_status(self, data: MessageData, message_id: str) -> list[ServerMessage]:
        """Whether the host needs a reboot: stored (a report without it changes nothing)."""
        required = patching.reboot_from_sysmanage(data)
        if required is not None:
            await database_sync_to_async(services.host_reboot_save)(
                host_id=self.host_id, required=required
            )
        self.seen()
        return []

    async def on_update_apply_result(
        self, data: MessageData, message_id: str
    ) -> list[ServerMessage]:
        """How applying updates went (the agent applies them in the background after
        answering ``apply_updates``): ends that operation; a reboot it needs is stored."""
        await database_sync_to_async(deliveries.record_apply_result)(
            host_id=self.host_id, data=data
        )
        if data.get("requires_reboot") is True:
            await database_sync_to_async(services.host_reboot_save)(
                host_id=self.host_id, required=True
            )
        self.seen()
        return []

    async def on_certificates(self, data: MessageData, message_id: str) -> list[ServerMessage]:
        """The certificates found on the host: they replace those stored (a report
        without a list changes nothing)."""
        report = certificates.certificates_from_sysmanage(data)
        if report is not None:
            if report.skipped:
                logger.info(
                    "certificates of %s: %d malformed entries skipped",
                    self.hostname,
                    report.skipped,
                )
            await database_sync_to_async(services.host_certificates_save)(
                host_id=self.host_id, hostname=self.hostname, report=report
            )
        self.seen()
        return []

    HANDLERS: dict[str, Handler] = {
        "system_info": on_system_info,
        "reboot_status_update": on_reboot_status,
        "update_apply_result": on_update_apply_result,
        "host_certificates_update": on_certificates,
        "heartbeat": on_heartbeat,
        "command_result": on_command_result,
        "custom_metric_samples": on_custom_metric_samples,
        **{name: _inventory_handler(name) for name in INVENTORY_TYPES},
    }

    # -- what the server sends ---------------------------------------------------------------

    def metrics_command(self, mounts: list[str]) -> CommandMessage:
        """``sync_custom_metrics`` with the scripts behind live metrics."""
        mounts = list(mounts) or ["/"]
        self.mounts = mounts
        return protocol.command_message(
            str(uuid.uuid4()),
            "sync_custom_metrics",
            {
                "metrics": protocol.metric_definitions(
                    mounts, settings.SYSMANAGE_AGENT_METRICS_CADENCE
                )
            },
            60,
        )

    async def initial_metrics_command(self) -> CommandMessage:
        """The metrics set for a newly proven connection (mounts from the last hardware
        report, or ``/`` until one arrives)."""
        mounts = await database_sync_to_async(_load_mounts)(self.host_id)
        return self.metrics_command(mounts)

    def check_updates_command(self) -> CommandMessage:
        """``check_updates``: the agent looks for updates now and reports them
        (``package_updates_update``) instead of at its next hourly check."""
        return protocol.command_message(
            str(uuid.uuid4()), "check_updates", {}, protocol.CHECK_UPDATES_TIMEOUT
        )

    def check_reboot_command(self) -> CommandMessage:
        """``check_reboot_status``: the agent says whether the host needs a reboot now
        (``reboot_status_update``)."""
        return protocol.command_message(
            str(uuid.uuid4()), "check_reboot_status", {}, protocol.CHECK_UPDATES_TIMEOUT
        )

    async def due_commands(self, *, resend_all: bool = False) -> list[CommandMessage]:
        """Queued commands to send now (each confirmed to its requester as taken), and a
        check of updates if one was asked for."""
        due, check = await database_sync_to_async(_take_due)(self.host_id, resend_all)
        for item in due:
            publish_control_now(AgentTook(ref=item.ref, host_id=self.host_id))
        checks = [self.check_updates_command(), self.check_reboot_command()] if check else []
        return [item.message for item in due] + checks

    def seen(self) -> None:
        """The agent was heard from."""
        assert self.last_seen is not None
        self.last_seen.touch()


def _ids(held: Held) -> dict[str, object]:
    """The type and id of a held message, where they can be told without parsing it."""
    if held.raw is None:
        return {}
    return {"message_type": held.raw.get("message_type"), "message_id": held.raw.get("message_id")}
