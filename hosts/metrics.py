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
from typing import Final, Literal, TypedDict

MAX_MOUNTS = 64
#: The figures averaged over a minute.
PercentKey = Literal["cpu_usage", "memory_usage"]
PERCENT_KEYS: Final[tuple[PercentKey, ...]] = ("cpu_usage", "memory_usage")


class Metrics(TypedDict, total=False):
    """A checked metrics report (at least one of its figures): percentages, per mount for
    the disks, and the 1, 5 and 15 minute load averages."""

    cpu_usage: float
    memory_usage: float
    disk_usage: dict[str, float]
    load_average: list[float]


class MinuteAverages(TypedDict, total=False):
    """One minute of a host's reports, as :func:`hosts.services.metric_sample_save` stores
    it: the percentages averaged (None when none was reported), the disks and load as
    last reported."""

    cpu_usage: float | None
    memory_usage: float | None
    disk_usage: dict[str, float]
    load_average: list[float]


class MetricsError(ValueError):
    """A metrics report that does not have the documented shape."""


def _percent(value: object, name: str) -> float:
    if type(value) is float and 0.0 <= value <= 100.0:  # what agents send (NaN fails)
        return round(value, 2)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= 100
    ):
        raise MetricsError(f"'{name}' must be a percentage from 0 to 100")
    return round(float(value), 2)


def _load(value: object) -> bool:
    if type(value) is float:
        return 0.0 <= value < math.inf  # NaN fails
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def clean_metrics(raw: object) -> Metrics:
    """Validate an agent's ``metrics`` object; return it with only the known keys."""
    if not isinstance(raw, dict):
        raise MetricsError("'metrics' must be an object")
    cleaned: Metrics = {}
    for key in PERCENT_KEYS:
        if key in raw:
            cleaned[key] = _percent(raw[key], key)
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
        if not isinstance(load, list) or len(load) != 3 or not all(map(_load, load)):
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
    last: MinuteAverages = field(default_factory=MinuteAverages)

    def add(self, at: datetime, metrics: Metrics) -> tuple[datetime, int, MinuteAverages] | None:
        """Add one report; return ``(minute, samples, averages)`` of a finished minute."""
        minute = at.replace(second=0, microsecond=0)
        finished = self.flush() if self.minute is not None and minute != self.minute else None
        self.minute = minute
        self.count += 1
        for key in PERCENT_KEYS:
            if key in metrics:
                self.sums[key] = self.sums.get(key, 0.0) + metrics[key]
                self.counts[key] = self.counts.get(key, 0) + 1
        if "disk_usage" in metrics:
            self.last["disk_usage"] = metrics["disk_usage"]
        if "load_average" in metrics:
            self.last["load_average"] = metrics["load_average"]
        return finished

    def flush(self) -> tuple[datetime, int, MinuteAverages] | None:
        """Return the current minute's averages (if any) and start afresh."""
        if self.minute is None or self.count == 0:
            return None
        averages: MinuteAverages = {}
        for key in PERCENT_KEYS:
            if key in self.sums:
                averages[key] = round(self.sums[key] / self.counts[key], 2)
        averages.update(self.last)
        result = (self.minute, self.count, averages)
        self.minute, self.count = None, 0
        self.sums, self.counts, self.last = {}, {}, {}
        return result
