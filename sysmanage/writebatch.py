"""
Writes gathered on the event loop and made together in the database thread.

Some writes follow every few messages of every agent: a host's last-seen time, a minute
of its metrics history.  One trip to the database thread each is a thread hop and a
transaction, hundreds a second for a large fleet, and the message that caused it waits
for it.  A :class:`WriteBatch` gathers such writes on the event loop instead, without
waiting, and ``delay`` seconds after the first of them hands them all to one function
run in the database thread.

What a batch holds is lost if the process (or its event loop) ends before its timer
fires, at most ``delay`` seconds of writes, so batches are for writes that a crash may
lose anyway (history, liveness); a write that fails is logged and not retried.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from sysmanage import dbgate
from sysmanage.dbthreads import database_sync_to_async

logger = logging.getLogger(__name__)

T = TypeVar("T")


class WriteBatch(Generic[T]):
    """Items noted on the event loop, written together by ``write`` (a blocking function
    given the list of them) in the database thread, ``delay`` seconds after the first."""

    def __init__(self, write: Callable[[list[T]], object], *, what: str, delay: float) -> None:
        self.write = write
        #: what the items are, for the log
        self.what = what
        self.delay = delay
        self.pending: list[T] = []
        #: the loop whose timer will write the pending items
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writes: set[asyncio.Task[None]] = set()

    def add(self, item: T) -> None:
        """Have ``item`` written within ``delay`` seconds (called on the event loop)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # no timer yet, or one on a loop that has stopped
            if self._loop is not None and not self._loop.is_running():
                self.pending.clear()  # lost with that loop, as with a process that ends
            self._loop = loop
            loop.call_later(self.delay, self.flush)
        self.pending.append(item)

    def flush(self) -> None:
        """Start writing every pending item in the database thread, without waiting."""
        loop, self._loop = self._loop, None
        if not self.pending or loop is None:
            return
        items, self.pending = self.pending, []
        # A fresh context: the timer runs in the context of whoever added first, which a
        # sync_to_async worker may have left marked as one (asgiref would refuse the call).
        task = loop.create_task(self._write(items), context=contextvars.Context())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, items: list[T]) -> None:
        try:
            await database_sync_to_async(self.write)(items)
        except Exception:
            dbgate.log_exception(logger, "could not write %d %s", len(items), self.what)
