"""
A minimal WebSocket client on a plain ``asyncio.Protocol``, for load generators.

It does only what a benchmark client needs and does it cheaply: the opening handshake
(not checked beyond the status line), unfragmented text frames out (masked with a zero
key, which RFC 6455 allows and which spares XOR-ing every byte), frames in parsed from
one buffer without copying a message that is only counted (:meth:`RawSocket.on_message`
gets the buffer and the message's bounds), pings answered, a close frame noted.  Many
hundreds of these run in one process; per delivered message it costs a few slices and
a callback, where a full client library costs a frame object, a queue and often a task.
"""

from __future__ import annotations

import asyncio
import base64
import os
from typing import TypeVar
from urllib.parse import urlsplit

OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
#: The four bytes of a zero mask key: masking with it leaves the payload as it is.
ZERO_MASK = b"\x00\x00\x00\x00"


S = TypeVar("S", bound="RawSocket")


def frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final, masked (with a zero key) client frame carrying ``payload``."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return head + ZERO_MASK + payload


def handshake(url: str, headers: dict[str, str] | None = None) -> bytes:
    """The opening HTTP request for ``url`` (``ws://host:port/path?query``)."""
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawSocket(asyncio.Protocol):
    """One client WebSocket.  Subclasses override :meth:`on_open` and :meth:`on_message`."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.request = handshake(url, headers)
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.closed = False
        #: set when the handshake succeeded (or failed: then it holds the error)
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the opening handshake."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        """Parse every complete frame in what has arrived."""
        buf = self.buffer
        buf += data
        start = 0
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            start = end + 4
            if b" 101 " not in status + b" ":
                self._fail(ConnectionError(f"handshake refused: {status.decode(errors='replace')}"))
                return
            self.upgraded = True
            self.on_open()
        size = len(buf)
        while size - start >= 2:
            length = buf[start + 1] & 0x7F
            head = 2
            if length == 126:
                if size - start < 4:
                    break
                length = int.from_bytes(buf[start + 2 : start + 4], "big")
                head = 4
            elif length == 127:
                if size - start < 10:
                    break
                length = int.from_bytes(buf[start + 2 : start + 10], "big")
                head = 10
            end = start + head + length
            if end > size:
                break
            opcode = buf[start] & 0x0F
            if opcode == OP_TEXT:
                self.on_message(buf, start + head, end)
            elif opcode == OP_PING:
                self.send(bytes(buf[start + head : end]), OP_PONG)
            elif opcode == OP_CLOSE:
                self.closed = True
            start = end
        if start:
            del buf[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        """Note the loss; fail an open still under way."""
        self.closed = True
        self._fail(ConnectionError(f"connection lost: {exc}"))

    # for subclasses

    def on_open(self) -> None:
        """Called once the server accepted the handshake."""
        self.opened.set_result(None)

    def on_message(self, buf: bytearray, start: int, end: int) -> None:
        """Called for each text message, which is ``buf[start:end]`` (valid only now)."""

    # helpers

    def send(self, payload: bytes, opcode: int = OP_TEXT) -> None:
        """Send one message."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(payload, opcode))

    def close(self) -> None:
        """Send a close frame (1000) and drop the connection."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(b"\x03\xe8", OP_CLOSE))
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once."""
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
            if self.transport is not None:
                self.transport.abort()


async def open_raw(sock: S, url: str, timeout: float) -> S:
    """Connect ``sock`` (already made for ``url``) and wait for its handshake."""
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"{url} names no host and port")
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        await loop.create_connection(lambda: sock, parts.hostname, parts.port)
        await sock.opened
    return sock
