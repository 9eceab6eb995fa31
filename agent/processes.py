"""Supervising child processes: timeouts, process-group kills, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Sequence

log = logging.getLogger(__name__)

#: Seconds to wait for a killed child and its output to wind down.
KILL_GRACE = 2.0
#: Seconds to keep reading output after the process exited (background children).
OUTPUT_GRACE = 2.0
#: Seconds between checks whether a process has exited.
EXIT_POLL = 0.1


#: Environment variables of the agent that children must not see (the token among them).
PRIVATE_ENV_PREFIX = "SYSMANAGE_AGENT_"


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: the agent's, without its own settings, plus ``extra``."""
    env = {
        name: value for name, value in os.environ.items() if not name.startswith(PRIVATE_ENV_PREFIX)
    }
    env.update(extra or {})
    return env


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the whole process group ``pgid``, ignoring one that is gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def exit_code_of(returncode: int | None) -> int | None:
    """A shell-style exit code: a death by signal N becomes 128 + N."""
    if returncode is None or returncode >= 0:
        return returncode
    return 128 - returncode


class ProcessGroups:
    """The process groups of running children, so that all of them can be stopped."""

    def __init__(self) -> None:
        """Start with no child."""
        self._groups: set[int] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.stopping = False

    def add(self, pgid: int) -> None:
        """Track a child that leads its own process group."""
        self._groups.add(pgid)
        self._idle.clear()

    def discard(self, pgid: int) -> None:
        """Stop tracking a finished child."""
        self._groups.discard(pgid)
        if not self._groups:
            self._idle.set()

    def __len__(self) -> int:
        """The number of running children."""
        return len(self._groups)

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to every tracked process group."""
        for pgid in list(self._groups):
            kill_group(pgid, sig)

    async def stop_all(self, grace: float = KILL_GRACE) -> None:
        """Ask every child to stop (SIGTERM), then kill what is left after ``grace``."""
        self.stopping = True
        if not self._groups:
            return
        log.info("Stopping %d running child process(es)", len(self._groups))
        signalled = list(self._groups)
        self.signal_all(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        for pgid in signalled:
            kill_group(pgid, signal.SIGKILL)


async def supervise(
    process: asyncio.subprocess.Process,
    readers: list[asyncio.Task[None]],
    time_limit: float,
    groups: ProcessGroups,
) -> bool:
    """Wait for ``process`` to exit and its output to be read; False if ``time_limit`` passed.

    On timeout the whole process group is killed (SIGKILL).  When the process has exited
    but its output stays open (a background child still holds it), reading stops after
    a short grace period instead of waiting for that child.
    """
    groups.add(process.pid)
    exited = asyncio.ensure_future(wait_exit(process))
    try:
        _, pending = await asyncio.wait([exited], timeout=time_limit)
        if not pending:
            await _settle(readers, OUTPUT_GRACE)
            return True
        log.debug(
            "Process %d timed out after %ss; killing its process group", process.pid, time_limit
        )
        kill_group(process.pid)
        await _settle([exited, *readers], KILL_GRACE)
        return False
    except asyncio.CancelledError:
        kill_group(process.pid)
        raise
    finally:
        groups.discard(process.pid)
        for task in (exited, *readers):
            task.cancel()
        _close_pipes(process)


async def wait_exit(process: asyncio.subprocess.Process) -> None:
    """Return once ``process`` has exited, even while others still hold its output pipes."""
    waiter = asyncio.ensure_future(process.wait())
    try:
        while not waiter.done() and process.returncode is None:
            await asyncio.wait([waiter], timeout=EXIT_POLL)
    finally:
        waiter.cancel()


async def _settle(tasks: Sequence[asyncio.Future[None]], grace: float) -> None:
    """Give ``tasks`` up to ``grace`` seconds to finish."""
    if tasks:
        await asyncio.wait(tasks, timeout=grace)


def _close_pipes(process: asyncio.subprocess.Process) -> None:
    """Release the pipes of a finished process (some may still be held by its children)."""
    transport = getattr(process, "_transport", None)
    if transport is not None and process.returncode is not None:
        transport.close()
