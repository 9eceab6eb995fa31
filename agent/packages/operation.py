"""Running one ``package_operation`` and describing its ``package_result``."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from agent.errors import RequestError
from agent.output import CappedOutput, drain
from agent.packages import upgrade
from agent.packages.apt_status import AptProgress, LineSplitter
from agent.packages.managers import OPERATIONS, REBOOT, UPGRADE, PackageManager
from agent.packages.validation import resolve_target
from agent.processes import ProcessGroups, exit_code_of, supervise
from agent.protocol import (
    PACKAGE_RESULT,
    JobId,
    MessageId,
    PackageResult,
    PackageResultData,
    PackageStatus,
    ServerMessage,
    envelope,
    fit_frame,
    job_id,
    ref_of,
    request_id,
)

log = logging.getLogger(__name__)

#: A package operation still running after this many seconds is killed.
PACKAGE_TIMEOUT = 3600.0
COMPLETED: Final = "completed"
FAILED: Final = "failed"
NO_MANAGER = "no supported package manager (apt-get, dnf, yum, apk or zypper) on this host"

Progress = Callable[[int, str], Awaitable[None]]
#: The operations a ``package_operation`` may ask for (a reboot runs apart: agent.reboot).
KINDS = (*OPERATIONS, UPGRADE, REBOOT)


@dataclass(frozen=True, slots=True)
class PackageRequest:
    """A validated ``package_operation``."""

    operation_id: JobId
    operation: str
    package: str
    message_id: MessageId = None


@dataclass(slots=True)
class Outcome:
    """How a package manager run ended."""

    exit_code: int | None
    finished: bool
    output: CappedOutput


def operation_ref(message: ServerMessage) -> str | None:
    """The ``operation_id`` of a ``package_operation`` as a string, or ``None``."""
    return ref_of(message["data"].get("operation_id"))


def operation_id_of(message: ServerMessage) -> JobId:
    """The ``operation_id`` of a ``package_operation`` (checked by :func:`operation_ref`
    first)."""
    operation_id = job_id(message["data"].get("operation_id"))
    if operation_id is None:
        raise RequestError("'operation_id' must be a non-empty string or an integer")
    return operation_id


def parse_operation(message: ServerMessage) -> PackageRequest:
    """Validate a ``package_operation`` (its id already checked) or raise RequestError."""
    data = message["data"]
    operation, package = data.get("operation"), data.get("package")
    if operation not in KINDS:
        raise RequestError(f"'operation' must be one of {', '.join(KINDS)}")
    if operation == REBOOT:
        package = ""
    elif not isinstance(package, str) or not package:
        raise RequestError("'package' must be a non-empty string")
    elif operation == UPGRADE:
        upgrade.check_target(package)
    return PackageRequest(operation_id_of(message), operation, package, request_id(message))


def _plan(manager: PackageManager, operation: str, target: str) -> upgrade.Argv:
    """How to run an install, removal or update of ``target`` (already resolved)."""
    return lambda status_fd: manager.argv(operation, target, status_fd)


async def _planned(request: PackageRequest, manager: PackageManager) -> upgrade.Argv | None:
    """How to run ``request`` with ``manager`` (None: nothing to do), or RequestError."""
    if request.operation == UPGRADE:
        return await upgrade.upgrade_argv(manager, request.package)
    target = resolve_target(manager, request.operation, request.package)
    return _plan(manager, request.operation, target)


def _what(request: PackageRequest) -> str:
    """The operation, for people."""
    if request.operation == UPGRADE:
        return upgrade.describe(request.package)
    return f"{request.operation} {request.package}"


async def run_operation(
    request: PackageRequest,
    manager: PackageManager | None,
    max_output: int,
    groups: ProcessGroups,
    progress: Progress,
) -> PackageResultData:
    """Carry out ``request`` with ``manager`` and return the ``package_result`` data."""
    if manager is None:
        return failed_data(request.operation_id, NO_MANAGER)
    try:
        argv = await _planned(request, manager)
    except RequestError as exc:
        return failed_data(request.operation_id, str(exc))
    if argv is None:
        message = f"{_what(request)}: nothing to apply"
        return result_data(request.operation_id, COMPLETED, 0, CappedOutput(0), message)
    await progress(0, f"{_what(request)}: starting {manager.executable}")
    try:
        outcome = await _execute(manager, argv, max_output, groups, progress)
    except OSError as exc:
        message = f"{manager.executable} could not be started: {exc}"
        return failed_data(request.operation_id, message)
    status, message = _summary(request, manager, outcome, groups.stopping)
    log.info("Package operation %s ended: %s", request.operation_id, message)
    if status == COMPLETED:
        await progress(100, message)
    return result_data(request.operation_id, status, outcome.exit_code, outcome.output, message)


async def _execute(
    manager: PackageManager,
    argv: upgrade.Argv,
    max_output: int,
    groups: ProcessGroups,
    progress: Progress,
) -> Outcome:
    """Run the package manager without a shell, following its status descriptor if any."""
    read_fd, write_fd = os.pipe() if manager.status_fd else (None, None)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv(write_fd),
            env=manager.env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            pass_fds=() if write_fd is None else (write_fd,),
        )
    except OSError:
        if read_fd is not None:
            os.close(read_fd)
        raise
    finally:
        if write_fd is not None:
            os.close(write_fd)
    log.info("%s started (pid %d)", manager.executable, process.pid)
    output = CappedOutput(max_output)
    readers = [asyncio.create_task(drain(process.stdout, output))]
    if read_fd is not None:
        readers.append(asyncio.create_task(follow_status(read_fd, progress)))
    finished = await supervise(process, readers, PACKAGE_TIMEOUT, groups)
    return Outcome(exit_code_of(process.returncode), finished, output)


async def follow_status(fd: int, progress: Progress) -> None:
    """Read apt status lines from ``fd`` until it closes and report them as progress."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    tracker, splitter = AptProgress(), LineSplitter()
    try:
        while chunk := await reader.read(4096):
            for line in splitter.feed(chunk):
                update = tracker.update(line)
                if update is not None:
                    await progress(*update)
    finally:
        transport.close()


def _summary(
    request: PackageRequest, manager: PackageManager, outcome: Outcome, stopping: bool
) -> tuple[PackageStatus, str]:
    """Status and human message of a package manager run."""
    what = _what(request)
    if stopping:
        return FAILED, f"{what}: the agent shut down during the operation"
    if not outcome.finished:
        return FAILED, f"{what}: timed out after {PACKAGE_TIMEOUT:g}s, {manager.executable} killed"
    if outcome.exit_code == 0:
        return COMPLETED, f"{what}: completed"
    reason = last_error_line(outcome.output.text())
    return FAILED, (
        f"{what}: {manager.executable} exited with status {outcome.exit_code}"
        + (f": {reason}" if reason else "")
    )


def last_error_line(output: str) -> str:
    """The most telling line of a failed run: the last ``E:``/error line, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("E:", "Error", "ERROR"))]
    return (errors or lines or [""])[-1][:500]


def result_data(
    operation_id: JobId,
    status: PackageStatus,
    exit_code: int | None,
    output: CappedOutput,
    message: str,
) -> PackageResultData:
    """The ``package_result`` data."""
    return {
        "operation_id": operation_id,
        "status": status,
        "exit_code": exit_code,
        "output": output.text(),
        "output_truncated": output.truncated,
        "output_bytes": output.size,
        "message": message,
    }


def failed_data(operation_id: JobId, message: str) -> PackageResultData:
    """The data of an operation that could not be run at all."""
    return result_data(operation_id, FAILED, None, CappedOutput(0), message)


def package_result(data: PackageResultData, message_id: MessageId = None) -> PackageResult:
    """Wrap result ``data`` in a ``package_result`` envelope that fits in one frame."""
    return fit_frame(
        envelope(PACKAGE_RESULT, data, id_=message_id), [("output", "output_truncated")]
    )
