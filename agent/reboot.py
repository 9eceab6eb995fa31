"""Rebooting the host: the ``reboot`` package operation.

The configured ``reboot_command`` (``systemctl reboot`` by default) runs without a shell.
It only asks for the reboot: when it exits with status 0 the operation is reported
completed ("the reboot began"), and the agent leaves its connection, so that the server
sees the host go; the server completes the reboot when the agent connects again after
the host came back.  If the host is not going down after all (a command that only
simulates a reboot), the agent simply reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from collections.abc import Sequence

from agent.output import CappedOutput, drain
from agent.packages.operation import COMPLETED, FAILED, result_data
from agent.processes import ProcessGroups, child_environment, exit_code_of, supervise
from agent.protocol import JobId, PackageResultData

log = logging.getLogger(__name__)

#: Seconds the reboot command may take to ask for the reboot.
REBOOT_START_TIMEOUT = 120.0


async def run_reboot(
    operation_id: JobId, command: Sequence[str], max_output: int, groups: ProcessGroups
) -> PackageResultData:
    """Run ``command`` and report whether the reboot began."""
    shown = shlex.join(command)
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            env=child_environment(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        output = CappedOutput(0)
        return result_data(operation_id, FAILED, None, output, f"{shown} could not start: {exc}")
    log.warning("Rebooting the host: %s (pid %d)", shown, process.pid)
    output = CappedOutput(max_output)
    finished = await supervise(
        process, [asyncio.create_task(drain(process.stdout, output))], REBOOT_START_TIMEOUT, groups
    )
    code = exit_code_of(process.returncode)
    if finished and code == 0:
        return result_data(operation_id, COMPLETED, code, output, f"The reboot began ({shown})")
    why = f"exited with status {code}" if finished else f"did not end in {REBOOT_START_TIMEOUT:g}s"
    return result_data(operation_id, FAILED, code, output, f"{shown} {why}")
