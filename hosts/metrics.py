"""
Live metrics: validated on arrival, published at once, persisted one row a minute.

Agents report every few seconds.  Writing each report would tie up the database thread
that every consumer of a Daphne process shares, so each agent connection keeps a
:class:`MinuteAggregator` and writes one averaged row when a minute is complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

MAX_MOUNTS = 64


class MetricsError(ValueError):
    """A metrics report that does not have the documented shape."""


def _percent(value: Any, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= 100
    ):
        raise MetricsError(f"'{name}' must be a percentage from 0 to 100")
    return round(float(value), 2)


def clean_metrics(raw: Any) -> dict[str, Any]:
    """Validate an agent's ``metrics`` object; return it with only the known keys."""
    if not isinstance(raw, dict):
        raise MetricsError("'metrics' must be an object")
    cleaned: dict[str, Any] = {}
    if "cpu_usage" in raw:
        cleaned["cpu_usage"] = _percent(raw["cpu_usage"], "cpu_usage")
    if "memory_usage" in raw:
        cleaned["memory_usage"] = _percent(raw["memory_usage"], "memory_usage")
    if "disk_usage" in raw:
        disks = raw["disk_usage"]
        if not isinstance(disks, dict) or len(disks) > MAX_MOUNTS:
            raise MetricsError(f"'disk_usage' must map at most {MAX_MOUNTS} mount points")
        cleaned["disk_usage"] = {
            str(mount)[:255]: _percent(value, f"disk_usage[{mount}]")
            for mount, value in disks.items()
        }
    if "load_average" in raw:
        load = raw["load_average"]
        if (
            not isinstance(load, list)
            or len(load) != 3
            or not all(
                isinstance(v, int | float)
                and not isinstance(v, bool)
                and math.isfinite(v)
                and v >= 0
                for v in load
            )
        ):
            raise MetricsError("'load_average' must be a list of three non-negative numbers")
        cleaned["load_average"] = [round(float(v), 2) for v in load]
    if not cleaned:
        raise MetricsError(
            "'metrics' has none of cpu_usage, memory_usage, disk_usage, load_average"
        )
    return cleaned


@dataclass
class MinuteAggregator:
    """Averages one host's reports per minute; hands back each minute once it is over."""

    minute: datetime | None = None
    count: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)

    def add(
        self, at: datetime, metrics: dict[str, Any]
    ) -> tuple[datetime, int, dict[str, Any]] | None:
        """Add one report; return ``(minute, samples, averages)`` of a finished minute."""
        minute = at.replace(second=0, microsecond=0)
        finished = self.flush() if self.minute is not None and minute != self.minute else None
        self.minute = minute
        self.count += 1
        for key in ("cpu_usage", "memory_usage"):
            if key in metrics:
                self.sums[key] = self.sums.get(key, 0.0) + metrics[key]
                self.counts[key] = self.counts.get(key, 0) + 1
        for key in ("disk_usage", "load_average"):
            if key in metrics:
                self.last[key] = metrics[key]
        return finished

    def flush(self) -> tuple[datetime, int, dict[str, Any]] | None:
        """Return the current minute's averages (if any) and start afresh."""
        if self.minute is None or self.count == 0:
            return None
        averages: dict[str, Any] = {
            key: round(self.sums[key] / self.counts[key], 2) for key in self.sums
        }
        averages.update(self.last)
        result = (self.minute, self.count, averages)
        self.minute, self.count = None, 0
        self.sums, self.counts, self.last = {}, {}, {}
        return result
