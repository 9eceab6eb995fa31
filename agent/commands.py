"""Running one shell command for ``run_command`` and describing its ``command_result``."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from agent.errors import RequestError
from agent.output import CappedOutput, drain
from agent.processes import ProcessGroups, child_environment, exit_code_of, supervise
from agent.protocol import (
    COMMAND_RESULT,
    CommandResult,
    CommandResultData,
    CommandStatus,
    JobId,
    MessageId,
    ServerMessage,
    envelope,
    fit_frame,
    job_id,
    ref_of,
    request_id,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0
COMPLETED: Final = "completed"
TIMEOUT: Final = "timeout"
FAILED: Final = "failed"
SHUTDOWN_ERROR = "the agent shut down while the command was running"


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """A validated ``run_command``."""

    execution_id: JobId
    command: str
    timeout: float
    message_id: MessageId = None


def command_ref(message: ServerMessage) -> str | None:
    """The ``execution_id`` of a ``run_command`` as a string, or ``None`` if it has none."""
    return ref_of(message["data"].get("execution_id"))


def execution_id_of(message: ServerMessage) -> JobId:
    """The ``execution_id`` of a ``run_command`` (checked by :func:`command_ref` first)."""
    execution_id = job_id(message["data"].get("execution_id"))
    if execution_id is None:
        raise RequestError("'execution_id' must be a non-empty string or an integer")
    return execution_id


def parse_command(message: ServerMessage) -> CommandRequest:
    """Validate a ``run_command`` message (its id already checked) or raise RequestError."""
    data = message["data"]
    command = data.get("command")
    if not isinstance(command, str) or not command.strip():
        raise RequestError("'command' must be a non-empty string")
    if "\x00" in command:
        raise RequestError("'command' must not contain NUL characters")
    return CommandRequest(
        execution_id_of(message), command, _timeout(data.get("timeout")), request_id(message)
    )


def _timeout(value: object) -> float:
    """The command timeout in seconds; absent means the default."""
    if value is None:
        return DEFAULT_TIMEOUT
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError("'timeout' must be a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise RequestError("'timeout' must be a positive number of seconds")
    return float(value)


async def run_command(
    request: CommandRequest,
    max_output: int,
    groups: ProcessGroups,
    on_start: Callable[[], Awaitable[None]],
) -> CommandResultData:
    """Run ``request`` through the shell and return its ``command_result`` data."""
    stdout, stderr = CappedOutput(max_output), CappedOutput(max_output)
    started = time.monotonic()
    try:
        process = await asyncio.create_subprocess_shell(
            request.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env=child_environment(),
        )
    except OSError as exc:
        log.warning("Command %s could not be started: %s", request.execution_id, exc)
        return result_data(request, FAILED, None, stdout, stderr, 0.0, str(exc))
    readers = [
        asyncio.create_task(drain(process.stdout, stdout)),
        asyncio.create_task(drain(process.stderr, stderr)),
    ]
    log.info("Command %s started (pid %d)", request.execution_id, process.pid)
    await on_start()
    finished = await supervise(process, readers, request.timeout, groups)
    elapsed = time.monotonic() - started
    status, exit_code, error = _outcome(finished, process.returncode, groups.stopping)
    log.info(
        "Command %s ended: %s, exit code %s, %.2fs",
        request.execution_id,
        status,
        exit_code,
        elapsed,
    )
    return result_data(request, status, exit_code, stdout, stderr, elapsed, error)


def _outcome(
    finished: bool, returncode: int | None, stopping: bool
) -> tuple[CommandStatus, int | None, str]:
    """Status, exit code and error of a command that ran."""
    if stopping:
        return FAILED, exit_code_of(returncode), SHUTDOWN_ERROR
    if not finished:
        return TIMEOUT, None, ""
    return COMPLETED, exit_code_of(returncode), ""


def result_data(
    request: CommandRequest,
    status: CommandStatus,
    exit_code: int | None,
    stdout: CappedOutput,
    stderr: CappedOutput,
    elapsed: float,
    error: str,
) -> CommandResultData:
    """The ``command_result`` data for ``request``."""
    return {
        "execution_id": request.execution_id,
        "status": status,
        "exit_code": exit_code,
        "stdout": stdout.text(),
        "stderr": stderr.text(),
        "stdout_truncated": stdout.truncated,
        "stderr_truncated": stderr.truncated,
        "stdout_bytes": stdout.size,
        "stderr_bytes": stderr.size,
        "execution_time": round(elapsed, 3),
        "error": error,
    }


def failed_result_data(execution_id: JobId, error: str) -> CommandResultData:
    """The data of a command that could not be run at all."""
    request = CommandRequest(execution_id, "", DEFAULT_TIMEOUT)
    empty = CappedOutput(0)
    return result_data(request, FAILED, None, empty, empty, 0.0, error)


def command_result(data: CommandResultData, message_id: MessageId = None) -> CommandResult:
    """Wrap result ``data`` in a ``command_result`` envelope that fits in one frame."""
    message = envelope(COMMAND_RESULT, data, id_=message_id)
    return fit_frame(message, [("stdout", "stdout_truncated"), ("stderr", "stderr_truncated")])
