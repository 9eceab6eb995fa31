"""
The fleet runner: drives a recorded :class:`~hosts.models.FleetRun` to its end.

A run is a task on the event loop of the server process that accepted it (a WebSocket
``command`` with ``targets`` or ``POST /api/fleet-runs/``), not of the request: the
requester may go away and the run goes on.  Hosts run in batches of ``batch_size``, in
the order of the run's rows; each goes through the same path as one command on one host
(:func:`hosts.commands.command_run_and_wait`), and the next batch starts when the whole
batch has ended.  The requester's right to run commands on each host is checked again
as its turn comes (a host no longer allowed is skipped).  A host offline when its turn
comes is skipped, with the reason; or,
with ``offline`` ``wait``, it stays queued and, once the batches are done, is run when
it returns (batches again), or skipped after ``offline_wait`` seconds.  Once
as many hosts failed as the failure limit allows, no further host starts: the rest are
skipped ("failure limit reached") and the run ends ``stopped``.

While it runs, the task notes every ``FLEET_RUN_HEARTBEAT_SECONDS`` that it is alive.
If its process dies, the run's heartbeat stops, and the maintenance sweep
(:mod:`hosts.maintenance`: every process runs it periodically from its first socket on,
and ``manage.py mark_offline_hosts`` from cron) marks it ``interrupted`` after
``FLEET_RUN_STALE_SECONDS``, its unfinished hosts skipped: a run is never left running.
A run outlasts a short outage of its database: what it records waits for the database
(:func:`_database`), and a host whose command could not be run meanwhile fails, with the
reason; an outage longer than ``FLEET_RUN_STALE_SECONDS`` ends the run (the sweep marks it
interrupted), and a host the sweep skipped meanwhile is not started nor recorded again.

Progress goes out as ``fleet_run.progress`` events on ``command_execution``: the counts
and the hosts that ended since the previous one, at most one every
``FLEET_RUN_PROGRESS_INTERVAL`` seconds per run, whatever the number of hosts or
subscribers, and a last one (``final``) when the run ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from django.conf import settings
from django.db import DatabaseError

from hosts import commands, fleetruns
from hosts.events import FleetRunProgress
from hosts.models import (
    ExecutionStatus,
    FleetRun,
    FleetRunHost,
    FleetRunHostStatus,
    FleetRunKind,
    FleetRunState,
    Host,
    HostStatus,
    OperationStatus,
)
from sysmanage import dbgate, permissions
from sysmanage.audit import Actor
from sysmanage.commands import CommandContext
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.events import publish_now
from sysmanage.node import Node
from sysmanage.protocol import ClientMessage, ErrorCode, MessageType, ProtocolError, envelope

logger = logging.getLogger(__name__)

T = TypeVar("T")
FAILURE_LIMIT_REACHED = "failure limit reached"
WITHDRAWN = "the requester no longer has the right to do this on this host"
#: How often a run waiting for offline hosts looks whether they returned (seconds).
OFFLINE_POLL_SECONDS = 1.0
#: How often the runner tries its database again while it is unreachable (seconds).
DATABASE_RETRY_SECONDS = 1.0
#: Why a host whose command could not be run for want of the database failed.
NO_DATABASE = "The server could not reach its database to run it"
#: The runs this process drives, by id (a task is kept here so that it is not collected).
RUNNING: dict[str, asyncio.Task[None]] = {}


async def _database(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)`` in a database thread; while the database is unreachable
    or busy (:func:`sysmanage.dbgate.unavailable`), tried again every
    ``DATABASE_RETRY_SECONDS`` for up to ``FLEET_RUN_STALE_SECONDS`` (past that, the sweep
    takes the run for a dead one anyway), then the error is raised."""
    deadline = time.monotonic() + settings.FLEET_RUN_STALE_SECONDS
    while True:
        try:
            return await database_sync_to_async(func)(*args, **kwargs)
        except DatabaseError as exc:
            if dbgate.unavailable(exc) is None or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(DATABASE_RETRY_SECONDS)


async def run_batches(
    items: Sequence[T],
    *,
    batch_size: int,
    threshold: int | None,
    run_one: Callable[[T], Awaitable[str]],
) -> bool:
    """Run ``run_one`` on ``items``, ``batch_size`` at a time, each batch after the
    previous one ended; stop starting items once ``threshold`` of them returned
    ``failed``.  Returns whether it stopped early (items were left unstarted)."""
    failed = 0
    for start in range(0, len(items), batch_size):
        if threshold is not None and failed >= threshold:
            return True
        outcomes = await asyncio.gather(*(run_one(i) for i in items[start : start + batch_size]))
        failed += sum(1 for outcome in outcomes if outcome == FleetRunHostStatus.FAILED)
    return False


@dataclass(frozen=True)
class Outcome:
    """How a host of a run ended: its status, why (if not plainly succeeded), the
    command or package operation it ran (``ref``) and a command's exit code."""

    status: str
    reason: str = ""
    ref: str | None = None
    exit_code: int | None = None


def command_outcome(data: dict[str, Any]) -> Outcome:
    """A host's outcome from its command's end: succeeded only if it completed with 0."""
    ref, code = data.get("execution_id"), data.get("exit_code")
    if data.get("status") == ExecutionStatus.COMPLETED:
        if code == 0:
            return Outcome(FleetRunHostStatus.SUCCEEDED, "", ref, code)
        return Outcome(FleetRunHostStatus.FAILED, f"exit code {code}", ref, code)
    why = str(data.get("error") or data.get("status") or "")
    return Outcome(FleetRunHostStatus.FAILED, why, ref, code)


def package_outcome(data: dict[str, Any], waited: int) -> Outcome:
    """A host's outcome from its package operation: succeeded if it completed, failed
    if it failed or had not ended after ``waited`` seconds (it goes on)."""
    ref, status = data.get("execution_id"), data.get("status")
    if status == OperationStatus.COMPLETED:
        return Outcome(FleetRunHostStatus.SUCCEEDED, "", ref)
    if status == OperationStatus.FAILED:
        return Outcome(FleetRunHostStatus.FAILED, str(data.get("message") or "failed"), ref)
    return Outcome(FleetRunHostStatus.FAILED, f"not ended after {waited} s (it goes on)", ref)


@dataclass
class _Row:
    """A host of the run as the runner needs it."""

    id: int
    host_id: str | None
    hostname: str


class FleetRunner:
    """Drives one run and publishes its progress."""

    def __init__(self, run: FleetRun, user: Any, actor: Actor | None) -> None:
        self.run_id = str(run.id)
        self.kind, self.operation, self.package = run.kind, run.operation, run.package
        self.command = run.command
        self.timeout = run.timeout
        self.batch_size = run.batch_size
        self.threshold = fleetruns.failure_threshold(
            run.total, run.failure_limit, run.failure_percent
        )
        self.total = run.total
        self.offline, self.offline_wait = run.offline, run.offline_wait
        #: hosts offline at their turn that the run waits for (``offline`` ``wait``)
        self.waiting: list[_Row] = []
        self.user, self.actor = user, actor
        self.requested_by = getattr(user, "username", None)
        self.requested_by_id = str(user.pk) if getattr(user, "pk", None) else None
        self.counts = dict.fromkeys(("running", "succeeded", "failed", "skipped"), 0)
        self.state: str = FleetRunState.RUNNING
        self.reason = ""
        self._results: list[dict[str, Any]] = []
        self._started: list[dict[str, Any]] = []
        self._published_at = 0.0
        self._flush: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        """Run every batch, then record and publish how the run ended."""
        beat = asyncio.ensure_future(self._heartbeat())
        try:
            rows = await _database(_rows, self.run_id)
            stopped = await run_batches(
                rows, batch_size=self.batch_size, threshold=self.threshold, run_one=self._run_one
            )
            if self.waiting and not stopped:
                stopped = await self._wait_for_offline()
            await self._end(stopped)
        finally:
            beat.cancel()

    async def _wait_for_offline(self) -> bool:
        """Run the hosts that were offline at their turn as they return, in batches,
        for ``offline_wait`` seconds; then skip those still away.  Returns whether the
        failure limit was reached meanwhile."""
        deadline = time.monotonic() + self.offline_wait
        while self.waiting and time.monotonic() < deadline:
            await asyncio.sleep(min(OFFLINE_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            online = await _database(_online, [r.host_id for r in self.waiting])
            back = [row for row in self.waiting if row.host_id in online]
            if not back:
                continue
            self.waiting = [row for row in self.waiting if row.host_id not in online]
            left = None if self.threshold is None else self.threshold - self.counts["failed"]
            if await run_batches(
                back, batch_size=self.batch_size, threshold=left, run_one=self._run_one
            ):
                return True
        why = f"still offline after {self.offline_wait} s"
        away, self.waiting = self.waiting, []
        for row in away:
            await self._ended(row, Outcome(FleetRunHostStatus.SKIPPED, why))
        return False

    async def _end(self, stopped: bool) -> None:
        if stopped:
            self.reason = f"Stopped: {FAILURE_LIMIT_REACHED} ({self.counts['failed']} failed)"
            skipped = await _database(
                fleetruns.fleet_run_skip_rest, run_id=self.run_id, reason=FAILURE_LIMIT_REACHED
            )
            self.counts["skipped"] += skipped
            self.state = FleetRunState.STOPPED
        elif self.counts["succeeded"] == self.total:
            self.state = FleetRunState.SUCCEEDED
        else:
            self.state = FleetRunState.FAILED
            self.reason = f"{self.counts['failed']} failed, {self.counts['skipped']} skipped"
        await _database(
            fleetruns.fleet_run_finish, run_id=self.run_id, state=self.state, reason=self.reason
        )
        self.publish(final=True)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(settings.FLEET_RUN_HEARTBEAT_SECONDS)
            with contextlib.suppress(Exception):
                await database_sync_to_async(fleetruns.fleet_run_heartbeat)(run_id=self.run_id)

    async def _run_one(self, row: _Row) -> str:
        """Run the command (or package operation) on one host of the run; its outcome."""
        host = await _database(_host, row.host_id)
        if host is not None and host.status != HostStatus.ONLINE and self.offline == "wait":
            self.waiting.append(row)
            return FleetRunHostStatus.QUEUED
        if host is None or host.status != HostStatus.ONLINE:
            why = "host deleted" if host is None else f"host {host.status}"
            return await self._ended(row, Outcome(FleetRunHostStatus.SKIPPED, why))
        right = fleetruns.run_right(self.kind)
        if not await _database(_still_allowed, self.user, str(host.id), right):
            return await self._ended(row, Outcome(FleetRunHostStatus.SKIPPED, WITHDRAWN))
        if not await _database(fleetruns.fleet_run_host_started, row_id=row.id):
            return FleetRunHostStatus.SKIPPED  # the sweep ended the run meanwhile
        self._started.append({"host_id": row.host_id, "hostname": row.hostname})
        self._change("running", 1)
        try:
            outcome = await self._attempt(host)
        except commands.NotDelivered as exc:
            outcome = Outcome(FleetRunHostStatus.FAILED, exc.why, ref=exc.ref)
        except DatabaseError as exc:
            if dbgate.unavailable(exc) is None:
                raise
            outcome = Outcome(FleetRunHostStatus.FAILED, NO_DATABASE)
        return await self._ended(row, outcome, was_running=True)

    async def _attempt(self, host: Host) -> Outcome:
        """What the run does on ``host``, through the one-host path, and how it went."""
        if self.kind in fleetruns.OPERATION_KINDS:
            data = await commands.package_operation_run_and_wait(
                host=host,
                operation=self.operation,
                package=self.package,
                time_limit=self.timeout,
                user=self.user,
                actor=self.actor,
            )
            return package_outcome(data, self.timeout)
        data = await commands.command_run_and_wait(
            host=host,
            command=self.command,
            time_limit=self.timeout,
            user=self.user,
            actor=self.actor,
            request_id=f"fleet-run:{self.run_id}",
        )
        return command_outcome(data)

    async def _ended(self, row: _Row, outcome: Outcome, *, was_running: bool = False) -> str:
        package = self.kind in fleetruns.OPERATION_KINDS
        await _database(
            fleetruns.fleet_run_host_ended,
            row_id=row.id,
            status=outcome.status,
            reason=outcome.reason,
            execution_id=None if package else outcome.ref,
            package_operation_id=outcome.ref if package else None,
            exit_code=outcome.exit_code,
        )
        self._results.append(
            {
                "host_id": row.host_id,
                "hostname": row.hostname,
                "status": outcome.status,
                "exit_code": outcome.exit_code,
                "execution_id": None if package else outcome.ref,
                "operation_id": outcome.ref if package else None,
                "reason": outcome.reason,
            }
        )
        if was_running:
            self.counts["running"] -= 1  # with the end counted below, in one step
        self._change(outcome.status, 1)
        return outcome.status

    def _change(self, key: str, by: int) -> None:
        """Count a change and publish it soon: at once if the last progress is older than
        the interval, else when it is (changes meanwhile go out together)."""
        self.counts[key] += by
        if self._flush is not None:
            return
        wait = self._published_at + settings.FLEET_RUN_PROGRESS_INTERVAL - time.monotonic()
        loop = asyncio.get_running_loop()
        self._flush = loop.call_later(max(0.0, wait), self.publish)

    def publish(self, final: bool = False) -> None:
        """Publish the progress now (the counts, and the results since the last one)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._published_at = time.monotonic()
        results, self._results = self._results, []
        started, self._started = self._started, []
        done = sum(self.counts[k] for k in ("running", "succeeded", "failed", "skipped"))
        publish_now(
            FleetRunProgress(
                run_id=self.run_id,
                kind=self.kind,
                state=self.state,
                command=self.command,
                total=self.total,
                counts={"queued": max(0, self.total - done), **self.counts},
                results=results,
                started=started,
                reason=self.reason,
                requested_by=self.requested_by,
                requested_by_id=self.requested_by_id,
                final=final,
            )
        )


def _rows(run_id: str) -> list[_Row]:
    return [
        _Row(row.id, str(row.host_id) if row.host_id else None, row.hostname)
        for row in FleetRunHost.objects.filter(run__id=run_id).order_by("position")
    ]


def _still_allowed(user: Any, host_id: str, right: str = "run_command") -> bool:
    """Whether ``user`` may still use ``right`` (the run's kind's: commands, package
    operations, or applying updates and rebooting) on the host (rights are checked when
    used: a run can outlast a right withdrawn after it started)."""
    return host_id in permissions.hosts_allowed(permissions.fresh(user), right, [host_id])


def _online(host_ids: list[str | None]) -> set[str]:
    ids = [h for h in host_ids if h]
    rows = Host.objects.filter(id__in=ids, status=HostStatus.ONLINE).values_list("id", flat=True)
    return {str(host_id) for host_id in rows}


def _host(host_id: str | None) -> Host | None:
    return Host.objects.filter(id=host_id).first() if host_id else None


async def _drive(runner: FleetRunner) -> None:
    """Run ``runner``; a failure ends the run as failed rather than leaving it running."""
    try:
        await runner.run()
    except asyncio.CancelledError:
        # The process is stopping: say so now rather than after the stale delay.
        with contextlib.suppress(Exception):
            await asyncio.shield(_interrupted(runner.run_id))
        raise
    except Exception:
        dbgate.log_exception(logger, "fleet run %s failed", runner.run_id)
        with contextlib.suppress(Exception):
            await _database(
                fleetruns.fleet_run_finish,
                run_id=runner.run_id,
                state=FleetRunState.FAILED,
                reason="Internal server error",
            )
        runner.state = FleetRunState.FAILED
        runner.publish(final=True)
    finally:
        RUNNING.pop(runner.run_id, None)


async def _interrupted(run_id: str) -> None:
    why = "The server process running it stopped"
    await database_sync_to_async(fleetruns.fleet_run_skip_rest)(run_id=run_id, reason=why)
    await database_sync_to_async(fleetruns.fleet_run_finish)(
        run_id=run_id, state=FleetRunState.INTERRUPTED, reason=why
    )


async def fleet_run_start(run: FleetRun, *, user: Any, actor: Actor | None) -> None:
    """Start driving the recorded ``run`` on this process's loop, apart from the caller."""
    node = await Node.for_running_loop()
    runner = FleetRunner(run, user, actor)
    RUNNING[runner.run_id] = node.spawn(_drive(runner))


# -- the WebSocket extension of ``command`` on ``command_execution`` ----------------


async def handle_command(context: CommandContext, message: ClientMessage) -> None:
    """``command`` on ``command_execution``: with ``targets``, a fleet run; else the
    command on one host (:func:`hosts.commands.handle_command`)."""
    if "targets" not in message.data:
        await commands.handle_command(context, message)
        return
    await _start(context, message, _kind(message, (FleetRunKind.COMMAND,)))


async def handle_package_operation(context: CommandContext, message: ClientMessage) -> None:
    """``command`` on ``package_operations``: with ``targets``, a fleet run of the
    package operation (``kind`` ``package``, the default), of applying updates
    (``patch``) or of rebooting (``reboot``); else the operation on one host
    (:func:`hosts.commands.handle_package_operation`)."""
    if "targets" not in message.data:
        await commands.handle_package_operation(context, message)
        return
    await _start(context, message, _kind(message, OPERATION_RUN_KINDS))


#: The kinds of fleet run each channel starts (the first is the default).
OPERATION_RUN_KINDS = (FleetRunKind.PACKAGE, FleetRunKind.PATCH, FleetRunKind.REBOOT)


def _kind(message: ClientMessage, kinds: tuple[str, ...]) -> str:
    """The run's ``kind`` as asked (one of ``kinds``, the first by default), or the
    ``INVALID_COMMAND`` that says which the channel takes."""
    kind = message.data.get("kind", kinds[0])
    if kind in kinds:
        return str(kind)
    if len(kinds) == 1:
        why = f"'kind' on {message.channel} must be '{kinds[0]}' (package, patch and reboot "
        why += "runs go on package_operations)"
    else:
        why = f"'kind' on {message.channel} must be one of " + ", ".join(f"'{k}'" for k in kinds)
    raise ProtocolError(
        ErrorCode.INVALID_COMMAND,
        why,
        channel=message.channel or "command_execution",
        id_=message.id,
    )


async def _start(context: CommandContext, message: ClientMessage, kind: str) -> None:
    """Check, record and start a fleet run; answer with the run."""
    channel = message.channel or "command_execution"
    try:
        spec = fleetruns.parse_fleet_run(message.data, kind)
    except ValueError as exc:
        raise ProtocolError(
            ErrorCode.INVALID_COMMAND, str(exc), channel=channel, id_=message.id
        ) from None
    run = await _create(context, message, spec)
    await fleet_run_start(run, user=context.user, actor=context.actor)
    data = await database_sync_to_async(fleetruns.fleet_run_data)(run)
    context.reply(envelope(MessageType.RESPONSE, channel, data, id_=message.id))


async def _create(
    context: CommandContext, message: ClientMessage, spec: fleetruns.FleetRunSpec
) -> FleetRun:
    """Record the run, or raise the protocol error that says why not."""
    try:
        return await database_sync_to_async(fleetruns.fleet_run_create)(
            spec=spec, user=context.user, actor=context.actor
        )
    except fleetruns.FleetRunRefused as exc:
        raise ProtocolError(
            ErrorCode.PERMISSION_DENIED,
            str(exc),
            channel=message.channel or "command_execution",
            id_=message.id,
            refused=exc.refused,
            total=exc.total,
        ) from None
    except fleetruns.FleetRunLimitReached as exc:
        raise ProtocolError(
            ErrorCode.RATE_LIMITED,
            str(exc),
            channel=message.channel or "command_execution",
            id_=message.id,
            limit=exc.limit,
        ) from None
    except ValueError as exc:
        raise ProtocolError(
            ErrorCode.INVALID_COMMAND,
            str(exc),
            channel=message.channel or "command_execution",
            id_=message.id,
        ) from None
