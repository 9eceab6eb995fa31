"""
The agent endpoint, ``/ws/agent``: one socket per managed host.

:class:`AgentConsumer` authenticates the host's token (``Authorization: Bearer``), marks
the host online after ``hello``, turns metrics into ``host_metrics`` events without
writing the database per report, hands queued commands and package operations to the
agent, and stores the results it sends back, acknowledging each once stored.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from hosts import agent_protocol, patching, selectors, services
from hosts.agent_protocol import (
    AgentData,
    HostFacts,
    MessageId,
    ServerData,
    ServerMessage,
    ServerMessageType,
)
from hosts.events import AgentTook
from hosts.metrics import MetricsError, MinuteAggregator, MinuteAverages, clean_metrics
from hosts.models import CommandExecution, Host, PackageOperation
from sysmanage import dbgate, drain, metrics
from sysmanage.auth import bearer_token
from sysmanage.callbatch import ReadBatch
from sysmanage.connection import Connection
from sysmanage.dbthreads import PeerGone, database_sync_to_async
from sysmanage.events import publish_control_now
from sysmanage.node import running_hub
from sysmanage.oversized import Oversized
from sysmanage.protocol import (
    CloseCode,
    ErrorCode,
    ProtocolError,
    auth_failed_envelope,
    error_envelope,
    request_id_of,
    utc_now_iso,
)
from sysmanage.ratelimit import TokenBucket

logger = logging.getLogger(__name__)

#: The commands and package operations handed over to an agent.
Work = tuple[list[CommandExecution], list[PackageOperation]]

#: The hosts of the tokens agents connect with, looked up together when many connect at
#: once (the sockets that connected while one lookup ran wait for the next).
TOKEN_HOSTS: ReadBatch[str, Host] = ReadBatch(
    lambda tokens: selectors.hosts_for_tokens(tokens), most=500
)


class AgentConsumer(Connection):
    """The connection of one host's agent."""

    metric_kind = "agent"
    host_id: str | None = None
    hostname = ""
    ready = False
    cpu_count: int | None = None
    #: the commands and operations handed over on this connection (made on first use:
    #: most idle agents never get one)
    sent: set[str] | None = None
    #: of ``sent``, the work whose result came (made on first use too)
    answered: set[str] | None = None
    skips_oversized = True
    #: the next frame :meth:`receive` gets already took its token of the rate
    prepaid = False
    #: whether work was queued for the host before the hello was through
    nudged = False

    async def connect(self) -> None:
        """Called on the handshake: authenticate the host token, then register with the hub."""
        await self._accept()
        token = bearer_token(self.scope)
        try:
            host = await TOKEN_HOSTS.get(token, self.peer_alive) if token else None
        except PeerGone:
            return
        except Exception as exc:
            fault = dbgate.unavailable(exc)
            if fault is None:
                raise
            dbgate.note(fault, exc)
            await self._close_with(CloseCode.TRY_AGAIN_LATER, dbgate.socket_error(fault))
            return
        if host is None:
            await self._close_with(
                CloseCode.AUTH_FAILED,
                auth_failed_envelope(
                    "Missing agent token" if not token else "Invalid or revoked agent token"
                ),
            )
            return
        if not self.peer_alive():
            # Gone while its host was looked up (its agent gave up waiting and may be
            # back on another socket already, which registering this one would replace).
            return
        self.host_id, self.hostname = str(host.id), host.hostname
        self.token_hash = host.token_hash
        self.session = uuid.uuid4().hex
        self.bucket = TokenBucket(
            settings.AGENT_RATE_LIMIT_PER_SECOND, settings.AGENT_RATE_LIMIT_BURST
        )
        self.aggregator = MinuteAggregator()
        self.last_seen = services.LastSeen(self.host_id)
        self.hub = await running_hub()
        previous = self.hub.register_agent(self.host_id, self)
        if previous is not None:
            previous.close_from_hub(
                CloseCode.REPLACED,
                error_envelope(
                    ErrorCode.REPLACED, "Another connection with this host's token took over"
                ),
            )

    async def disconnect(self, code: int) -> None:
        """Called when the socket closes: flush metrics history, mark the host offline."""
        self._release()
        if self.hub is None or self.host_id is None:
            return
        self.hub.unregister_agent(self.host_id, self)
        try:
            await self._save_minute(self.aggregator.flush())
            # A draining process sent the agent to another one: the host stays online
            # (the sweep takes it offline if its agent does not come back).
            if self.ready and not drain.draining():
                await database_sync_to_async(services.host_agent_gone)(
                    host_id=self.host_id, session=self.session
                )
        except Exception:
            # With the database away, the host stays online until the sweep finds it
            # silent (HOST_OFFLINE_AFTER_SECONDS).
            dbgate.log_exception(logger, "could not record that %s went away", self.hostname)

    # -- sending --------------------------------------------------------------------------

    def send_message(
        self, type_: ServerMessageType, data: ServerData, id_: MessageId = None
    ) -> None:
        """Send one protocol message to the agent."""
        if self.outbound is not None:
            message: ServerMessage = {"type": type_, "data": data, "timestamp": utc_now_iso()}
            if id_ is not None:
                message["id"] = id_
            self.reply(message)

    def _log_overflow(self) -> None:
        logger.warning("closing the agent of %s: it stopped reading", self.hostname)

    def owes_results(self) -> bool:
        """Whether work sent on this connection still waits for its result."""
        return self.host_id is not None and not (self.sent or set()) <= (self.answered or set())

    def nudge(self) -> None:
        """Called by the hub when work was queued for this host (before the hello is
        through, remembered for it)."""
        if not self.ready:
            self.nudged = True
        elif not self.closing:
            self._spawn(self.dispatch_pending())

    # -- receiving ------------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Called for each agent frame: check limits, parse, dispatch by type."""
        if self.host_id is None or self.closing:
            return
        size = len(text_data) if text_data is not None else len(bytes_data or b"")
        if self.prepaid:  # its token was taken by receive_at_once
            self.prepaid = False
        elif not await self._within_rate(text_data):
            return
        if size > settings.AGENT_MAX_MESSAGE_BYTES:
            limit = settings.AGENT_MAX_MESSAGE_BYTES
            metrics.frame_refused(self.metric_kind, "too_large")
            await self.oversized(Oversized.from_frame(text_data, bytes_data, size, limit))
            return
        if text_data is None:
            self.reply(error_envelope(ErrorCode.INVALID_MESSAGE, "Send JSON text frames"))
            return
        try:
            type_, data, id_ = agent_protocol.parse_agent_message(text_data)
            metrics.agent_message("agent", type_)
            if not self.ready and type_ != "hello":
                raise ProtocolError(ErrorCode.INVALID_MESSAGE, "Send 'hello' first", id_=id_)
            await self.HANDLERS[type_](self, data, id_)
        except ProtocolError as exc:
            self.reply(exc.to_envelope())
        except Exception:
            self._reply_fault(text_data)

    def receive_at_once(self, message: dict[str, Any]) -> bool:
        """Called by the server for a frame that arrives while this connection waits:
        take metrics and heartbeats at once (they need no waiting); anything else, and
        anything the usual way would refuse, goes to :meth:`receive`.

        A fleet's reports are most of what reaches the server; taken here, a report costs
        no task step, future or dispatch of its own.
        """
        text = message.get("text")
        if (
            not self.ready
            or self.closing
            or message["type"] != "websocket.receive"
            or text is None
            or len(text) > settings.AGENT_MAX_MESSAGE_BYTES
            or self.bucket is None
            or self.bucket.take() != 0  # over the rate: receive() refuses it
        ):
            return False
        try:
            type_, data, id_ = agent_protocol.parse_agent_message(text)
            take = self.AT_ONCE.get(type_)
            if take is None:
                self.prepaid = True
                return False
            metrics.agent_message("agent", type_)
            take(self, data, id_)
        except ProtocolError as exc:
            self.reply(exc.to_envelope())
        except Exception:
            self._reply_fault(text)
        return True

    def _reply_fault(self, text: str) -> None:
        fault = dbgate.log_exception(
            logger, "error handling a message from agent of %s", self.hostname
        )
        self.reply(
            dbgate.socket_error(fault, id_=request_id_of(text))
            if fault is not None
            else error_envelope(ErrorCode.INTERNAL_ERROR, "Internal server error")
        )

    async def oversized(self, message: Oversized) -> None:
        """Called for a message over the limit, not processed: fail the command or
        package operation it was the result of, log it, tell the agent (and acknowledge
        the result, which it need not send again); the connection stays open."""
        if self.host_id is None:
            return
        why = agent_protocol.result_too_large(message, "AGENT_MAX_MESSAGE_BYTES")
        ended = await database_sync_to_async(services.work_fail_oversized)(
            host_id=self.host_id, refs=message.uuids() if self.ready else [], why=why
        )
        agent_protocol.log_oversized(
            logger, self.hostname, message, [(w.kind, w.ref) for w in ended if w.ended_now]
        )
        if not ended:
            why = agent_protocol.result_too_large(message, "AGENT_MAX_MESSAGE_BYTES", "message")
        self.reply(error_envelope(ErrorCode.MESSAGE_TOO_LARGE, why))
        for work in ended:
            self.send_message("ack", {"kind": work.kind, "ref": work.ref})

    async def on_hello(self, data: AgentData, id_: MessageId) -> None:
        """Store the host's facts, mark it online and hand over queued work (one trip to
        the database threads), unless the agent has gone by then."""
        facts = agent_protocol.clean_facts(data, id_)
        try:
            # ahead of other sockets' authentication: this one's agent is online after it
            host, work = await self.database(self._hello, ahead=True)(facts)
        except PeerGone:
            return
        assert self.host_id is not None  # set on connecting, before any message
        self.cpu_count = host.cpu_count
        self.ready = True  # the host is online: its disconnect takes it offline
        self.last_seen = services.LastSeen(self.host_id, written_now=True)  # hello wrote it
        self.sent = self.answered = None
        if work is None:
            return
        self.send_message(
            "welcome",
            {
                "host_id": self.host_id,
                "heartbeat_interval": settings.AGENT_HEARTBEAT_INTERVAL,
                "metrics_interval": settings.AGENT_METRICS_INTERVAL,
                "server_time": utc_now_iso(),
            },
            id_,
        )
        if isinstance(work, Exception):
            raise work
        self._send_work(*work)
        if self.nudged:  # work queued while the hello was under way, perhaps unseen
            self.nudged = False
            await self.dispatch_pending()

    def _hello(self, facts: HostFacts) -> tuple[Host, Work | Exception | None]:
        """In a database thread: the hello's writes, then the work to hand over, which
        is left where it is if the agent has gone meanwhile (None).  A failure to hand
        it over is returned: the hello stands, and the agent is welcomed, then told."""
        host = services.host_agent_hello(host_id=self.host_id, session=self.session, facts=facts)
        if not self.peer_alive():
            return host, None
        if not services.work_waiting(host):
            return host, ([], [])  # work queued from now on nudges this connection
        try:
            return host, services.work_hand_over(host_id=self.host_id)
        except Exception as exc:
            return host, exc

    async def on_heartbeat(self, data: AgentData, id_: MessageId) -> None:
        """Note that the agent is alive."""
        self.take_heartbeat(data, id_)

    def take_heartbeat(self, data: AgentData, id_: MessageId) -> None:
        """Note that the agent is alive (at once)."""
        self.last_seen.touch()

    async def on_metrics(self, data: AgentData, id_: MessageId) -> None:
        """Take live metrics (:meth:`take_metrics`)."""
        self.take_metrics(data, id_)

    def take_metrics(self, data: AgentData, id_: MessageId) -> None:
        """Publish live metrics; add them to this minute's history row, which is stored
        with the other agents' (:data:`hosts.services.METRIC_MINUTES`) once it is over.
        Nothing here waits or touches the database."""
        try:
            metrics = clean_metrics(data.get("metrics"))
        except MetricsError as exc:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, str(exc), id_=id_) from None
        now = timezone.now()
        services.host_metrics_publish(
            host_id=self.host_id or "",
            hostname=self.hostname,
            metrics=metrics,
            cpu_count=self.cpu_count,
            at=now,
        )
        finished = self.aggregator.add(now, metrics)
        if finished is not None:  # the first report of a minute: store the one before
            minute, samples, averages = finished
            services.METRIC_MINUTES.add((self.host_id, minute, samples, averages))
        self.last_seen.touch()

    async def on_command_started(self, data: AgentData, id_: MessageId) -> None:
        """Mark a command running."""
        execution_id = agent_protocol.reference(data, "execution_id", id_)
        await database_sync_to_async(services.command_mark_running)(
            execution_id=execution_id, host_id=self.host_id
        )

    async def on_command_result(self, data: AgentData, id_: MessageId) -> None:
        """Store a command's result (once) and acknowledge it."""
        execution_id = agent_protocol.reference(data, "execution_id", id_)
        result = agent_protocol.clean_command_result(data, id_)
        await database_sync_to_async(services.command_record_result)(
            execution_id=execution_id, host_id=self.host_id, result=result
        )
        self.send_message("ack", {"kind": "command_result", "ref": execution_id}, id_)
        self._answered(execution_id)
        self.last_seen.touch()

    async def on_package_progress(self, data: AgentData, id_: MessageId) -> None:
        """Store and publish a package operation's progress."""
        operation_id = agent_protocol.reference(data, "operation_id", id_)
        progress, message = agent_protocol.clean_progress(data, id_)
        await database_sync_to_async(services.package_operation_record_progress)(
            operation_id=operation_id, host_id=self.host_id, progress=progress, message=message
        )

    async def on_package_result(self, data: AgentData, id_: MessageId) -> None:
        """Store a package operation's result (once) and acknowledge it."""
        operation_id = agent_protocol.reference(data, "operation_id", id_)
        result = agent_protocol.clean_package_result(data, id_)
        await database_sync_to_async(services.package_operation_record_result)(
            operation_id=operation_id, host_id=self.host_id, **result
        )
        self.send_message("ack", {"kind": "package_result", "ref": operation_id}, id_)
        self._answered(operation_id)

    async def on_patch_status(self, data: AgentData, id_: MessageId) -> None:
        """Store the host's pending updates and whether it needs a reboot."""
        updates = patching.updates_from_native(data, id_)
        reboot = patching.reboot_from_native(data, id_)
        await database_sync_to_async(_save_patch_status)(self.host_id, updates, reboot)
        self.last_seen.touch()

    def _answered(self, ref: str) -> None:
        """Note that the result of ``ref`` came (the drain waits for those still owed)."""
        if self.answered is None:
            self.answered = set()
        self.answered.add(ref)

    HANDLERS = {
        "hello": on_hello,
        "heartbeat": on_heartbeat,
        "metrics": on_metrics,
        "command_started": on_command_started,
        "command_result": on_command_result,
        "package_progress": on_package_progress,
        "package_result": on_package_result,
        "patch_status": on_patch_status,
    }
    #: what :meth:`receive_at_once` takes as it arrives
    AT_ONCE = {"heartbeat": take_heartbeat, "metrics": take_metrics}

    # -- work for the agent ---------------------------------------------------------------

    async def dispatch_pending(self) -> None:
        """Send the agent every unfinished command and operation it has not been sent yet
        on this connection (handing the pending ones over: they are running from now)."""
        try:
            work = await self.database(services.work_hand_over)(host_id=self.host_id)
            check = await self.database(services.host_updates_check_take)(host_id=self.host_id)
        except PeerGone:
            return
        except DatabaseError as exc:
            # The database is away: the work stays queued for the next nudge or recheck.
            fault = dbgate.unavailable(exc)
            if fault is None:
                raise
            dbgate.note(fault, exc)
            return
        self._send_work(*work)
        if check:
            self.send_message("check_updates", {})

    def _send_work(
        self, commands: list[CommandExecution], operations: list[PackageOperation]
    ) -> None:
        """Send the agent the work handed over that it was not sent yet on this socket."""
        for execution in commands:
            if self._first_time(str(execution.id)):
                self.send_message(
                    "run_command",
                    {
                        "execution_id": str(execution.id),
                        "command": execution.command,
                        "timeout": execution.timeout,
                    },
                )
        for operation in operations:
            if self._first_time(str(operation.id)):
                self.send_message(
                    "package_operation",
                    {
                        "operation_id": str(operation.id),
                        "operation": operation.operation,
                        "package": operation.package,
                    },
                )

    def _first_time(self, ref: str) -> bool:
        if self.sent is None:
            self.sent = set()
        elif ref in self.sent:
            return False
        self.sent.add(ref)
        publish_control_now(AgentTook(ref=ref, host_id=str(self.host_id)))
        return True

    async def _save_minute(self, finished: tuple[datetime, int, MinuteAverages] | None) -> None:
        if finished is not None:
            minute, samples, averages = finished
            await database_sync_to_async(services.metric_sample_save)(
                host_id=self.host_id, minute=minute, samples=samples, averages=averages
            )


def _save_patch_status(
    host_id: str | None, updates: patching.PatchUpdates | None, reboot: bool | None
) -> None:
    """In a database thread: what a ``patch_status`` reported (the parts it carried)."""
    if updates is not None:
        services.host_patch_updates_save(host_id=host_id, report=updates)
    if reboot is not None:
        services.host_reboot_save(host_id=host_id, required=reboot)
