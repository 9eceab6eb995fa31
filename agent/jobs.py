"""Carrying out the server's requests: each id once, commands in parallel, packages in turn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any, Protocol

from agent.commands import (
    command_ref,
    command_result,
    execution_id_of,
    failed_result_data,
    parse_command,
    run_command,
)
from agent.config import DEFAULT_REBOOT_COMMAND
from agent.errors import RequestError
from agent.ledger import RUNNING, IdLedger
from agent.packages import operation as packages
from agent.packages.managers import REBOOT, PackageManager
from agent.processes import ProcessGroups
from agent.protocol import (
    COMMAND_RESULT,
    COMMAND_STARTED,
    PACKAGE_PROGRESS,
    PACKAGE_RESULT,
    AgentMessage,
    CommandStartedData,
    PackageProgressData,
    ResultMessage,
    ServerMessage,
    envelope,
    request_id,
)
from agent.reboot import run_reboot
from agent.spool import ResultSpool

log = logging.getLogger(__name__)

INTERRUPTED = "the agent stopped before this finished; it was not run to completion"
NOT_STARTED = "the agent shut down before the command could start"
#: Seconds that stopping jobs get to write their results at shutdown.
SHUTDOWN_GRACE = 5.0


class Reporter(Protocol):
    """Where jobs send their messages (the current connection, if any)."""

    async def emit(self, message: AgentMessage) -> None:
        """Send a progress message now, or drop it when disconnected."""

    async def send_result(self, message: ResultMessage) -> None:
        """Send a result that is already stored in the spool, if connected."""

    async def rebooting(self) -> None:
        """The host is going down: leave the connection (and connect again if it lives)."""


class JobRunner:
    """Accepts ``run_command`` and ``package_operation`` and reports their results."""

    def __init__(
        self,
        spool: ResultSpool,
        ledger: IdLedger,
        reporter: Reporter,
        manager: PackageManager | None,
        max_output: int,
        max_commands: int,
        reboot_command: tuple[str, ...] = DEFAULT_REBOOT_COMMAND,
    ) -> None:
        """Run at most ``max_commands`` commands at once; package operations one at a
        time; a ``reboot`` operation runs ``reboot_command``."""
        self.spool, self.ledger, self.reporter = spool, ledger, reporter
        self.reboot_command = reboot_command
        self.manager = manager
        self.max_output = max_output
        self.groups = ProcessGroups()
        self._command_slots = asyncio.Semaphore(max_commands)
        self._package_turn = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def recover(self) -> int:
        """Give every id left running by a previous agent process a ``failed`` result."""
        count = 0
        for kind, ref in self.ledger.running():
            if not self.spool.has(kind, ref):
                self.spool.store(kind, ref, _interrupted_result(kind, ref))
                count += 1
            self.ledger.mark_finished(kind, ref)
        if count:
            log.warning("%d job(s) were interrupted when the agent last stopped", count)
        return count

    async def handle_run_command(self, message: ServerMessage) -> None:
        """Accept a ``run_command`` unless its ``execution_id`` was seen before."""
        ref = command_ref(message)
        if ref is None:
            log.warning("Ignoring a run_command without a valid execution_id")
        elif await self._accept(COMMAND_RESULT, ref):
            self._start(self._command_job(message, ref), COMMAND_RESULT, ref)

    async def handle_package_operation(self, message: ServerMessage) -> None:
        """Accept a ``package_operation`` unless its ``operation_id`` was seen before."""
        ref = packages.operation_ref(message)
        if ref is None:
            log.warning("Ignoring a package_operation without a valid operation_id")
        elif await self._accept(PACKAGE_RESULT, ref):
            self._start(self._package_job(message, ref), PACKAGE_RESULT, ref)

    async def shutdown(self) -> None:
        """Stop all children, let their jobs store results, then cancel what is left."""
        await self.groups.stop_all()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=SHUTDOWN_GRACE)
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _accept(self, kind: str, ref: str) -> bool:
        """Record a new id as running; for a known one, ignore it or resend its result."""
        state = self.ledger.state(kind, ref)
        if state is None:
            if self.groups.stopping:
                return False
            self.ledger.mark_running(kind, ref)
            return True
        if state == RUNNING:
            log.info("Ignoring repeated %s id %s: it is still running", kind, ref)
            return False
        stored = self.spool.get(kind, ref)
        if stored is None:
            log.info("Ignoring repeated %s id %s: its result was acknowledged", kind, ref)
        else:
            log.info("Sending the stored %s of repeated id %s again", kind, ref)
            await self.reporter.send_result(stored)
        return False

    def _start(self, job: Coroutine[Any, Any, None], kind: str, ref: str) -> None:
        """Run ``job`` in the background, keeping a reference until it ends."""
        task = asyncio.create_task(self._guarded(job, kind, ref))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, job: Awaitable[None], kind: str, ref: str) -> None:
        """Run ``job``; if it fails unexpectedly, still report a failed result."""
        try:
            await job
        except Exception as exc:
            log.exception("Internal error while handling %s id %s", kind, ref)
            if self.ledger.state(kind, ref) == RUNNING:
                await self._finish(kind, ref, _failed_result(kind, ref, f"agent error: {exc}"))

    async def _command_job(self, message: ServerMessage, ref: str) -> None:
        """Validate and run one command, then report it."""
        try:
            request = parse_command(message)
        except RequestError as exc:
            data = failed_result_data(execution_id_of(message), str(exc))
            await self._finish(COMMAND_RESULT, ref, command_result(data, request_id(message)))
            return
        async with self._command_slots:
            if self.groups.stopping:
                data = failed_result_data(request.execution_id, NOT_STARTED)
            else:
                started = envelope(
                    COMMAND_STARTED,
                    CommandStartedData(execution_id=request.execution_id),
                    id_=request.message_id,
                )
                data = await run_command(
                    request, self.max_output, self.groups, lambda: self.reporter.emit(started)
                )
        await self._finish(COMMAND_RESULT, ref, command_result(data, request.message_id))

    async def _package_job(self, message: ServerMessage, ref: str) -> None:
        """Validate and run one package operation (one at a time), then report it."""
        operation_id = packages.operation_id_of(message)
        try:
            request = packages.parse_operation(message)
        except RequestError as exc:
            data = packages.failed_data(operation_id, str(exc))
            await self._finish(
                PACKAGE_RESULT, ref, packages.package_result(data, request_id(message))
            )
            return

        async def progress(percent: int, text: str) -> None:
            """Report progress of this operation to the server."""
            await self.reporter.emit(
                envelope(
                    PACKAGE_PROGRESS,
                    PackageProgressData(operation_id=operation_id, progress=percent, message=text),
                    id_=request.message_id,
                )
            )

        async with self._package_turn:
            if request.operation == REBOOT:
                data = await run_reboot(
                    operation_id, self.reboot_command, self.max_output, self.groups
                )
            else:
                data = await packages.run_operation(
                    request, self.manager, self.max_output, self.groups, progress
                )
        await self._finish(PACKAGE_RESULT, ref, packages.package_result(data, request.message_id))
        if request.operation == REBOOT and data["status"] == packages.COMPLETED:
            await self.reporter.rebooting()

    async def _finish(self, kind: str, ref: str, message: ResultMessage) -> None:
        """Store the result, mark its id finished, then send it."""
        try:
            self.spool.store(kind, ref, message)
            self.ledger.mark_finished(kind, ref)
        except OSError as exc:
            log.error(
                "Cannot save the %s of %s (%s); sending it without a saved copy", kind, ref, exc
            )
        await self.reporter.send_result(message)


def _failed_result(kind: str, ref: str, error: str) -> ResultMessage:
    """A ``failed`` result envelope for ``ref`` of ``kind``."""
    if kind == COMMAND_RESULT:
        return command_result(failed_result_data(ref, error))
    return packages.package_result(packages.failed_data(ref, error))


def _interrupted_result(kind: str, ref: str) -> ResultMessage:
    """The result for a job the agent was stopped during (recorded at the next start)."""
    return _failed_result(kind, ref, INTERRUPTED)
