"""
Admission limits of ``/ws``: open sockets per user, failed authentications per address.

Both are counted per server process, in memory, like the hub's registry of sockets they
protect: one user cannot hold more than ``WS_MAX_SOCKETS_PER_USER`` sockets of a
process (refused with ``TOO_MANY_CONNECTIONS``, close 4429), and an address whose
handshakes failed authentication ``WS_AUTH_FAILURES_PER_ADDRESS`` times within
``WS_AUTH_FAILURE_WINDOW_SECONDS`` is refused at once, before any database work, until
the oldest of those failures leaves the window (``TOO_MANY_AUTH_FAILURES``, close 4403).
Attempts refused that way are not counted, so the block ends on time.  IPv6 addresses
count per /64, the block a single host usually holds.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Any

from django.conf import settings

#: Addresses remembered at most; the least recently failing are forgotten first.
MAX_TRACKED_ADDRESSES = 10_000


def address_key(scope: Mapping[str, Any]) -> str | None:
    """The address a handshake is counted under (None when the server does not know it).

    Behind a reverse proxy this is the proxy's address unless Daphne runs with
    ``--proxy-headers``.
    """
    client = scope.get("client")
    host = client[0] if client else None
    if not host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return str(host)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class AuthFailures:
    """Failed socket authentications per address within a sliding window."""

    def __init__(self, max_addresses: int = MAX_TRACKED_ADDRESSES) -> None:
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        # Handshakes run on the event loop, but tests and tools may call from threads.
        self._lock = threading.Lock()

    def blocked_for(self, key: str | None, *, now: float | None = None) -> float:
        """Seconds until ``key`` may try again; 0 when it may now."""
        limit, window = settings.WS_AUTH_FAILURES_PER_ADDRESS, _window()
        if key is None or limit <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            failures = self._failures.get(key)
            if failures is None:
                return 0.0
            while failures and failures[0] <= now - window:
                failures.popleft()
            if len(failures) < limit:
                return 0.0
            return failures[-limit] + window - now

    def record(self, key: str | None, *, now: float | None = None) -> None:
        """Count one failed authentication from ``key``."""
        limit = settings.WS_AUTH_FAILURES_PER_ADDRESS
        if key is None or limit <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            failures = self._failures.get(key)
            if failures is None or failures.maxlen != limit:
                failures = deque(failures or (), maxlen=limit)
                self._failures[key] = failures
            failures.append(now)
            self._failures.move_to_end(key)
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)

    def clear(self) -> None:
        """Forget every failure (tests)."""
        with self._lock:
            self._failures.clear()


def _window() -> float:
    return float(settings.WS_AUTH_FAILURE_WINDOW_SECONDS)


#: This process's count of failed socket authentications.
AUTH_FAILURES = AuthFailures()


def retry_after(seconds: float) -> int:
    """Whole seconds to tell a refused client (at least 1)."""
    return max(1, math.ceil(seconds))


def over_user_limit(open_sockets: int) -> bool:
    """Whether a user who holds ``open_sockets`` in this process may not open another."""
    limit = settings.WS_MAX_SOCKETS_PER_USER
    return limit > 0 and open_sockets >= limit
