"""
``/api/agent/connect?token=…``: the WebSocket of an unchanged SysManage agent.

The handshake is always accepted (the agent reads a refused handshake as a network that
blocks WebSockets and switches to polling); a bad connection token then gets an
``invalid_token`` error and close code 4001.  The host comes online once a message
proves the agent's identity; from then on this connection is the host's agent in the
hub, exactly like a connection of the product's own agent.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from django.conf import settings

from hosts import services
from hosts.agent_protocol import log_oversized, result_too_large
from hosts.smagent import deliveries, enrollment, protocol, tokens
from hosts.smagent.protocol import AgentProtocolError, ErrorMessage, ErrorType, ServerMessage
from hosts.smagent.session import AgentSession, AwaitingApproval
from sysmanage import dbgate, metrics
from sysmanage.connection import Connection
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.node import running_hub
from sysmanage.oversized import Oversized
from sysmanage.protocol import CloseCode
from sysmanage.ratelimit import TokenBucket

if TYPE_CHECKING:
    from sysmanage.hub import CloseReason

logger = logging.getLogger(__name__)

#: Messages refused for identity before the connection is dropped (the agent itself
#: re-registers after three ``host_not_registered`` errors).
MAX_REFUSALS = 5
MAX_LOGGED_REFUSALS = 10
#: The agent's ``error_type`` for each close code the hub closes with.
ERROR_TYPES: dict[int, ErrorType] = {
    CloseCode.AUTH_FAILED: "invalid_token",
    CloseCode.REPLACED: "replaced",
    CloseCode.SLOW_CONSUMER: "slow_consumer",
}


def database_refusal(fault: dbgate.Fault) -> ErrorMessage:
    """What the agent is told when its connection or message needs the database and the
    database is unreachable or busy: ``server_busy``, to come back later."""
    return protocol.error_message(
        "server_busy",
        f"{dbgate.explain(fault)}; try again in a moment",
        retry_after=dbgate.RETRY_AFTER,
    )


class UnprovenConnections:
    """Connections of this process that have not proved whose agent they are, counted
    per client address: one address may hold only so many."""

    by_address: collections.Counter[str] = collections.Counter()

    @classmethod
    def add(cls, address: str) -> bool:
        """Count one more for ``address``, unless it holds as many as allowed."""
        if cls.by_address[address] >= settings.SYSMANAGE_AGENT_UNPROVEN_PER_ADDRESS:
            return False
        cls.by_address[address] += 1
        return True

    @classmethod
    def remove(cls, address: str) -> None:
        """Count one fewer for ``address`` (it proved itself, or closed)."""
        cls.by_address[address] -= 1
        if cls.by_address[address] <= 0:
            del cls.by_address[address]


class SysManageAgentConsumer(Connection):
    """The connection of one SysManage agent."""

    metric_kind = "sysmanage_agent"
    session: AgentSession | None = None
    registered = False
    resender: asyncio.Future[None] | None = None
    overflow_reason = "Too many unread messages"
    unproven_address: str | None = None
    deadline: asyncio.TimerHandle | None = None
    challenged = False
    #: whether the check of updates sent when the agent comes online went out
    checked_updates = False
    skips_oversized = True

    @property
    def token_hash(self) -> str:
        """The host token digest the connection proved (the recheck compares it)."""
        return self.session.token_hash if self.session is not None else ""

    async def connect(self) -> None:
        """Accept, then check the connection token of the query string."""
        await self._accept()
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        token = (query.get("token") or [""])[0]
        opened = tokens.open_token(token)
        try:
            candidates = (
                await database_sync_to_async(enrollment.named_host_ids)(opened.name)
                if opened is not None
                else set()
            )
        except Exception as exc:
            fault = dbgate.unavailable(exc)
            if fault is None:
                raise
            dbgate.note(fault, exc)
            await self._close_with(CloseCode.TRY_AGAIN_LATER, database_refusal(fault))
            return
        if opened is None or not candidates:
            await self._close_with(
                CloseCode.AUTH_FAILED,
                protocol.error_message(
                    "invalid_token",
                    "Missing, invalid or expired connection token; "
                    "get a new one from /api/agent/auth",
                ),
            )
            return
        address = (self.scope.get("client") or ["?"])[0]
        if not UnprovenConnections.add(address):
            logger.warning(
                "refused an agent connection from %s: too many connections from "
                "there have not proved their identity",
                address,
            )
            await self._close_with(
                CloseCode.RATE_LIMITED,
                protocol.error_message(
                    "too_many_connections",
                    "Too many connections from this address have not "
                    "proved their identity; retry later",
                ),
            )
            return
        self.unproven_address = address
        try:
            # Started before any message is handled: handling publishes events, which
            # go through the hub of this process (the first connection starts it).
            self.hub = await running_hub()
        except Exception:
            logger.exception("cannot reach the channel layer; refusing an agent connection")
            await self._close_with(
                CloseCode.TRY_AGAIN_LATER,
                protocol.error_message(
                    "server_busy", "The server cannot take connections right now; reconnect"
                ),
            )
            return
        self.session = AgentSession(opened.name, polled=False, candidates=candidates)
        self.connection_id = uuid.uuid4().hex
        self.bucket = TokenBucket(
            settings.AGENT_RATE_LIMIT_PER_SECOND, settings.AGENT_RATE_LIMIT_BURST
        )
        self.deadline = asyncio.get_running_loop().call_later(
            settings.SYSMANAGE_AGENT_PROVE_SECONDS, self._proof_overdue
        )

    def _proven(self) -> None:
        """The connection proved its identity: it no longer counts as unproven."""
        if self.unproven_address is not None:
            UnprovenConnections.remove(self.unproven_address)
            self.unproven_address = None
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _proof_overdue(self) -> None:
        if self.session is not None and not self.session.verified and not self.closing:
            logger.warning(
                "closing the agent connection of %s: no proof of identity within %d s",
                self.session.name,
                settings.SYSMANAGE_AGENT_PROVE_SECONDS,
            )
            self.closing = True
            self._spawn(
                self._close_with(
                    CloseCode.AUTH_FAILED,
                    protocol.error_message(
                        "identification_required",
                        "No message with host_id and host_token came "
                        f"within {settings.SYSMANAGE_AGENT_PROVE_SECONDS} s of connecting",
                    ),
                )
            )

    async def disconnect(self, code: int) -> None:
        """Forget this connection; the host goes offline unless another one took over."""
        self._proven()  # no longer counted, whatever it proved
        if self.session is not None:
            self.session.refuse_held()  # gives their bytes back to the process budget
        self._release()
        if self.hub is not None and self.session is not None and self.registered:
            self.hub.unregister_agent(self.session.host_id, self)
            try:
                await database_sync_to_async(services.host_agent_gone)(
                    host_id=self.session.host_id, session=self.connection_id
                )
            except Exception:
                # With the database away, the host stays online until the sweep finds
                # it silent (HOST_OFFLINE_AFTER_SECONDS).
                dbgate.log_exception(
                    logger, "could not record that %s went away", self.session.hostname
                )

    # -- sending ----------------------------------------------------------------------

    def send_messages(self, messages: Sequence[ServerMessage]) -> None:
        """Send messages to the agent, each as one frame under its 1 MiB limit."""
        for message in messages:
            try:
                text = protocol.encode(message)
            except ValueError:
                logger.exception(
                    "not sending an oversized frame to the agent of %s",
                    self.session.hostname if self.session else "?",
                )
                continue
            self.send_text(text)

    def encode(self, message: Mapping[str, object]) -> str:
        """One message as the agent reads it (under its 1 MiB frame limit)."""
        return protocol.encode(message)

    def _rate_refusal(self, text: str | None, wait: float) -> ErrorMessage:
        """One frame over the rate, refused in the agent's protocol."""
        return protocol.error_message(
            "rate_limited", "Too many messages; this one was not processed"
        )

    def _rate_closing_message(self) -> ErrorMessage:
        """The last message to an agent that kept sending through its refusals."""
        return protocol.error_message("rate_limited", "Too many messages; connection closed")

    def _closing_message(self, code: int, error: CloseReason) -> ErrorMessage:
        """The hub's reason for closing, as an error of the agent's protocol."""
        fields: Mapping[str, Any] = error  # an error envelope, or text alone
        reason = str(
            (fields.get("data") or {}).get("message")
            or fields.get("message")
            or "Disconnected by the server"
        )
        return protocol.error_message(ERROR_TYPES.get(code, "disconnected"), reason)

    def deliver(self, frame: Any) -> None:
        """Agents subscribe to no channel; the hub never fans events out to them."""

    def _log_overflow(self) -> None:
        logger.warning(
            "closing the agent of %s: it stopped reading",
            self.session.hostname if self.session else "?",
        )

    def nudge(self) -> None:
        """Called by the hub when work was queued for this host (or a resend is due)."""
        if self.registered and not self.closing:
            self._spawn(self._send_due())

    async def _send_due(self, resend_all: bool = False) -> None:
        assert self.session is not None
        sent = await self.session.due_commands(resend_all=resend_all)
        self.send_messages(sent)
        if sent and (self.resender is None or self.resender.done()):
            self.resender = self._spawn(self._resend_until_acknowledged())

    async def _resend_until_acknowledged(self) -> None:
        """While commands sent on this connection wait for their acknowledgement, look
        again every ``SYSMANAGE_AGENT_ACK_SECONDS`` and send the overdue ones again."""
        assert self.session is not None
        while not self.closing:
            await asyncio.sleep(settings.SYSMANAGE_AGENT_ACK_SECONDS + 0.05)
            if not await database_sync_to_async(deliveries.unacknowledged)(self.session.host_id):
                return
            self.send_messages(await self.session.due_commands())

    # -- receiving --------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Called for each frame: check size and rate, then hand it to the session."""
        if self.session is None or self.closing:
            return
        size = len(text_data.encode("utf-8")) if text_data is not None else len(bytes_data or b"")
        if not await self._within_rate(text_data):
            return
        if size > settings.SYSMANAGE_AGENT_MAX_MESSAGE_BYTES:
            limit = settings.SYSMANAGE_AGENT_MAX_MESSAGE_BYTES
            metrics.frame_refused(self.metric_kind, "too_large")
            await self.oversized(Oversized.from_frame(text_data, bytes_data, size, limit))
            return
        replies: list[ServerMessage] = []
        try:
            if text_data is None:
                raise AgentProtocolError("invalid_message", "Send JSON text frames")
            replies, _ = await self.session.receive_text(text_data, size)
        except AwaitingApproval as exc:
            await self._close_with(CloseCode.AUTH_FAILED, exc.to_message())
            return
        except AgentProtocolError as exc:
            self._log_refusal(exc)
            replies = [exc.to_message()]
            if self.session.refusals >= MAX_REFUSALS:
                self.send_messages(replies)
                await self._close_with(
                    CloseCode.AUTH_FAILED,
                    protocol.error_message(
                        "host_not_registered", "Too many messages from an unidentified agent"
                    ),
                )
                return
        except Exception:
            fault = dbgate.log_exception(
                logger, "error handling a message from the agent of %s", self.session.hostname
            )
            replies = [
                database_refusal(fault)
                if fault is not None
                else protocol.error_message(
                    "server_error", "The server could not process this message"
                )
            ]
        # Proven (even if handling the message itself then failed): take over as the
        # host's agent now, or drop the connection so that the agent comes back.
        if self.session.verified and not self.registered and not self.closing:
            self._proven()
            try:
                await self._come_online()
            except Exception:
                dbgate.log_exception(
                    logger, "could not bring the agent of %s online", self.session.hostname
                )
                self.send_messages(replies)
                await self._close_with(
                    CloseCode.TRY_AGAIN_LATER,
                    protocol.error_message(
                        "server_busy", "The server could not take this connection; reconnect"
                    ),
                )
                return
        came_online = self.registered and not self.checked_updates
        if self.session.held and not self.challenged:
            # Held for proof: ask for it rather than wait for the next heartbeat.
            self.challenged = True
            replies.append(protocol.ping_message())
        if came_online and settings.SYSMANAGE_AGENT_CHECK_UPDATES_ON_CONNECT:
            # a fresh look at pending updates, rather than the agent's next hourly one
            replies.append(self.session.check_updates_command())
        self.checked_updates = self.checked_updates or came_online
        self.send_messages(replies)

    async def oversized(self, message: Oversized) -> None:
        """Called for a message over the limit, not processed: fail the command it was
        the result of (once the connection is proven), log it, and tell the agent, which
        then does not send it again; the connection stays open."""
        if self.session is None:
            return
        why = result_too_large(message, "SYSMANAGE_AGENT_MAX_MESSAGE_BYTES")
        ended: list[services.WorkEnded] = []
        if self.session.verified:
            ended = await database_sync_to_async(deliveries.fail_oversized)(
                host_id=self.session.host_id, ids=message.uuids(), why=why
            )
        log_oversized(logger, self.session.hostname, message, [(w.kind, w.ref) for w in ended])
        named = {
            key: value
            for key in ("message_type", "message_id")
            if (value := message.string_field(key)) is not None
        }
        if not ended:
            why = result_too_large(message, "SYSMANAGE_AGENT_MAX_MESSAGE_BYTES", "message")
        self.send_messages([protocol.error_message("message_too_large", why, **named)])

    def _log_refusal(self, exc: AgentProtocolError) -> None:
        """Log the first refusals of a connection (an agent that speaks differently, or
        someone who is not the host), without flooding the log."""
        self.logged_refusals = getattr(self, "logged_refusals", 0) + 1
        if self.logged_refusals <= MAX_LOGGED_REFUSALS:
            assert self.session is not None
            logger.warning(
                "agent of %s: %s %s: %s",
                self.session.hostname,
                exc.data.get("message_type", "frame"),
                exc.error_type,
                exc.message,
            )

    async def _come_online(self) -> None:
        """The agent proved who it is: take over as the host's agent, mark it online,
        push the metric scripts and everything queued for it (facts came with the
        messages themselves)."""
        assert self.session is not None
        self.hub = await running_hub()
        previous = self.hub.register_agent(self.session.host_id, self)
        self.registered = True
        if previous is not None and previous is not self:
            previous.close_from_hub(
                CloseCode.REPLACED, {"message": "Another connection of this host took over"}
            )
        await database_sync_to_async(services.host_agent_hello)(
            host_id=self.session.host_id, session=self.connection_id, facts={}
        )
        if self.session.mounts is None:  # a held hardware report may have sent it already
            self.send_messages([await self.session.initial_metrics_command()])
        await self._send_due(resend_all=True)
