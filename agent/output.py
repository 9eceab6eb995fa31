"""Reading a child's output in chunks while keeping only the first bytes."""

from __future__ import annotations

import asyncio
import codecs

CHUNK_SIZE = 64 * 1024


class CappedOutput:
    """Keeps at most ``limit`` bytes of a stream, notes whether more arrived and counts
    every byte (``size``)."""

    def __init__(self, limit: int) -> None:
        """Start empty."""
        self.limit = limit
        self._buffer = bytearray()
        self.truncated = False
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        """Add ``chunk``; bytes beyond the limit are dropped."""
        self.size += len(chunk)
        room = self.limit - len(self._buffer)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        self._buffer.extend(chunk)

    def text(self) -> str:
        """The kept bytes as UTF-8 (invalid bytes replaced; a cut character dropped)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return decoder.decode(bytes(self._buffer), final=not self.truncated)

    def __len__(self) -> int:
        """The number of bytes kept."""
        return len(self._buffer)


async def drain(stream: asyncio.StreamReader | None, sink: CappedOutput) -> None:
    """Read ``stream`` to its end into ``sink``; memory stays bounded by the sink's limit."""
    if stream is None:
        return
    while chunk := await stream.read(CHUNK_SIZE):
        sink.feed(chunk)
