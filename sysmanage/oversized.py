"""
Messages larger than the server takes from a socket.

Daphne (Autobahn) drops a connection that sends a message over its
``--websocket-max-message-size``: the peer sees the connection reset, is told nothing,
and an agent reconnects and sends the same message again.  A connection whose
application asks for it when accepting the handshake (``SKIP_OVERSIZED`` true in its
``websocket.accept``) is instead read past such a message: the server
(:mod:`sysmanage.serve`) keeps none of it but its first and last ``KEEP_BYTES`` and
hands the application one ``websocket.receive_oversized`` event with the message's
size and Daphne's limit.  :class:`Oversized` is what the application makes of it (or of
a frame over its own, lower limit): enough to find the ids the message was about.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The key of ``websocket.accept`` that asks the server to skip oversized messages.
SKIP_OVERSIZED = "sysmanage.skip_oversized"
#: The type of the event that tells the application of a message it skipped.
RECEIVE_OVERSIZED = "websocket.receive_oversized"
#: How many bytes of the start and of the end of a message over the limit are kept.
KEEP_BYTES = 64 * 1024
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class Oversized:
    """A message over a limit, not read: its size in bytes, the limit it exceeded, and
    the text of its start and end (the ids of a result are there, around its output)."""

    size: int
    limit: int
    head: str
    tail: str

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Oversized:
        """The ``websocket.receive_oversized`` event of the server."""
        return cls(
            size=int(event["size"]),
            limit=int(event["limit"]),
            head=bytes(event.get("head") or b"").decode("utf-8", "replace"),
            tail=bytes(event.get("tail") or b"").decode("utf-8", "replace"),
        )

    @classmethod
    def from_frame(cls, text: str | None, data: bytes | None, size: int, limit: int) -> Oversized:
        """A frame the server read whole, over the application's own ``limit``."""
        whole = text if text is not None else (data or b"").decode("utf-8", "replace")
        return cls(
            size=size, limit=limit, head=whole[:KEEP_BYTES], tail=whole[KEEP_BYTES:][-KEEP_BYTES:]
        )

    def uuids(self) -> list[str]:
        """The UUIDs in the kept text, canonical, each once, in order."""
        found = _UUID.findall(self.head) + _UUID.findall(self.tail)
        return list(dict.fromkeys(str(uuid.UUID(value)) for value in found))

    def string_field(self, key: str) -> str | None:
        """The first ``"key": "text"`` of the kept text (a message's type or id)."""
        pattern = re.compile(rf'"{re.escape(key)}"\s*:\s*"([^"\\]{{1,100}})"')
        match = pattern.search(self.head) or pattern.search(self.tail)
        return match.group(1) if match else None


def mib(size: int) -> str:
    """``size`` bytes in MiB, for people (``4 MiB``, ``4.06 MiB``)."""
    return f"{size / (1024 * 1024):.3g} MiB"
