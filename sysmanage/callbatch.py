"""
Reads of many sockets made as one database call.

In a reconnect storm thousands of sockets authenticate at once, each with one read (the
host of an agent token).  One trip to the database threads each is a thread hop, a
pooled connection's check and a query, and every other socket's next step waits behind
them.  A :class:`ReadBatch` gathers the keys that sockets ask for while its previous
read is under way, and reads them all in one call when it ends: one socket alone is
read at once, as before; a crowd waits about one read for a place in the next.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Collection, Mapping
from typing import Generic, TypeVar

from sysmanage.dbthreads import PeerGone, database_sync_to_async, note_skipped

K = TypeVar("K")
V = TypeVar("V")

#: One socket's read: the key, whether its peer is still there, and where the answer goes.
_Ask = tuple[K, Callable[[], bool], "asyncio.Future[V | None]"]


class ReadBatch(Generic[K, V]):
    """Reads of ``read`` (a blocking function given a collection of keys, returning what
    it found by key), one call at a time, each for every key asked for meanwhile (at
    most ``most``)."""

    def __init__(self, read: Callable[[Collection[K]], Mapping[K, V]], *, most: int) -> None:
        self.read = read
        self.most = most
        self.pending: list[_Ask[K, V]] = []
        self._running: asyncio.Task[None] | None = None

    async def get(self, key: K, alive: Callable[[], bool]) -> V | None:
        """What ``read`` finds for ``key`` (None if nothing), for a socket; raises
        :class:`~sysmanage.dbthreads.PeerGone` instead if ``alive()`` says its peer has
        gone by the read."""
        loop = asyncio.get_running_loop()
        if self._running is not None and self._running.get_loop() is not loop:
            self._running, self.pending = None, []  # lost with a loop that has stopped
        answer: asyncio.Future[V | None] = loop.create_future()
        self.pending.append((key, alive, answer))
        if self._running is None:
            self._start()
        return await answer

    def _start(self) -> None:
        asks, self.pending = self.pending[: self.most], self.pending[self.most :]
        # A fresh context: the batch belongs to none of the sockets.
        self._running = asyncio.get_running_loop().create_task(
            self._read(asks), context=contextvars.Context()
        )

    async def _read(self, asks: list[_Ask[K, V]]) -> None:
        try:
            found, gone = await database_sync_to_async(self._read_live)(asks)
        except Exception as exc:
            for _, _, answer in asks:
                if not answer.done():
                    answer.set_exception(exc)
        else:
            for n, (key, _, answer) in enumerate(asks):
                if answer.done():  # its socket's handler was cancelled
                    continue
                if n in gone:
                    answer.set_exception(PeerGone())
                else:
                    answer.set_result(found.get(key))
        finally:
            self._running = None
            if self.pending:
                self._start()

    def _read_live(self, asks: list[_Ask[K, V]]) -> tuple[Mapping[K, V], set[int]]:
        """In a database thread: read the keys of the sockets still there."""
        gone = {n for n, (_, alive, _) in enumerate(asks) if not alive()}
        note_skipped(len(gone))
        keys = {key for n, (key, _, _) in enumerate(asks) if n not in gone}
        return (self.read(keys) if keys else {}), gone
