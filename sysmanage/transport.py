"""
Writing frames to one WebSocket without waiting, with a bound on memory.

Under Daphne the ASGI ``send`` callable is ``partial(server.handle_reply, protocol)``;
its ``protocol`` is Autobahn's, whose writes are synchronous appends to the Twisted
transport.  :class:`Outbound` writes pre-framed messages straight to it (framing each
distinct payload once for every recipient) and reads the transport's write buffer to
find clients that stopped reading.

Twisted never writes at once: ``transport.write`` buffers the bytes and registers the
socket for writability, so each frame to each socket costs two ``epoll_ctl`` calls and
a later reactor pass, and no subscriber gets a byte before the whole fan-out is queued.
When a plain TCP socket has nothing buffered, :class:`Outbound` therefore sends the
frame with one non-blocking ``send()`` and hands only an unsent remainder to Twisted
(``docs/benchmarks.md`` measured this at about a quarter of the CPU per delivery).

Under any other server it falls back to a bounded queue drained by a writer task.
Either way, delivering a frame never blocks the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

#: Frames a fallback queue holds before its client counts as too slow.
FALLBACK_QUEUE_FRAMES = 2000
#: How long a close waits for queued frames to be written first.
FLUSH_SECONDS = 2.0


class Frame:
    """One serialized server message, shared by every recipient of the same payload."""

    __slots__ = ("_factory", "_prepared", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._prepared: Any = None
        self._factory: Any = None

    def prepared_for(self, factory: Any) -> Any:
        """The message framed once by ``factory`` (Autobahn's), reused for every socket."""
        if self._factory is not factory:
            self._prepared = factory.prepareMessage(self.text.encode("utf-8"), isBinary=False)
            self._factory = factory
        return self._prepared


class _Joined:
    """Several prepared messages' wire bytes, one after the other (what Autobahn's
    ``sendPreparedMessage`` reads of a prepared message when nothing is compressed)."""

    __slots__ = ("payloadHybi",)

    doNotCompress = True  # noqa: N815 - the name Autobahn reads

    def __init__(self, wire: bytes) -> None:
        self.payloadHybi = wire


class FrameRun(Frame):
    """Consecutive frames that the same sockets get, written with one ``send()`` each.

    The hub gathers the events of one read from the streams (:meth:`Hub.gathered
    <sysmanage.hub.Hub.gathered>`): every subscriber of a bucket gets the same frames in
    the same order, so their wire bytes are joined once per bucket, and a socket costs
    one system call per read instead of one per event.  Where frames cannot be joined
    (a compressing connection, the queue of other servers) each is delivered alone.
    """

    __slots__ = ("parts",)

    def __init__(self, parts: list[Frame]) -> None:
        super().__init__("")
        self.parts = parts

    def prepared_for(self, factory: Any) -> Any:
        """The frames' wire bytes joined, once for every socket."""
        if self._factory is not factory:
            self._prepared = _Joined(
                b"".join(part.prepared_for(factory).payloadHybi for part in self.parts)
            )
            self._factory = factory
        return self._prepared


def _raw_socket(protocol: Any) -> socket.socket | None:
    """The plain TCP socket under ``protocol``, or None (TLS, or not Twisted's TCP)."""
    try:  # imported here: Twisted is optional outside Daphne
        from twisted.internet import tcp
    except ImportError:  # pragma: no cover - Daphne always brings Twisted
        return None
    transport = getattr(protocol, "transport", None)
    # A TLS wrapper is not a tcp.Connection (and would forward .socket to the raw one).
    if type(transport) is not tcp.Server or getattr(transport, "TLS", True):
        return None
    raw = getattr(transport, "socket", None)
    return raw if isinstance(raw, socket.socket) else None


def _daphne_protocol(send: Any) -> Any:
    """Return Daphne's protocol object behind an ASGI ``send`` callable, if it is one."""
    if isinstance(send, functools.partial) and send.args:
        protocol = send.args[0]
        if hasattr(protocol, "sendPreparedMessage") and hasattr(protocol, "transport"):
            return protocol
    return None


class Outbound:
    """The outgoing side of one client connection."""

    __slots__ = (
        "_max_buffer",
        "_on_overflow",
        "_protocol",
        "_queue",
        "_send",
        "_socket",
        "_tcp",
        "_writer",
        "overflowed",
    )

    def __init__(
        self,
        send: Callable[[dict[str, Any]], Awaitable[None]],
        *,
        max_buffer_bytes: int,
        on_overflow: Callable[[], None],
    ) -> None:
        self._send = send
        self._protocol = _daphne_protocol(send)
        self._socket = _raw_socket(self._protocol) if self._protocol is not None else None
        # Twisted's TCP transport, read directly on the hot path (see backlog_bytes).
        self._tcp = self._protocol.transport if self._socket is not None else None
        self._max_buffer = max_buffer_bytes
        self._on_overflow = on_overflow
        self._queue: asyncio.Queue[str] | None = None
        self._writer: asyncio.Task[None] | None = None
        self.overflowed = False
        if self._protocol is None:
            self._queue = asyncio.Queue(maxsize=FALLBACK_QUEUE_FRAMES)
            self._writer = asyncio.ensure_future(self._drain_queue())

    @property
    def direct(self) -> bool:
        """Whether frames go straight to the socket (Daphne) rather than through a queue."""
        return self._protocol is not None

    def backlog_bytes(self) -> int:
        """Bytes written to the socket but not yet taken by the client (0 if unknown)."""
        transport = getattr(self._protocol, "transport", None)
        if transport is None:
            return 0
        data = getattr(transport, "dataBuffer", b"")
        offset = getattr(transport, "offset", 0)
        pending = getattr(transport, "_tempDataLen", 0)
        return len(data) - offset + pending

    def deliver(self, frame: Frame) -> None:
        """Send ``frame`` now or queue it; a client too far behind is reported once."""
        if self.overflowed:
            return
        protocol = self._protocol
        if type(frame) is FrameRun and (protocol is None or protocol._perMessageCompress):
            for part in frame.parts:
                self.deliver(part)
            return
        if protocol is not None:
            if protocol.state != protocol.STATE_OPEN:
                return
            transport = self._tcp
            backlog = (
                len(transport.dataBuffer) - transport.offset + transport._tempDataLen
                if transport is not None
                else self.backlog_bytes()
            )
            if backlog > self._max_buffer:
                self._overflow()
                return
            prepared = frame.prepared_for(protocol.factory)
            sock = self._socket
            if (
                backlog == 0
                and sock is not None
                and not protocol.send_queue
                and (protocol._perMessageCompress is None or prepared.doNotCompress)
            ):
                self._send_now(sock, prepared.payloadHybi)
            else:
                protocol.sendPreparedMessage(prepared)
            return
        assert self._queue is not None
        try:
            self._queue.put_nowait(frame.text)
        except asyncio.QueueFull:
            self._overflow()

    def _send_now(self, sock: socket.socket, data: bytes) -> None:
        """One non-blocking send; whatever the kernel does not take goes to Twisted."""
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # the connection is failing; Twisted's write path reports it
        if sent < len(data):
            self._protocol.transport.write(data[sent:])

    def send_text(self, text: str) -> None:
        """Send a message meant for this connection only (replies, errors, snapshots)."""
        self.deliver(Frame(text))

    async def flush(self) -> None:
        """Wait (at most FLUSH_SECONDS) until queued frames are written; used before a close."""
        if self._queue is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_SECONDS):
                await self._queue.join()

    def stop(self) -> None:
        """Stop the writer task; called when the connection ends."""
        if self._writer is not None:
            self._writer.cancel()

    def _overflow(self) -> None:
        self.overflowed = True
        self._on_overflow()

    async def _drain_queue(self) -> None:
        assert self._queue is not None
        while True:
            text = await self._queue.get()
            try:
                await self._send({"type": "websocket.send", "text": text})
            except Exception:  # the socket is gone; the consumer's disconnect cleans up
                logger.debug("dropping frame for a closed connection", exc_info=True)
            finally:
                self._queue.task_done()
