"""
What every WebSocket connection of the server shares, whoever is at the other end.

:class:`Connection` is the base of the client consumer (``/ws``), the product's agent
consumer (``/ws/agent``) and the SysManage agent's (``/api/agent/connect``):

- it has no layer channel of its own: events, control messages and work reach it
  through the process's :class:`~sysmanage.hub.Hub`, which saves a layer round trip
  (and a Redis connection) per socket; so it awaits its socket's messages alone,
  without the task and ``asyncio.wait`` per frame that Channels spends on waiting for
  a socket and a layer channel at once;
- everything it sends goes through one :class:`~sysmanage.transport.Outbound`, opened
  when the handshake is accepted, so that it leaves in the order it was produced;
- the tasks it starts end with it;
- it closes with an explanation: a last message, then the close code (the code alone
  when the peer stopped reading, since nothing more can reach it);
- a peer that stops reading (the outbound buffer overflows) is closed as a slow
  consumer, so that it reconnects and catches up rather than holding memory;
- every frame it receives, whatever it holds, takes a token of the endpoint's rate
  before anything parses it; a frame over the rate is refused, and a peer that keeps
  sending through the refusals is closed (4029);
- a connection that says so (``skips_oversized``) asks the server to read past messages
  over Daphne's limit instead of dropping it, and hears of each (:meth:`oversized`);
- it holds as little as it can while idle, since a process holds thousands of them
  (docs/benchmarks.md, "Memory per idle socket"): it awaits the server's messages itself
  rather than through channels' task-per-receive loop, and makes its set of tasks and
  its window of rate refusals only when it first needs them;
- a subclass may take some frames as the server hands them over, while it waits
  (:meth:`Connection.receive_at_once`; the agents' metrics), with no task step per frame.

Subclasses say how a message is encoded, what a peer that stopped reading is told, and
how the hub's reasons for closing are put to their peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from asgiref.typing import ASGIReceiveCallable, ASGISendCallable, WebSocketDisconnectEvent
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from sysmanage import drain, metrics
from sysmanage.dbthreads import database_sync_to_async_while
from sysmanage.dispatch import NoPerMessageCleanupMixin
from sysmanage.oversized import SKIP_OVERSIZED, Oversized
from sysmanage.protocol import CloseCode, ErrorCode, dumps, error_envelope, request_id_of
from sysmanage.ratelimit import RefusalWindow, TokenBucket
from sysmanage.transport import Outbound

if TYPE_CHECKING:
    from channels.consumer import _ChannelScope

    from sysmanage.hub import CloseReason, Hub

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")


class Connection(NoPerMessageCleanupMixin, AsyncWebsocketConsumer):
    """One WebSocket connection: outbound path, tasks, closing and overflow."""

    # No per-connection layer channel: everything reaches the socket through the hub.
    channel_layer_alias = "__hub_only__"

    hub: Hub | None = None
    outbound: Outbound | None = None
    closing = False
    #: the user behind the socket; None for agents, which the hub's user index skips
    user_id: str | None = None
    session_tag: str | None = None
    #: what a peer that stopped reading is told, should it read again
    overflow_reason = "Too many undelivered messages; reconnect"
    #: the endpoint's rate of frames, set when its connection is accepted
    bucket: TokenBucket | None = None
    #: what ``/metrics`` counts this connection as
    metric_kind = "client"
    #: whether messages over the server's limit are skipped and handed to
    #: :meth:`oversized` (rather than the server dropping the connection)
    skips_oversized = False

    #: the tasks this connection started and that have not ended (made on first use)
    tasks: set[asyncio.Task[Any]] | None = None
    #: the frames recently refused for rate (made at the first refusal)
    rate_refusals: RefusalWindow | None = None
    #: the server's inbox of this socket's messages, when it says whether the socket has
    #: closed (``sysmanage.serve.Inbox``)
    inbox: Any = None

    async def __call__(
        self, scope: _ChannelScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Called by the server for the connection's whole life: hand each of the
        socket's messages to its handler, one after another, until a handler stops.

        Channels' consumer does the same through ``await_many_dispatch``, which runs
        every ``receive()`` in a task of its own and waits on it with ``asyncio.wait``
        (a task, a future, a set and three suspended coroutines per idle socket).  With
        no layer channel there is only one source to wait on, so it is awaited directly.
        """
        self.scope = scope
        self.base_send = send
        # Daphne's inbox of this connection (sysmanage.serve.Inbox), if it offers messages
        # as they arrive and this connection takes some of them so.
        inbox: Any = getattr(receive, "__self__", None)
        if hasattr(inbox, "peer_gone"):
            self.inbox = inbox
        if type(self).receive_at_once is Connection.receive_at_once or not hasattr(
            inbox, "at_once"
        ):
            inbox = None
        else:
            inbox.at_once = self.receive_at_once
        try:
            with contextlib.suppress(StopConsumer):
                while True:
                    await self.dispatch(cast("dict[str, Any]", await receive()))
        finally:
            if inbox is not None:
                inbox.at_once = None

    def peer_alive(self) -> bool:
        """Whether the socket is still open as far as the server knows: False once it has
        closed, even while its ``websocket.disconnect`` waits behind this connection's
        work (any thread may ask)."""
        return not (self.inbox is not None and self.inbox.peer_gone)

    def database(
        self, func: Callable[_P, _R], *, ahead: bool = False
    ) -> Callable[_P, Coroutine[Any, Any, _R]]:
        """``func`` run in the database threads for this socket, unless its peer has
        gone by the call's turn (then :class:`~sysmanage.dbthreads.PeerGone` is raised);
        ``ahead`` of the calls queued without, for a call that completes what the peer
        waits for."""
        return database_sync_to_async_while(self.peer_alive, func, ahead=ahead)

    def receive_at_once(self, message: dict[str, Any]) -> bool:
        """Called by the server with one of the socket's messages as it arrives, while
        this connection waits for one: take it now and return True, or return False to
        have it dispatched as usual.  It must not block, and says nothing it cannot
        finish at once.  The default takes none."""
        return False

    async def _accept(self, subprotocol: str | None = None) -> None:
        """Complete the handshake and open the outbound path (refusals too are
        accepted first, so that they can be explained)."""
        # The server's own send callable (no middleware wraps it), which lets the outbound
        # path write to Daphne's protocol directly; it sends it plain dicts.
        raw_send = cast("Callable[[dict[str, Any]], Awaitable[None]]", self.base_send)
        if self.skips_oversized:
            await raw_send(
                {"type": "websocket.accept", "subprotocol": subprotocol, SKIP_OVERSIZED: True}
            )
        else:
            await self.accept(subprotocol=subprotocol)
        self.outbound = Outbound(
            raw_send,
            max_buffer_bytes=settings.WS_MAX_SEND_BUFFER_BYTES,
            on_overflow=self._on_overflow,
        )
        drain.track(self)

    async def websocket_disconnect(self, message: WebSocketDisconnectEvent) -> None:
        """Called when the socket closes, whoever closed it: count it, then
        :meth:`disconnect`."""
        metrics.socket_closed(self.metric_kind, message.get("code"))
        await super().websocket_disconnect(message)

    def _release(self) -> None:
        """Called on disconnect: end this connection's tasks and its outbound path."""
        drain.forget(self)
        for task in self.tasks or ():
            task.cancel()
        if self.outbound is not None:
            self.outbound.stop()

    # -- sending --------------------------------------------------------------------------

    def encode(self, message: Mapping[str, Any]) -> str:
        """One message as the text of a frame."""
        return dumps(message)

    def send_text(self, text: str) -> None:
        """Send one frame, in order with everything else this connection sends."""
        if self.outbound is not None:
            self.outbound.send_text(text)

    def reply(self, message: Mapping[str, Any]) -> None:
        """Send one message (a reply, an error)."""
        self.send_text(self.encode(message))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task that ends with the connection; return the task."""
        task = asyncio.ensure_future(coro)
        if self.tasks is None:
            self.tasks = set()
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- receiving ------------------------------------------------------------------------

    async def _within_rate(self, text: str | None) -> bool:
        """Take a token for this frame (text or binary, parsed or not, before anything
        parses it).  Over the rate, refuse it; when refusals keep coming, close (4029)."""
        wait = self.bucket.take() if self.bucket is not None else 0.0
        if wait == 0:
            return True
        metrics.frame_refused(self.metric_kind, "rate")
        if self.rate_refusals is None:
            self.rate_refusals = RefusalWindow()
        if self.rate_refusals.record():
            await self._close_with(CloseCode.RATE_LIMITED, self._rate_closing_message())
            return False
        self.reply(self._rate_refusal(text, wait))
        return False

    async def websocket_receive_oversized(self, event: dict[str, Any]) -> None:
        """Called by the server (for connections that skip them) for a message over its
        limit, which it read past without keeping it."""
        if not self.closing and await self._within_rate(None):
            metrics.frame_refused(self.metric_kind, "too_large")
            await self.oversized(Oversized.from_event(event))

    async def oversized(self, message: Oversized) -> None:
        """Called for a message over a limit, not processed: by default the peer is told
        and closed (4013)."""
        await self._close_with(
            CloseCode.MESSAGE_TOO_BIG,
            error_envelope(ErrorCode.MESSAGE_TOO_LARGE, f"Message exceeds {message.limit} bytes"),
        )

    def _rate_refusal(self, text: str | None, wait: float) -> Mapping[str, Any]:
        """The reply to one frame over the rate (the seed's error envelope by default)."""
        return error_envelope(
            ErrorCode.RATE_LIMITED,
            "Too many messages; this one was not processed",
            id_=request_id_of(text) if text else None,
            retry_after=round(wait, 3),
        )

    def _rate_closing_message(self) -> Mapping[str, Any]:
        """The last message to a peer closed for sending through its refusals."""
        return error_envelope(ErrorCode.RATE_LIMITED, "Too many messages; connection closed")

    # -- closing --------------------------------------------------------------------------

    def _before_close(self) -> None:
        """Called as closing starts (clients leave the hub at once)."""

    def _close_reason(self, message: Mapping[str, Any]) -> str | None:
        """The close frame's reason when ``message`` cannot be sent (none by default)."""
        return None

    async def _close_with(self, code: int, message: Mapping[str, Any]) -> None:
        """Send ``message`` (normally an error) and close with ``code``."""
        self.closing = True
        self._before_close()
        assert self.outbound is not None
        if self.outbound.overflowed:
            # The buffer is full: only the close frame can still say why.
            await self.close(code=int(code), reason=self._close_reason(message))
            return
        self.reply(message)
        await self.outbound.flush()
        await self.close(code=int(code))

    def _closing_message(self, code: int, error: CloseReason) -> Mapping[str, Any]:
        """The message that tells the peer why the hub closes it (``error`` as it is)."""
        return error

    def close_from_hub(self, code: int, error: CloseReason) -> None:
        """Called by the hub: access revoked, token rotated, host deleted, replaced by a
        newer connection, or the peer stopped reading."""
        if not self.closing:
            self.closing = True
            self._spawn(self._close_with(code, self._closing_message(code, error)))

    def close_for_restart(self) -> None:
        """Called while the process drains (:mod:`sysmanage.drain`): close with 1012
        "service restart", after which the peer reconnects, to another process."""
        if not self.closing and self.outbound is not None:
            self.closing = True
            self._before_close()
            self._spawn(self.close(code=drain.SERVICE_RESTART))

    def owes_results(self) -> bool:
        """Whether the peer still owes results of work sent on this socket (the drain
        closes such a socket last); agents say."""
        return False

    def _log_overflow(self) -> None:
        """Say in the log which connection stopped reading."""
        logger.warning("closing a connection that stopped reading")

    def _on_overflow(self) -> None:
        """The peer stopped reading: close it so that it reconnects and catches up."""
        self._log_overflow()
        self.close_from_hub(
            CloseCode.SLOW_CONSUMER, error_envelope(ErrorCode.SLOW_CONSUMER, self.overflow_reason)
        )
