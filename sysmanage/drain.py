"""
Draining a server process that is told to stop, so that a restart loses nothing and
shows no client an error.

When the process gets SIGTERM (``systemctl stop``, a rolling restart), ``sysmanage.serve``
runs :func:`drain` before Daphne shuts down:

1. At once, ``/readyz`` answers 503 ``draining`` and new WebSocket handshakes are refused
   with HTTP 503 before they are accepted, so that a proxy sends them to another process
   (nginx: ``proxy_next_upstream http_503``) and a client without a proxy retries.  HTTP
   requests are still served.
2. The open sockets are closed with 1012 "service restart", one after another, spread
   evenly over the first part of ``DRAIN_SECONDS`` (:func:`spread`), so that twenty
   thousand clients do not come back in the same second, and the last of them is back
   on another process before the window ends.  A socket whose agent still owes the
   result of work it was sent (:meth:`Drainable.owes_results`) is closed once the
   result arrived, or when the window ends: what an agent has not sent by then it keeps
   and sends again after reconnecting.
3. Once every socket is closed and every connection's handler has finished (at most
   :data:`FINISH_SECONDS` after the window), and what the process published has left
   for the layer, Daphne stops as it always does and the process exits 0.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Protocol

logger = logging.getLogger(__name__)

#: The close code a drained socket gets (RFC 6455 "Service Restart": reconnect).
SERVICE_RESTART = 1012
#: The reason sent with it.
SERVICE_RESTART_REASON = "service restart"
#: After the window, how long closed connections' handlers (storing a result, marking a
#: host offline) and the last publications may take before the process stops anyway.
FINISH_SECONDS = 5.0
#: How often the drain looks at its schedule (seconds).
TICK = 0.05
#: The end of the window kept for the last clients closed to reconnect elsewhere:
#: this share of it, at most :data:`RECONNECT_SECONDS`.
RECONNECT_SHARE = 0.2
RECONNECT_SECONDS = 2.0


class Drainable(Protocol):
    """An open socket that a drain closes (:class:`sysmanage.connection.Connection`)."""

    def close_for_restart(self) -> None:
        """Close with :data:`SERVICE_RESTART` (scheduled, not awaited)."""

    def owes_results(self) -> bool:
        """Whether the peer still owes results of work it was sent on this socket."""


_open: weakref.WeakSet[Drainable] = weakref.WeakSet()
_since: float | None = None


def track(conn: Drainable) -> None:
    """Note an accepted socket; a socket accepted while draining is closed at once."""
    _open.add(conn)


def forget(conn: Drainable) -> None:
    """The socket ended."""
    _open.discard(conn)


def draining() -> bool:
    """Whether this process is draining (and so not ready for new clients)."""
    return _since is not None


def draining_since() -> float | None:
    """When the drain began (epoch seconds), if it did."""
    return _since


def begin() -> None:
    """Start refusing new sockets and answering ``/readyz`` with 503 (idempotent)."""
    global _since
    if _since is None:
        _since = time.time()


def due(count: int, elapsed: float, window: float) -> int:
    """How many of ``count`` sockets are to be closed ``elapsed`` seconds into a drain
    of ``window`` seconds: the k-th (from 0) at ``window * k / count``."""
    if elapsed >= window or count == 0:
        return count
    # (a turn that falls on ``elapsed`` is due, whatever the rounding of the division)
    return min(count, math.floor(count * elapsed / window + 1e-9) + 1)


def spread(window: float) -> float:
    """Seconds over which a drain of ``window`` seconds closes its sockets: the window,
    less the time its last clients get to reconnect elsewhere before it ends."""
    return window - min(RECONNECT_SECONDS, window * RECONNECT_SHARE)


class Drain:
    """One drain of this process's sockets over ``window`` seconds."""

    def __init__(self, window: float) -> None:
        self.window = max(0.0, window)
        self.spread = spread(self.window)
        self.queue: collections.deque[Drainable] = collections.deque()
        self.seen: weakref.WeakSet[Drainable] = weakref.WeakSet()
        self.waiting: list[Drainable] = []
        #: sockets seen (counted here: a closed one may leave ``seen`` when it is freed)
        self.total = 0
        self.scheduled = 0  #: sockets whose turn came (closed, or waiting for results)
        self.closed = 0
        self.waited = 0  #: sockets closed later than their turn, for results owed

    def _take_new(self) -> None:
        """Queue sockets not seen yet (at start, and those accepted since)."""
        for conn in list(_open):
            if conn not in self.seen:
                self.seen.add(conn)
                self.queue.append(conn)
                self.total += 1

    def _close(self, conn: Drainable) -> None:
        self.closed += 1
        try:
            conn.close_for_restart()
        except Exception:
            logger.exception("could not close a socket while draining")

    def step(self, elapsed: float) -> None:
        """Close the sockets whose turn has come ``elapsed`` seconds into the drain."""
        self._take_new()
        over = elapsed >= self.window
        target = due(self.total, elapsed, self.spread)
        while self.scheduled < target and self.queue:
            conn = self.queue.popleft()
            self.scheduled += 1
            if not over and conn.owes_results():
                self.waiting.append(conn)
            else:
                self._close(conn)
        still = []
        for conn in self.waiting:
            if over or not conn.owes_results():
                self.waited += 1
                self._close(conn)
            else:
                still.append(conn)
        self.waiting = still

    def done(self) -> bool:
        """Whether every socket seen has been closed."""
        return not self.queue and not self.waiting


async def drain(
    window: float,
    *,
    busy: Callable[[], int],
    settle: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Drain this process (see the module's description).

    ``busy`` says how many connections' handlers (WebSocket or HTTP) have not finished;
    ``settle``, if given, is awaited last (in the time left) to let what the process
    published leave for the layer.
    """
    begin()
    loop = asyncio.get_running_loop()
    start = loop.time()
    plan = Drain(window)
    plan.step(0.0)
    logger.info(
        "draining: refusing new sockets, closing %d open socket(s) over %.1fs (1012 service "
        "restart)",
        plan.total,
        plan.window,
    )
    deadline = plan.window + FINISH_SECONDS
    while True:
        elapsed = loop.time() - start
        plan.step(elapsed)
        if plan.done() and (elapsed >= plan.window or not _open) and busy() == 0:
            break
        if elapsed >= deadline:
            logger.warning(
                "drain: %d connection handler(s) still running after %.1fs; stopping anyway",
                busy(),
                elapsed,
            )
            break
        await asyncio.sleep(TICK)
    if settle is not None:
        try:
            async with asyncio.timeout(max(0.5, deadline - (loop.time() - start))):
                await settle()
        except TimeoutError:
            logger.warning("stopping with events not yet handed to the channel layer")
    logger.info(
        "drained in %.1fs: %d socket(s) closed, %d of them after their agent's results",
        loop.time() - start,
        plan.closed,
        plan.waited,
    )
