"""
The hosts sweep: silent hosts go offline, overdue commands and stalled package
operations end with a clear status.  Every server process runs it periodically, and
``manage.py mark_offline_hosts`` runs it from cron; it is safe to run concurrently.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from django.conf import settings

from hosts import services
from hosts.models import CommandExecution, Host, PackageOperation
from sysmanage.node import Node
from sysmanage.protocol import CloseCode, auth_failed_envelope

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    """What one sweep changed."""

    hosts_offline: list[str]
    commands_timed_out: int
    operations_failed: int


def sweep(*, offline_after: float | None = None) -> SweepReport:
    """Run every part of the sweep once and report what changed."""
    silent = offline_after if offline_after is not None else settings.HOST_OFFLINE_AFTER_SECONDS
    offline = services.hosts_mark_offline(silent_for=silent)
    timed_out = services.commands_expire_overdue(grace=settings.COMMAND_RESULT_GRACE_SECONDS)
    failed = services.package_operations_expire_overdue(
        silent_for=settings.PACKAGE_OPERATION_STALL_SECONDS
    )
    report = SweepReport([h.hostname for h in offline], timed_out, failed)
    if offline or timed_out or failed:
        logger.info(
            "sweep: %d host(s) offline, %d command(s) timed out, %d operation(s) failed",
            len(offline),
            timed_out,
            failed,
        )
    return report


def agent_recheck() -> None:
    """For every agent connected to this process: is its token still valid, and is work
    waiting for it?  One query for each question, for all of them at once.

    Revocations and new work normally arrive at once through the hub; this catches the
    ones made by a process that shares no channel layer with this one, and nudges that
    were lost.
    """
    node = Node.current()
    if node is None or not node.hub.agents:
        return
    connected = list(node.hub.agents.items())  # a snapshot; the loop may change the dict
    ids = [host_id for host_id, _ in connected]
    tokens = dict(Host.objects.filter(id__in=ids).values_list("id", "token_hash"))
    waiting = set(
        CommandExecution.objects.filter(
            host_id__in=ids, status__in=CommandExecution.ACTIVE_STATUSES
        ).values_list("host_id", flat=True)
    ) | set(
        PackageOperation.objects.filter(
            host_id__in=ids, status__in=PackageOperation.ACTIVE_STATUSES
        ).values_list("host_id", flat=True)
    )
    for host_id, conn in connected:
        token_hash = tokens.get(uuid.UUID(host_id))
        if not token_hash or token_hash != getattr(conn, "token_hash", None):
            node.call_soon_threadsafe(
                conn.close_from_hub,
                CloseCode.AUTH_FAILED,
                auth_failed_envelope("Agent token was revoked or rotated"),
            )
        elif uuid.UUID(host_id) in waiting:
            node.call_soon_threadsafe(conn.nudge)
