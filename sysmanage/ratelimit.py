"""
Rate limits of WebSocket connections: a token bucket per connection, and a window of
refusals after which a client that keeps sending is disconnected.
"""

from __future__ import annotations

import time

#: Messages refused for rate within RATE_VIOLATION_WINDOW seconds that close the socket.
MAX_RATE_VIOLATIONS = 100
RATE_VIOLATION_WINDOW = 10.0


class TokenBucket:
    """Allows ``rate`` messages a second on average, in bursts of up to ``burst``."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.updated = time.monotonic()

    def take(self) -> float:
        """Take one token; return 0 if allowed, else the seconds until one is free."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RefusalWindow:
    """The messages refused for rate within the last ``window`` seconds."""

    __slots__ = ("limit", "times", "window")

    def __init__(
        self, limit: int = MAX_RATE_VIOLATIONS, window: float = RATE_VIOLATION_WINDOW
    ) -> None:
        self.limit = limit
        self.window = window
        self.times: list[float] = []

    def record(self) -> bool:
        """Note one refusal; True when more than ``limit`` fell within the window."""
        now = time.monotonic()
        self.times = [t for t in self.times if now - t < self.window] + [now]
        return len(self.times) > self.limit
