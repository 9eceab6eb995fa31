"""A TCP relay between an agent and the server, which a test can cut or freeze."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable


class Relay:
    """Relays every connection to ``127.0.0.1:target_port``.

    :meth:`cut` drops every relayed connection at once (both sides see it end);
    :meth:`freeze` drops only the agent's side and swallows what the server sends, so
    that the server still believes the agent is connected; between :meth:`refuse` and
    :meth:`accept` new connections are dropped as soon as they arrive (the network is down
    for as long as the test needs).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.refusing = False
        self.clients: list[asyncio.StreamWriter] = []
        self.upstreams: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        """Listen on a free port; return it."""
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.clients.append(writer)
        self.upstreams.append(up_writer)

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep_open: Callable[[], bool]
        ) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if self.frozen:
                        continue  # swallowed
                    dst.write(data)
                    await dst.drain()
            if not keep_open():
                dst.close()

        await asyncio.gather(
            pipe(reader, up_writer, lambda: self.frozen), pipe(up_reader, writer, lambda: False)
        )

    def cut(self) -> None:
        """Drop every relayed connection at once (both directions)."""
        for writer in self.clients + self.upstreams:
            if writer.transport is not None:
                writer.transport.abort()
        self.clients.clear()
        self.upstreams.clear()

    def freeze(self) -> None:
        """Drop the agent's side; keep the server's open and swallow what it sends."""
        self.frozen = True
        for writer in self.clients:
            if writer.transport is not None:
                writer.transport.abort()

    def refuse(self) -> None:
        """Drop every new connection at once, until :meth:`accept`."""
        self.refusing = True

    def accept(self) -> None:
        """Relay new connections again."""
        self.refusing = False

    async def close(self) -> None:
        """Stop listening and drop everything."""
        self.cut()
        if self.server is not None:
            self.server.close()
