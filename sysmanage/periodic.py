"""
Periodic jobs: the maintenance every server process runs on a schedule.

Apps register jobs from ``AppConfig.ready`` with :func:`register_periodic`.  Each server
process's :class:`~sysmanage.node.Node` runs every registered job once when it starts
and then every ``interval()`` seconds: a sync function in the database thread, a
coroutine function on the node's loop, given the process's hub (for jobs that read its
connections).  Jobs must be safe to run in several processes at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from sysmanage import dbgate
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.hub import Hub

logger = logging.getLogger(__name__)

#: A sync function run in the database thread, or a coroutine function given the hub.
PeriodicJob = Callable[[], object] | Callable[[Hub], Awaitable[object]]


@dataclass(frozen=True)
class Periodic:
    """One registered job and how often it runs."""

    name: str
    interval: Callable[[], float]
    job: PeriodicJob


_JOBS: dict[str, Periodic] = {}


def register_periodic(name: str, interval: Callable[[], float], job: PeriodicJob) -> None:
    """Run ``job`` every ``interval()`` seconds in each server process (after a first run).

    Apps register maintenance here from ``AppConfig.ready``; jobs must be safe to run in
    several processes at once.  Refuses a second job under the same name.
    """
    if name in _JOBS and _JOBS[name].job is not job:
        raise ValueError(f"periodic job {name!r} is registered already")
    _JOBS[name] = Periodic(name, interval, job)


def registered() -> list[Periodic]:
    """Every registered job, in registration order."""
    return list(_JOBS.values())


async def run_forever(periodic: Periodic, hub: Hub) -> None:
    """Run ``periodic``'s job now and then after every interval; log its failures."""
    while True:
        try:
            if inspect.iscoroutinefunction(periodic.job):
                await cast(Callable[[Hub], Awaitable[object]], periodic.job)(hub)
            else:
                await database_sync_to_async(cast(Callable[[], object], periodic.job))()
        except asyncio.CancelledError:
            raise
        except Exception:
            dbgate.log_exception(logger, "periodic job %s failed", periodic.name)
        await asyncio.sleep(periodic.interval())
