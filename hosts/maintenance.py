"""
The hosts sweep: silent hosts go offline, overdue commands, stalled package operations
and reboots whose host did not come back end with a clear status, and fleet runs whose
process stopped are marked interrupted.  Every server process runs it periodically, and
``manage.py mark_offline_hosts`` runs it from cron; it is safe to run concurrently.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from django.conf import settings

from hosts import fleetruns, services
from hosts.models import CommandExecution, Host, PackageOperation
from sysmanage.node import Node
from sysmanage.protocol import CloseCode, auth_failed_envelope

logger = logging.getLogger(__name__)

#: Token hashes one query of :func:`agent_recheck` asks about, at most.
RECHECK_CHUNK = 2000


@dataclass(frozen=True)
class SweepReport:
    """What one sweep changed."""

    hosts_offline: list[str]
    commands_timed_out: int
    operations_failed: int
    #: fleet runs whose process stopped, marked interrupted
    fleet_runs_interrupted: list[str]


def sweep(*, offline_after: float | None = None, quiet_since: float | None = None) -> SweepReport:
    """Run every part of the sweep once and report what changed.  With ``quiet_since``
    (a ``time.monotonic()``), no host is marked offline until it is that long ago."""
    silent = offline_after if offline_after is not None else settings.HOST_OFFLINE_AFTER_SECONDS
    offline: list[Host] = []
    if quiet_since is None or time.monotonic() - quiet_since >= silent:
        offline = services.hosts_mark_offline(silent_for=silent)
    timed_out = services.commands_expire_overdue(grace=settings.COMMAND_RESULT_GRACE_SECONDS)
    failed = services.package_operations_expire_overdue(
        silent_for=settings.PACKAGE_OPERATION_STALL_SECONDS
    )
    failed += services.reboots_expire_overdue(within=settings.HOST_REBOOT_TIMEOUT_SECONDS)
    interrupted = fleetruns.fleet_runs_interrupt_stale(silent_for=settings.FLEET_RUN_STALE_SECONDS)
    report = SweepReport([h.hostname for h in offline], timed_out, failed, interrupted)
    if offline or timed_out or failed or interrupted:
        logger.info(
            "sweep: %d host(s) offline, %d command(s) timed out, %d operation(s) failed, "
            "%d fleet run(s) interrupted",
            len(offline),
            timed_out,
            failed,
            len(interrupted),
        )
    return report


#: When this process first swept (:func:`periodic_sweep`).
_first_sweep: float | None = None


def periodic_sweep() -> SweepReport:
    """The sweep each server process runs.  For its first ``HOST_OFFLINE_AFTER_SECONDS``
    it marks no host offline: after a restart, the agents of the hosts its previous run
    served are reconnecting (each with its back-off), and a host whose agent is on its way
    back must not flap offline and online.  A host whose agent does not come back is
    marked offline once that time is up (``manage.py mark_offline_hosts`` has no such
    wait)."""
    global _first_sweep
    if _first_sweep is None:
        _first_sweep = time.monotonic()
    return sweep(quiet_since=_first_sweep)


def agent_recheck() -> None:
    """For every agent connected to this process: is its token still valid, and is work
    waiting for it?  A few queries for all of them at once.

    Revocations and new work normally arrive at once through the hub; this catches the
    ones made by a process that shares no channel layer with this one, and nudges that
    were lost.  It runs for every agent every ``AGENT_RECHECK_SECONDS``, so it asks the
    database which of the connections' token hashes are still some host's (no host ids
    to convert), and for the work waiting anywhere in the fleet, which is little, rather
    than sending every connected host's id to the database.
    """
    node = Node.current()
    if node is None or not node.hub.agents:
        return
    connected = list(node.hub.agents.items())  # a snapshot; the loop may change the dict
    hashes = [h for _, conn in connected if (h := getattr(conn, "token_hash", ""))]
    valid: set[str] = set()
    for start in range(0, len(hashes), RECHECK_CHUNK):
        valid.update(
            Host.objects.filter(token_hash__in=hashes[start : start + RECHECK_CHUNK]).values_list(
                "token_hash", flat=True
            )
        )
    waiting = {
        str(host_id)
        for model in (CommandExecution, PackageOperation)
        for host_id in model.objects.filter(status__in=model.ACTIVE_STATUSES)
        .values_list("host_id", flat=True)
        .distinct()
    }
    for host_id, conn in connected:
        if getattr(conn, "token_hash", "") not in valid:
            node.call_soon_threadsafe(
                conn.close_from_hub,
                CloseCode.AUTH_FAILED,
                auth_failed_envelope("Agent token was revoked or rotated"),
            )
        elif host_id in waiting:
            node.call_soon_threadsafe(conn.nudge)
