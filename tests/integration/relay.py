"""TCP relays a test can cut: between an agent and the server (:class:`Relay`), and in
front of a database (:class:`CuttableRelay`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
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


class CuttableRelay:
    """A TCP relay on a fixed loopback port, in threads of its own, in front of a
    service (PostgreSQL) that the tests must not stop, since others share it.

    :meth:`cut` drops every relayed connection and then, by ``mode``, either stops
    listening (``"refuse"``: connections are refused, as by a stopped server) or keeps
    accepting without ever answering (``"blackhole"``: connections hang, as behind a
    dead host or a dropped route); :meth:`restore` relays again on the same port.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.mode = "open"
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def start(self) -> int:
        """Listen on a free port; return it."""
        self._listen()
        return self.port

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: the relay was cut (refuse) or closed
            with self._lock:
                self._sockets.append(client)
                if self.mode != "open":
                    continue  # black hole: held open, never read, never answered
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                self._abort(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.append(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    @staticmethod
    def _abort(sock: socket.socket) -> None:
        """Close with a reset, as a crashed or killed peer would.

        The shutdown comes first because closing a socket that another thread is
        blocked reading (a pipe thread) neither wakes that thread nor tells the peer
        anything on Linux: the socket lives on until the read returns.  A query in
        flight at the cut then waited forever for an answer, instead of failing.
        """
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()

    def cut(self, mode: str = "refuse") -> None:
        """Drop every relayed connection; then refuse or black-hole new ones."""
        assert mode in ("refuse", "blackhole"), mode
        with self._lock:
            self.mode = mode
            sockets, self._sockets = self._sockets, []
            listener = self._listener if mode == "refuse" else None
            if listener is not None:
                self._listener = None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for sock in sockets:
            self._abort(sock)

    def restore(self) -> None:
        """Relay new connections again, on the same port."""
        with self._lock:
            held, self._sockets = self._sockets, []
            mode, self.mode = self.mode, "open"
        for sock in held:  # connections that hung in the black hole fail now
            self._abort(sock)
        if mode == "refuse":
            self._listen()

    def close(self) -> None:
        """Stop listening and drop everything."""
        self.cut("refuse")
