"""
Riding through database faults: an unreachable database is refused at once, a busy one
is answered "retry shortly", and neither fills the log with tracebacks.

Two kinds of fault are told apart (:func:`unavailable`):

``unreachable``
    connections cannot be made or were lost: the database stopped, restarted, or its
    host or network is gone.  The first failed connection attempt (made for a request,
    or by the connection pool in the background) closes each process's
    :class:`DatabaseGate`: from then on every attempt to connect fails at once with
    :class:`DatabaseUnavailable`, instead of waiting for a connection timeout or a pool
    timeout per request.  A watcher thread tries a connection of its own every
    :data:`PROBE_INTERVAL` seconds and opens the gate again as soon as one succeeds, so
    service comes back within moments of the database, without a restart.  The gate
    also throws the backend's connection pool away (its waiting requests fail at once,
    and the pool's reconnection back-off, up to minutes, no longer delays recovery).
``busy``
    the database answers but could not take the work in time: SQLite's write lock was
    held longer than its timeout, or no pooled connection was free within
    ``DB_POOL_TIMEOUT``.  Nothing is closed; the request may simply be retried.

HTTP requests that meet either get 503 with ``Retry-After``
(:class:`sysmanage.middleware.DatabaseUnavailableMiddleware`); sockets get
``SERVICE_UNAVAILABLE`` and 4503 at connect, or the same error in reply to a message.
The outage is logged when it starts, once per :data:`LOG_INTERVAL` while it lasts (with
how many attempts were refused) and when it ends; other faults (a busy database, a
connection lost while the gate is open) at most once per interval with their count
(:func:`note`).
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import psycopg
from django.db import InterfaceError, OperationalError
from psycopg_pool import PoolClosed, PoolTimeout, TooManyRequests

from sysmanage.protocol import ErrorCode, ServerMessage, error_envelope

logger = logging.getLogger(__name__)

Fault = Literal["unreachable", "busy"]

#: Seconds a client is told to wait before retrying (``Retry-After``, ``retry_after``).
RETRY_AFTER = 2
#: Seconds between connection attempts while the database is unreachable.
PROBE_INTERVAL = 0.5
#: Connection attempts that may be under way at once (a black-holed attempt lasts the
#: whole connect timeout; overlapping them keeps the probing every PROBE_INTERVAL).
MAX_PROBES = 4
#: Seconds between log lines about one ongoing fault.
LOG_INTERVAL = 60.0

#: PostgreSQL error classes that mean the server cannot serve connections now:
#: connection exceptions, shutting down, crashed, starting up, too many connections.
_UNREACHABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")


class DatabaseUnavailable(OperationalError):
    """Refused without trying: the database was found unreachable and has not answered
    a connection attempt since."""


def explain(fault: Fault) -> str:
    """What a client is told about ``fault``."""
    return (
        "The server cannot reach its database" if fault == "unreachable" else "The database is busy"
    )


def socket_error(
    fault: Fault, *, channel: str = "system", id_: str | int | None = None
) -> ServerMessage:
    """The ``SERVICE_UNAVAILABLE`` error of the WebSocket protocols: before closing with
    4503 at connect, or in reply to a message that needed the database."""
    return error_envelope(
        ErrorCode.SERVICE_UNAVAILABLE,
        f"{explain(fault)}; try again in a moment",
        channel=channel,
        id_=id_,
        retry_after=RETRY_AFTER,
    )


def first_line(exc: BaseException) -> str:
    """The first line of what ``exc`` says (its type when it says nothing)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def unavailable(exc: BaseException | None) -> Fault | None:
    """Whether ``exc`` (a Django database error) means the database is ``unreachable``
    or ``busy``; None for any other error, which is a bug to report as such."""
    if isinstance(exc, DatabaseUnavailable):
        return "unreachable"
    if isinstance(exc, InterfaceError):
        return "unreachable"
    if not isinstance(exc, OperationalError):
        return None
    cause = exc.__cause__
    if isinstance(cause, sqlite3.OperationalError):
        return "busy" if "locked" in str(cause) else None
    if isinstance(cause, PoolTimeout | TooManyRequests):
        return "busy"
    if isinstance(cause, PoolClosed | psycopg.InterfaceError):
        return "unreachable"
    if isinstance(cause, psycopg.OperationalError):
        state = cause.sqlstate
        return "unreachable" if state is None or state.startswith(_UNREACHABLE_SQLSTATES) else None
    return None


@dataclass
class _Tally:
    """How often a fault was met since it was last logged."""

    count: int = 0
    logged_at: float = float("-inf")


_TALLIES: dict[Fault, _Tally] = {"busy": _Tally(), "unreachable": _Tally()}
_TALLIES_LOCK = threading.Lock()
#: How each fault is named in the log when it is not a refusal of a closed gate.
_LOGGED_AS: dict[Fault, str] = {
    "busy": "database busy",
    "unreachable": "database connection failed",
}


def note(fault: Fault, exc: BaseException) -> None:
    """Count one request or job that ``fault`` stopped, and log the count at most once
    per :data:`LOG_INTERVAL` (the first one at once).  Refusals of a closed gate are
    counted and logged by the gate itself, and so is a connection that failed during
    an outage of the default database (the failure that began it, one of its probes)."""
    if isinstance(exc, DatabaseUnavailable):
        return
    if fault == "unreachable" and gate().outage() is not None:
        return
    now = time.monotonic()
    with _TALLIES_LOCK:
        tally = _TALLIES[fault]
        tally.count += 1
        if now - tally.logged_at < LOG_INTERVAL:
            return
        count, tally.count, tally.logged_at = tally.count, 0, now
    logger.warning(
        "%s (%s): %d request(s) or job(s) told to retry since the last report",
        _LOGGED_AS[fault],
        first_line(exc),
        count,
    )


def log_exception(log: logging.Logger, message: str, *args: object) -> Fault | None:
    """Log the exception being handled like ``log.exception`` -- unless it is a database
    fault, which is counted (:func:`note`) instead of logged with a traceback.  Returns
    the fault, if it was one."""
    exc = sys.exc_info()[1]
    fault = unavailable(exc)
    if fault is None:
        log.exception(message, *args)
    else:
        assert exc is not None
        note(fault, exc)
    return fault


@dataclass
class DatabaseGate:
    """One database's availability in this process (see the module's description).

    ``probe`` tries a connection of its own and raises if it fails; ``reset`` discards
    the connection pool.  Both are given by the database backend and run in the gate's
    watcher thread only.
    """

    alias: str
    probe: Callable[[], None] | None = None
    reset: Callable[[], None] | None = None
    #: ``time.monotonic()`` when the outage began; None while the database is reachable
    down_since: float | None = None
    down_since_wall: datetime | None = None
    reason: str = ""
    refused: int = 0
    refused_total: int = 0
    #: ``time.monotonic()`` of the last recovery: attempts that began before it and fail
    #: after it belong to the outage, not to a new one
    recovered_at: float = float("-inf")
    #: the number of outages so far: a probe counts only for the outage it was made in
    outages: int = 0
    _reset_wanted: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def refuse_if_down(self) -> None:
        """Raise :class:`DatabaseUnavailable` while the database is unreachable."""
        if self.down_since is None:
            return
        with self._lock:
            if self.down_since is None:
                return
            self.refused += 1
            reason = self.reason
        raise DatabaseUnavailable(f"the database is unreachable: {reason}")

    def connect_failed(self, exc: BaseException, *, started: float) -> None:
        """A connection attempt that began at ``started`` (``time.monotonic()``) failed
        with ``exc``: close the gate (or, if it is closed, discard the pool again)."""
        with self._lock:
            if self.down_since is not None:
                self._reset_wanted = True
                return
            if started < self.recovered_at:
                return  # began during the outage that just ended
            self.down_since, self.down_since_wall = time.monotonic(), datetime.now(UTC)
            self.reason = first_line(exc)
            self.refused, self.refused_total = 0, 0
            self._reset_wanted = True
            self.outages += 1
            outage = self.outages
        logger.warning(
            "database unreachable (%s): requests and sockets that need it are refused "
            "at once until it answers again",
            self.reason,
        )
        threading.Thread(
            target=self._watch,
            args=(outage, threading.Event()),
            name=f"database-gate-{self.alias}",
            daemon=True,
        ).start()

    def _watch(self, outage: int, recovered: threading.Event) -> None:
        """Discard the pool, then try to connect every PROBE_INTERVAL until it works."""
        attempts: list[threading.Thread] = []
        logged = time.monotonic()
        while not recovered.is_set():
            with self._lock:
                reset, self._reset_wanted = self._reset_wanted, False
            if reset and self.reset is not None:
                self.reset()
            attempts = [a for a in attempts if a.is_alive()]
            if len(attempts) < MAX_PROBES:
                attempt = threading.Thread(
                    target=self._attempt, args=(outage, recovered), daemon=True
                )
                attempt.start()
                attempts.append(attempt)
            if recovered.wait(PROBE_INTERVAL):
                break
            if time.monotonic() - logged >= LOG_INTERVAL:
                logged = time.monotonic()
                self._log_still_down()

    def _attempt(self, outage: int, recovered: threading.Event) -> None:
        """One probe made during ``outage``: if it connects, that outage is over."""
        if self.probe is None:
            return
        try:
            self.probe()
        except Exception as exc:
            with self._lock:
                if self.outages == outage:
                    self.reason = first_line(exc)
            return
        with self._lock:
            if self.down_since is None or self.outages != outage:
                return  # a late probe of an outage that ended already
            lasted = time.monotonic() - self.down_since
            refused = self.refused_total + self.refused
            self.down_since, self.down_since_wall = None, None
            self.recovered_at = time.monotonic()
            recovered.set()
        logger.warning(
            "database reachable again after %.1f s; %d attempt(s) to use it were refused meanwhile",
            lasted,
            refused,
        )

    def _log_still_down(self) -> None:
        with self._lock:
            if self.down_since is None:
                return
            lasted = time.monotonic() - self.down_since
            refused, self.refused = self.refused, 0
            self.refused_total += refused
        logger.warning(
            "database still unreachable after %.0f s (%s); %d attempt(s) to use it "
            "refused since the last report",
            lasted,
            self.reason,
            refused,
        )

    def outage(self) -> tuple[datetime, str] | None:
        """Since when and why the database is unreachable, or None if it is not."""
        since = self.down_since_wall
        return None if since is None else (since, self.reason)


_GATES: dict[str, DatabaseGate] = {}
_GATES_LOCK = threading.Lock()


def gate(alias: str = "default") -> DatabaseGate:
    """The gate of database ``alias`` in this process."""
    with _GATES_LOCK:
        found = _GATES.get(alias)
        if found is None:
            found = _GATES[alias] = DatabaseGate(alias)
        return found
