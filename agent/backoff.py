"""Reconnect delays: exponential backoff with full jitter."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from ``base`` up to ``cap``, each drawn uniformly below its ceiling.

    This is "full jitter": the n-th delay is ``uniform(0, min(cap, base * 2**n))``, which
    spreads reconnecting agents out instead of having them retry in lockstep.
    """

    def __init__(
        self, base: float = 1.0, cap: float = 60.0, rng: random.Random | None = None
    ) -> None:
        """Start with no failed attempt yet."""
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    @property
    def maximum(self) -> float:
        """The largest delay this backoff ever returns."""
        return self.cap

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 32))

    def next_delay(self) -> float:
        """Return the delay before the next attempt and count this attempt."""
        delay = self._rng.uniform(0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from the smallest ceiling (after a connection that lasted)."""
        self.attempt = 0
