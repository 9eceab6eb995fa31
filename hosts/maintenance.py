"""
The hosts sweep: silent hosts go offline, overdue commands and stalled package
operations end with a clear status.  Every server process runs it periodically, and
``manage.py mark_offline_hosts`` runs it from cron; it is safe to run concurrently.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from django.conf import settings

from hosts import services

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
        silent_for=settings.PACKAGE_OPERATION_STALL_SECONDS)
    report = SweepReport([h.hostname for h in offline], timed_out, failed)
    if offline or timed_out or failed:
        logger.info("sweep: %d host(s) offline, %d command(s) timed out, %d operation(s) "
                    "failed", len(offline), timed_out, failed)
    return report
