"""
Garbage-collection pauses of a server process: kept short, and logged when long.

While CPython's cyclic collector runs, nothing else in the process does: every socket
waits.  A full collection walks every tracked object the process holds; with thousands
of connections that is hundreds of milliseconds, and it came every few seconds under
load (docs/benchmarks.md).  :func:`settle` is called once the server has started (the
application imported, Django set up): it moves everything alive then (modules, settings,
URL patterns, registries) out of the collector's sight with :func:`gc.freeze`, and
raises the thresholds so that the young generations, where a delivery's garbage dies,
are collected less often and the oldest rarely.  :class:`PauseWatch` times every
collection through :data:`gc.callbacks` and logs those over ``GC_PAUSE_LOG_MS``.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any

logger = logging.getLogger("sysmanage.gc")

#: Collect generation 0 after this many allocations net of frees (CPython: 700) ...
THRESHOLD_YOUNG = 50_000
#: ... generation 1 after this many generation-0 collections (CPython: 10) ...
THRESHOLD_MIDDLE = 20
#: ... and generation 2 after this many generation-1 ones (CPython: 10); CPython also
#: waits until a quarter of the long-lived objects are new since the last full one.
THRESHOLD_OLD = 100


class PauseWatch:
    """Times each collection; logs a warning for each one of ``log_over_ms`` or more."""

    def __init__(self, log_over_ms: float) -> None:
        self.log_over_ms = log_over_ms
        self.started = 0.0
        #: per generation: collections seen, and the longest pause (ms)
        self.count = [0, 0, 0]
        self.longest = [0.0, 0.0, 0.0]

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        """Called by the collector before (``start``) and after (``stop``) each run."""
        if phase == "start":
            self.started = time.perf_counter()
            return
        paused = (time.perf_counter() - self.started) * 1000.0
        generation = int(info.get("generation", 2))
        self.count[generation] += 1
        self.longest[generation] = max(self.longest[generation], paused)
        if paused >= self.log_over_ms:
            logger.warning(
                "garbage collection of generation %d paused the process for %.1f ms "
                "(%d objects collected)",
                generation,
                paused,
                info.get("collected", 0),
            )


def settle(log_over_ms: float | None = None, tune: bool | None = None) -> PauseWatch:
    """Freeze what start-up made, raise the collection thresholds (unless ``tune`` is
    false: ``GC_TUNE=0``) and watch pauses (logged from ``GC_PAUSE_LOG_MS``, 50)."""
    if log_over_ms is None:
        log_over_ms = float(os.environ.get("GC_PAUSE_LOG_MS", "50"))
    if tune is None:
        tune = os.environ.get("GC_TUNE", "1") != "0"
    if tune:
        gc.collect()
        gc.freeze()
        gc.set_threshold(THRESHOLD_YOUNG, THRESHOLD_MIDDLE, THRESHOLD_OLD)
    watch = PauseWatch(log_over_ms)
    gc.callbacks.append(watch)
    return watch
