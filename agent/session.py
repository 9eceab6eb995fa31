"""One connection to the server: hello, welcome, then messages until it closes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from agent import __version__
from agent.config import AgentConfig
from agent.facts import collect_facts
from agent.metrics import collect_metrics
from agent.packages.managers import PackageManager
from agent.patches import LIST_TIMEOUT, collect_patch_status
from agent.protocol import (
    CLOSE_AUTH_FAILED,
    CLOSE_GOING_AWAY,
    HEARTBEAT,
    HELLO,
    MAX_FRAME_BYTES,
    METRICS,
    PATCH_STATUS,
    WELCOME,
    AgentMessage,
    HeartbeatData,
    ServerMessage,
    dumps,
    envelope,
)

log = logging.getLogger(__name__)

#: Seconds to wait for ``welcome`` after ``hello``.
WELCOME_TIMEOUT = 30.0
OPEN_TIMEOUT = 20.0
#: Seconds between retries of results that stay unacknowledged on a live connection.
RETRY_UNACKED_EVERY = 300.0
#: A metrics reading that takes longer than this (hung mount) is skipped.
METRICS_TIMEOUT = 10.0
#: Seconds the closing handshake may take when the agent leaves for a reboot.
LEAVE_WAIT = 3.0
#: Seconds between cancellations of a report loop that goes on (:func:`_stop`).
STOP_RETRY = 0.1
REBOOTING = "host rebooting"


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """How a connection attempt ended."""

    close_code: int | None
    reason: str
    uptime: float = 0.0
    welcomed: bool = False
    #: The HTTP status of a refused handshake, if that is how it ended.
    http_status: int | None = None

    @property
    def auth_failed(self) -> bool:
        """Whether the server rejected the token (close 4001, or HTTP 401/403)."""
        return self.close_code == CLOSE_AUTH_FAILED or self.http_status in (401, 403)


class Link:
    """A welcomed connection that the rest of the agent sends through."""

    def __init__(self, websocket: ClientConnection) -> None:
        """Wrap an open connection."""
        self._websocket = websocket

    async def send(self, message: AgentMessage) -> bool:
        """Send ``message``; return False if the connection is already closed."""
        try:
            await self._websocket.send(dumps(message))
        except ConnectionClosed:
            return False
        return True

    async def close(self, reason: str = "agent shutting down") -> None:
        """Close the connection with 1001 (going away)."""
        await self._websocket.close(CLOSE_GOING_AWAY, reason)


class Intervals(Protocol):
    """The heartbeat and metrics intervals in force, in seconds."""

    heartbeat: float
    metrics: float


class Agent(Protocol):
    """What a session needs of the agent that outlives it (:class:`agent.service.Agent`)."""

    config: AgentConfig
    manager: PackageManager | None
    #: set when the server asks for a fresh look at pending updates
    check_updates: asyncio.Event
    #: set when the host is going down (a reboot began): the connection is left
    leaving: asyncio.Event

    @property
    def intervals(self) -> Intervals:
        """The heartbeat and metrics intervals in force (the server may change them)."""

    @property
    def capabilities(self) -> list[str]:
        """What the agent announces in ``hello``."""

    def attach(self, link: Link) -> None:
        """Use ``link`` for everything sent until :meth:`detach`."""

    def detach(self, link: Link) -> None:
        """Stop using ``link`` (its connection ended)."""

    async def handle(self, raw: str | bytes) -> ServerMessage | None:
        """Act on one frame from the server; return the message it held, if any."""

    async def resend_pending(self, link: Link, older_than: float = 0.0) -> None:
        """Send again the results the server has not acknowledged."""


async def connect_once(agent: Agent) -> SessionEnd:
    """Connect, run the session until the connection ends, and say how it ended."""
    url = agent.config.websocket_url
    headers = {"Authorization": f"Bearer {agent.config.token}"}
    log.info("Connecting to %s", url)
    try:
        async with connect(
            url,
            additional_headers=headers,
            max_size=MAX_FRAME_BYTES,
            open_timeout=OPEN_TIMEOUT,
            close_timeout=5,
            user_agent_header=f"sysmanage-agent/{__version__}",
        ) as websocket:
            return await _serve(agent, websocket, time.monotonic())
    except ConnectionClosed as exc:
        return _closed(exc)
    except InvalidStatus as exc:
        status = exc.response.status_code
        log.warning("The server refused the connection with HTTP %d", status)
        return SessionEnd(None, f"HTTP {status}", http_status=status)
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.warning("Cannot connect to %s: %s", url, reason)
        return SessionEnd(None, reason)


async def _serve(agent: Agent, websocket: ClientConnection, opened: float) -> SessionEnd:
    """Say hello, wait for welcome, then handle messages while sending reports."""
    facts = await asyncio.to_thread(collect_facts, agent.config.hostname, agent.capabilities)
    await websocket.send(dumps(envelope(HELLO, facts)))
    end = await _await_welcome(agent, websocket)
    if end is not None:
        return end
    log.info("Connected to the server as %s", facts["hostname"])
    link = Link(websocket)
    agent.attach(link)
    reports = [
        asyncio.create_task(_heartbeats(agent, link)),
        asyncio.create_task(_metrics(agent, link)),
        asyncio.create_task(_resend_results(agent, link)),
        asyncio.create_task(_patch_status(agent, link)),
    ]
    agent.leaving.clear()
    try:
        end = await _receive_until_leaving(agent, websocket)
    finally:
        agent.detach(link)
        await _stop(reports)
    return SessionEnd(end.close_code, end.reason, time.monotonic() - opened, welcomed=True)


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` until they have ended.  One cancellation is not always enough:
    ``asyncio.wait_for`` (Python 3.11) returns the result instead of raising when what it
    waits for ends just as the task is cancelled, and the report loops would then go on
    (a report collected in a thread at the very moment the connection ends)."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=STOP_RETRY)


async def _await_welcome(agent: Agent, websocket: ClientConnection) -> SessionEnd | None:
    """Handle messages until ``welcome``; return how the connection ended if it did first."""
    try:
        async with asyncio.timeout(WELCOME_TIMEOUT):
            while True:
                message = await agent.handle(await websocket.recv())
                if message is not None and message["type"] == WELCOME:
                    return None
    except ConnectionClosed as exc:
        return _closed(exc)
    except TimeoutError:
        log.warning("The server sent no welcome within %gs", WELCOME_TIMEOUT)
        await websocket.close(CLOSE_GOING_AWAY, "no welcome")
        return SessionEnd(None, "no welcome")


async def _receive_until_leaving(agent: Agent, websocket: ClientConnection) -> SessionEnd:
    """Handle server messages until the connection closes, or until the agent leaves it
    because the host is going down."""
    receiving = asyncio.create_task(_receive(agent, websocket))
    leaving = asyncio.create_task(agent.leaving.wait())
    await asyncio.wait({receiving, leaving}, return_when=asyncio.FIRST_COMPLETED)
    leaving.cancel()
    if receiving.done():
        return receiving.result()
    log.warning("The host is rebooting; leaving the connection")
    # Every step is bounded (asyncio.wait, which never waits for a cancelled task): the
    # connection is dropped if the server does not answer the close in time.
    closing = asyncio.create_task(websocket.close(CLOSE_GOING_AWAY, REBOOTING))
    await asyncio.wait({closing}, timeout=LEAVE_WAIT)
    if not closing.done():
        websocket.transport.abort()
        closing.cancel()
    receiving.cancel()
    await asyncio.wait({receiving}, timeout=LEAVE_WAIT)
    return SessionEnd(CLOSE_GOING_AWAY, REBOOTING)


async def _receive(agent: Agent, websocket: ClientConnection) -> SessionEnd:
    """Handle server messages until the connection closes."""
    try:
        while True:
            await agent.handle(await websocket.recv())
    except ConnectionClosed as exc:
        return _closed(exc)


def _closed(exc: ConnectionClosed) -> SessionEnd:
    """The end of a connection that closed, with the server's close code if it sent one."""
    if exc.rcvd is None:
        return SessionEnd(None, "connection lost")
    return SessionEnd(exc.rcvd.code, exc.rcvd.reason)


async def _resend_results(agent: Agent, link: Link) -> None:
    """Send all unacknowledged results now, then retry old ones now and then.

    A result the server could not store (it answered with an error instead of an ack) is
    thus retried on a live connection too, not only after the next reconnect.
    """
    await agent.resend_pending(link)
    while True:
        await asyncio.sleep(RETRY_UNACKED_EVERY)
        await agent.resend_pending(link, older_than=RETRY_UNACKED_EVERY)


async def _heartbeats(agent: Agent, link: Link) -> None:
    """Send a heartbeat every ``heartbeat_interval`` seconds."""
    while True:
        await asyncio.sleep(agent.intervals.heartbeat)
        await link.send(envelope(HEARTBEAT, HeartbeatData()))


async def _metrics(agent: Agent, link: Link) -> None:
    """Send metrics now and then every ``metrics_interval`` seconds."""
    while True:
        try:
            data = await asyncio.wait_for(asyncio.to_thread(collect_metrics), METRICS_TIMEOUT)
        except Exception as exc:
            log.warning("Cannot collect metrics: %s", exc)
        else:
            await link.send(envelope(METRICS, data))
        await asyncio.sleep(agent.intervals.metrics)


async def _patch_status(agent: Agent, link: Link) -> None:
    """Report pending updates and the reboot flag on connecting, then look again every
    ``patch_interval`` seconds and report only a change; at once, changed or not, when
    the server asks (``check_updates``)."""
    last = None
    agent.check_updates.clear()
    while True:
        try:
            data = await asyncio.wait_for(
                asyncio.to_thread(
                    collect_patch_status, agent.manager, agent.config.reboot_required_file
                ),
                LIST_TIMEOUT + 5,
            )
        except Exception as exc:
            log.warning("Cannot collect pending updates: %s", exc)
        else:
            if data != last or agent.check_updates.is_set():
                agent.check_updates.clear()
                if await link.send(envelope(PATCH_STATUS, data)):
                    last = data
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(agent.check_updates.wait(), agent.config.patch_interval)
