"""
A lean connection to Redis for the one command every server process sends all the time:
reading the channel streams (``XREAD``, :class:`sysmanage.streams.RedisStreams`).

Every process reads every event published in the cluster, so what a read costs per
event bounds how far a cluster grows (docs/benchmarks.md).  redis-py parses a reply one
element at a time through its asyncio stream reader and wraps each command in pool and
retry logic; for a reply of a few stream entries that is most of the process's cost of
receiving an event.  Here the command is written as one buffer and its reply is taken
in one read, and parsed by slicing the bytes (:func:`parse`): a few microseconds per
entry.  Everything else (publishing, histories, scripts) goes through redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Sequence
from typing import Any

#: How much of a reply one socket read takes at most.
READ_SIZE = 1 << 18


class Incomplete(Exception):
    """The buffer ends before the reply does: read more."""


class ReplyError(Exception):
    """Redis answered with an error."""


class ProtocolError(Exception):
    """The bytes are not a RESP2 reply."""


def parse(buf: bytes, pos: int = 0) -> tuple[Any, int]:
    """Parse the RESP2 value starting at ``buf[pos]``; return it and where it ends.

    Bulk strings come back as ``bytes``, arrays as lists, nulls as None, integers as
    ``int``; an error reply raises :class:`ReplyError`, a buffer that ends early
    :class:`Incomplete`.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise Incomplete
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        start = end + 2
        stop = start + size
        if stop + 2 > len(buf):
            raise Incomplete
        return buf[start:stop], stop + 2
    if kind == 42:  # * array
        count = int(buf[pos + 1 : end])
        if count < 0:
            return None, end + 2
        pos = end + 2
        items = []
        for _ in range(count):
            item, pos = parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 58:  # : integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 43:  # + simple string
        return buf[pos + 1 : end], end + 2
    if kind == 45:  # - error
        raise ReplyError(buf[pos + 1 : end].decode(errors="replace"))
    raise ProtocolError(f"unexpected reply type {chr(kind)!r}")


class Reply:
    """A reply being read: :meth:`feed` it bytes until it says the reply is whole."""

    def __init__(self) -> None:
        self._buf = b""
        #: the parsed reply, once :meth:`feed` returned True
        self.value: Any = None

    def feed(self, chunk: bytes) -> bool:
        """Take the next bytes; return whether the reply is complete."""
        self._buf += chunk
        try:
            self.value, end = parse(self._buf)
        except Incomplete:
            return False
        if end != len(self._buf):
            raise ProtocolError("more bytes than one reply")
        return True


#: One stream entry as the streams store it (sysmanage.streams.PUBLISH_SCRIPT): its id
#: and the fields e (epoch), t (time), h (host), p (payload), up to the payload's bytes.
#: Matched in one step; any other shape is parsed element by element.
_ENTRY = re.compile(
    rb"\*2\r\n\$\d+\r\n(\d+)-\d+\r\n\*8\r\n"
    rb"\$1\r\ne\r\n\$(\d+)\r\n([^\r\n]*)\r\n"
    rb"\$1\r\nt\r\n\$\d+\r\n\d+\r\n"
    rb"\$1\r\nh\r\n\$(\d+)\r\n([^\r\n]*)\r\n"
    rb"\$1\r\np\r\n\$(\d+)\r\n"
)

#: An entry read from a stream: offset, then the fields as a flat list of names and values.
RawEntry = tuple[int, list[bytes]]


def parse_entry(buf: bytes, pos: int) -> tuple[RawEntry, int]:
    """Parse the stream entry at ``buf[pos]`` (``[id, [name, value, …]]``)."""
    found = _ENTRY.match(buf, pos)
    if found is not None:
        offset, epoch_size, epoch, host_size, host, size = found.groups()
        start = found.end()
        stop = start + int(size)
        if len(epoch) == int(epoch_size) and len(host) == int(host_size):
            if stop + 2 > len(buf):
                raise Incomplete
            fields = [b"e", epoch, b"h", host, b"p", buf[start:stop]]
            return (int(offset), fields), stop + 2
    value, end = parse(buf, pos)
    if not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], bytes):
        raise ProtocolError("not a stream entry")
    entry_id, fields = value
    return (int(entry_id.split(b"-", 1)[0]), list(fields or ())), end


def _array_size(buf: bytes, pos: int) -> tuple[int, int]:
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise Incomplete
    if buf[pos] != 42:  # *
        parse(buf, pos)  # an error reply raises
        raise ProtocolError("expected an array")
    return int(buf[pos + 1 : end]), end + 2


class StreamsReply(Reply):
    """The reply to ``XREAD``, parsed entry by entry as its bytes arrive (a reply of a
    thousand entries comes in several reads; none is parsed twice).  Its value is a list
    of ``(stream key, [RawEntry, …])``, or None when the read timed out."""

    def __init__(self) -> None:
        super().__init__()
        self._pos = 0
        self._streams_left: int | None = None
        self._entries_left = 0
        self.value: list[tuple[bytes, list[RawEntry]]] | None = []

    def feed(self, chunk: bytes) -> bool:
        """Take the next bytes; return whether the reply is complete."""
        buf = self._buf[self._pos :] + chunk if self._pos < len(self._buf) else chunk
        pos = 0
        try:
            if self._streams_left is None:
                self._streams_left, pos = _array_size(buf, pos)
                if self._streams_left < 0:
                    self.value = None
                    self._streams_left = 0
            assert self.value is not None or self._streams_left == 0
            while self._entries_left or self._streams_left:
                if self._entries_left:
                    entry, pos = parse_entry(buf, pos)
                    self.value[-1][1].append(entry)  # type: ignore[index]
                    self._entries_left -= 1
                    continue
                pair, at = _array_size(buf, pos)
                key, at = parse(buf, at)
                count, at = _array_size(buf, at)
                if pair != 2 or not isinstance(key, bytes):
                    raise ProtocolError("not a stream of an XREAD reply")
                self.value.append((key, []))  # type: ignore[union-attr]
                self._streams_left -= 1
                self._entries_left, pos = count, at
        except Incomplete:
            self._buf, self._pos = buf, pos
            return False
        if pos != len(buf):
            raise ProtocolError("more bytes than one reply")
        return True


def pack(args: Sequence[bytes]) -> bytes:
    """One command in RESP2, ready to write."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def connection_options(url: str) -> dict[str, Any]:
    """Where and how to connect for ``url`` (``redis://``, ``rediss://``, ``unix://``),
    read as redis-py reads it."""
    from redis.asyncio.connection import parse_url

    options: dict[str, Any] = dict(parse_url(url))
    connection_class = options.pop("connection_class", None)
    if connection_class is not None and connection_class.__name__ == "SSLConnection":
        context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
        if options.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        options["ssl"] = context
    return options


class Connection:
    """One connection to Redis that sends a command and awaits its reply, one at a time.

    It connects on first use (authenticating and selecting the database of the URL);
    any failure closes it, and the next command connects again.
    """

    def __init__(self, url: str, *, timeout: float = 30.0, connect_timeout: float = 5.0) -> None:
        self.options = connection_options(url)
        #: seconds a reply may take beyond any blocking the command asked for
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        options = self.options
        async with asyncio.timeout(self.connect_timeout):
            if "path" in options:
                reader, writer = await asyncio.open_unix_connection(options["path"])
            else:
                reader, writer = await asyncio.open_connection(
                    options.get("host", "localhost"),
                    int(options.get("port", 6379)),
                    ssl=options.get("ssl"),
                )
        self._reader, self._writer = reader, writer
        password = options.get("password")
        if password is not None:
            user = options.get("username")
            credentials = [user, password] if user else [password]
            await self._call([b"AUTH", *(str(c).encode() for c in credentials)], 0.0, Reply())
        if int(options.get("db") or 0):
            await self._call([b"SELECT", str(options["db"]).encode()], 0.0, Reply())

    async def execute(
        self, args: Sequence[bytes], block_seconds: float = 0.0, reply: type[Reply] = Reply
    ) -> Any:
        """Send one command and return its parsed reply (as a ``reply`` parses it; by
        default with :func:`parse`); ``block_seconds`` is how long Redis may hold the
        reply back (a blocking read), on top of :attr:`timeout`."""
        # A connection opened before Redis restarted is dead and fails at its next use:
        # that use is tried once more on a new connection, not taken for an outage.
        attempts = 2 if self._writer is not None else 1
        for attempt in range(attempts):
            try:
                if self._writer is None:
                    await self._connect()
                return await self._call(args, block_seconds, reply())
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt + 1 == attempts:
                    raise
            except BaseException:
                await self.close()
                raise
        raise AssertionError("unreachable")

    async def _call(self, args: Sequence[bytes], block_seconds: float, reply: Reply) -> Any:
        reader, writer = self._reader, self._writer
        assert reader is not None
        assert writer is not None
        writer.write(pack(args))
        async with asyncio.timeout(block_seconds + self.timeout):
            while True:
                chunk = await reader.read(READ_SIZE)
                if not chunk:
                    raise ConnectionError("Redis closed the connection")
                if reply.feed(chunk):
                    return reply.value

    async def close(self) -> None:
        """Close the connection (the next command opens a new one)."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
