"""The agent: its state on disk, the reconnect loop, and dispatching server messages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeGuard

from agent.backoff import Backoff
from agent.config import AgentConfig
from agent.jobs import JobRunner
from agent.ledger import IdLedger
from agent.packages.managers import detect_manager
from agent.protocol import (
    ACK,
    CHECK_UPDATES,
    CLOSE_REPLACED,
    CLOSE_SERVICE_RESTART,
    ERROR,
    PACKAGE_OPERATION,
    PACKAGE_RESULT,
    RESULT_ID_FIELDS,
    RUN_COMMAND,
    WELCOME,
    AgentMessage,
    ResultMessage,
    ServerMessage,
    parse,
    ref_of,
)
from agent.session import REBOOTING, Link, SessionEnd, connect_once
from agent.spool import ResultSpool
from agent.storage import ensure_private_dir

log = logging.getLogger(__name__)

#: A connection that stayed up this long resets the backoff.
BACKOFF_RESET_AFTER = 30.0
#: Seconds to wait for the connection to close at shutdown.
CLOSE_WAIT = 5.0
#: Pause between results sent again, so a long backlog stays under the server's rate limit.
RESEND_PAUSE = 0.05
#: The ``error`` code of a server that could not store what it was sent for now (its
#: database is away), and how long the agent waits before sending its unacknowledged
#: results again: the ``retry_after`` of the error, within these bounds (seconds).
SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
RETRY_AFTER_DEFAULT = 2.0
RETRY_AFTER_MAX = 60.0

Handler = Callable[[ServerMessage], Awaitable[None]]


@dataclass(slots=True)
class Intervals:
    """The current heartbeat and metrics intervals, in seconds."""

    heartbeat: float
    metrics: float


class Agent:
    """Everything that outlives a single connection: state, jobs and the current link."""

    def __init__(self, config: AgentConfig) -> None:
        """Open the state directory and detect the package manager."""
        self.config = config
        state = ensure_private_dir(config.state_dir)
        self.spool = ResultSpool(state / "results")
        self.ledger = IdLedger(state / "seen-ids.json")
        self.manager = detect_manager()
        self.jobs = JobRunner(
            self.spool,
            self.ledger,
            self,
            self.manager,
            config.max_output_bytes,
            config.max_concurrent_commands,
            config.reboot_command,
        )
        self.intervals = Intervals(config.heartbeat_interval, config.metrics_interval)
        self.link: Link | None = None
        #: whether the results are to be sent again after a SERVICE_UNAVAILABLE error,
        #: and the tasks that do it (kept until they end)
        self._retry_due = False
        self._retries: set[asyncio.Task[None]] = set()
        #: set when the server asks for a fresh look at pending updates
        self.check_updates = asyncio.Event()
        #: set when a reboot began: the session leaves its connection
        self.leaving = asyncio.Event()
        self._handlers: dict[str, Handler] = {
            WELCOME: self._on_welcome,
            RUN_COMMAND: self.jobs.handle_run_command,
            PACKAGE_OPERATION: self.jobs.handle_package_operation,
            ACK: self._on_ack,
            ERROR: self._on_error,
            CHECK_UPDATES: self._on_check_updates,
        }

    @property
    def capabilities(self) -> list[str]:
        """What this agent can do, as announced in ``hello``."""
        return ["commands"] + ([self.manager.capability] if self.manager else [])

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop`` is set, reconnecting with backoff after each end."""
        self.jobs.recover()
        backoff = Backoff()
        while not stop.is_set():
            end = await self._session_until(stop)
            if end is None or stop.is_set():
                break
            if end.reason == REBOOTING:
                backoff.reset()  # a leave of the agent's own: as after a fresh start
            delay = next_delay(end, backoff)
            log.info("Reconnecting in %.1fs", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        await self.jobs.shutdown()

    async def _session_until(self, stop: asyncio.Event) -> SessionEnd | None:
        """Run one connection; on ``stop``, stop the jobs and close it (then return None)."""
        session = asyncio.create_task(self._connect_safely())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({session, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if session.done():
            return session.result()
        log.info("Shutting down")
        await self.jobs.shutdown()
        if self.link is not None:
            await self.link.close()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(session, CLOSE_WAIT)
        return None

    async def _connect_safely(self) -> SessionEnd:
        """Run one connection; an unexpected error ends it like a network failure."""
        try:
            return await connect_once(self)
        except Exception as exc:
            log.exception("Unexpected error in the connection")
            return SessionEnd(None, f"agent error: {type(exc).__name__}")

    def attach(self, link: Link) -> None:
        """Use ``link`` for sending from now on."""
        self.link = link

    async def resend_pending(self, link: Link, older_than: float = 0.0) -> None:
        """Send unacknowledged results again (those stored ``older_than`` seconds ago or more).

        Sends are paced to stay well below the server's per-agent message rate limit.
        """
        pending = self.spool.pending(older_than)
        if pending:
            log.info("Sending %d unacknowledged result(s) again", len(pending))
        for message in pending:
            if not await link.send(message):
                break
            await asyncio.sleep(RESEND_PAUSE)

    def detach(self, link: Link) -> None:
        """Stop sending through ``link`` (the connection ended)."""
        if self.link is link:
            self.link = None

    async def emit(self, message: AgentMessage) -> None:
        """Send a progress message if connected; drop it otherwise."""
        if self.link is not None:
            await self.link.send(message)

    async def send_result(self, message: ResultMessage) -> None:
        """Send a stored result if connected; otherwise it goes out after reconnecting.
        A package operation changes the pending updates: they are looked at again."""
        if message["type"] == PACKAGE_RESULT:
            self.check_updates.set()
        if self.link is not None:
            await self.link.send(message)

    async def rebooting(self) -> None:
        """The host is going down: the session closes the connection now, so that the
        server sees the host go; if the agent is still running after the reconnect delay
        (a command that only simulates a reboot), it connects again, with the backoff
        of a fresh start."""
        if self.link is not None:
            self.leaving.set()

    async def handle(self, raw: str | bytes) -> ServerMessage | None:
        """Act on one frame from the server; return the parsed message, if it is one."""
        message = parse(raw)
        if message is None:
            log.warning("Ignoring a frame that is not a protocol message")
            return None
        handler = self._handlers.get(message["type"])
        if handler is None:
            log.debug("Ignoring a message of unknown type %r", message["type"])
            return message
        try:
            await handler(message)
        except Exception:
            log.exception("Error while handling a %s message", message["type"])
        return message

    async def _on_welcome(self, message: ServerMessage) -> None:
        """Adopt the server's intervals unless they were set explicitly."""
        data = message["data"]
        for name in ("heartbeat", "metrics"):
            setting = f"{name}_interval"
            value = data.get(setting)
            if setting in self.config.explicit_intervals or not _valid_interval(value):
                continue
            setattr(self.intervals, name, float(value))
        log.info(
            "Welcome from the server (host id %s); heartbeat every %gs, metrics every %gs",
            data.get("host_id"),
            self.intervals.heartbeat,
            self.intervals.metrics,
        )

    async def _on_ack(self, message: ServerMessage) -> None:
        """Forget an acknowledged result."""
        kind, ref = message["data"].get("kind"), ref_of(message["data"].get("ref"))
        if not isinstance(kind, str) or kind not in RESULT_ID_FIELDS or ref is None:
            log.warning("Ignoring an ack for %r %r", kind, message["data"].get("ref"))
        elif self.spool.discard(kind, ref):
            log.debug("The server acknowledged %s %s", kind, ref)

    async def _on_check_updates(self, message: ServerMessage) -> None:
        """Look at pending updates now and report them, changed or not."""
        self.check_updates.set()

    async def _on_error(self, message: ServerMessage) -> None:
        """Log an error reported by the server; after ``SERVICE_UNAVAILABLE`` (a result
        it could not store for now, perhaps), send the unacknowledged results again once
        its ``retry_after`` has passed, rather than at the next reconnect."""
        data = message["data"]
        log.warning("Server error %s: %s", data.get("code"), data.get("message"))
        unavailable = data.get("code") == SERVICE_UNAVAILABLE
        if unavailable and self.link is not None and not self._retry_due:
            self._retry_due = True
            delay = retry_delay(data.get("retry_after"))
            task = asyncio.create_task(self._resend_after(self.link, delay))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)

    async def _resend_after(self, link: Link, delay: float) -> None:
        """Send the unacknowledged results again on ``link`` in ``delay`` seconds (an
        error in reply to them sets the next try)."""
        try:
            await asyncio.sleep(delay)
        finally:
            self._retry_due = False
        if self.link is link:
            await self.resend_pending(link)


def retry_delay(retry_after: object) -> float:
    """Seconds to wait after a ``SERVICE_UNAVAILABLE`` error with ``retry_after``."""
    if not _valid_interval(retry_after):
        return RETRY_AFTER_DEFAULT
    return min(float(retry_after), RETRY_AFTER_MAX)


def next_delay(end: SessionEnd, backoff: Backoff) -> float:
    """The delay before reconnecting after ``end``."""
    if end.uptime >= BACKOFF_RESET_AFTER:
        backoff.reset()
    if end.auth_failed:
        log.error("The server rejected the token (%s); check the host token", _describe(end))
        return backoff.maximum
    if end.close_code == CLOSE_REPLACED:
        log.warning("Another agent connected with the same token (close code 4009)")
        return backoff.maximum
    if end.close_code == CLOSE_SERVICE_RESTART:
        # The server spreads these closes out itself; another process takes the agent.
        log.info("The server is restarting (%s); reconnecting", _describe(end))
        backoff.reset()
        return backoff.next_delay()
    if end.close_code is not None or end.reason:
        log.warning("Disconnected: %s", _describe(end))
    return backoff.next_delay()


def _describe(end: SessionEnd) -> str:
    """A short description of how a connection ended."""
    if end.close_code is None:
        return end.reason
    return f"close code {end.close_code}" + (f" ({end.reason})" if end.reason else "")


def _valid_interval(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is a usable interval from the server."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0.1 <= value <= 86_400
    )
