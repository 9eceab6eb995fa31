"""``manage.py mark_offline_hosts``: the heartbeat sweep, for cron."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from hosts.maintenance import sweep


class Command(BaseCommand):
    """Mark silent hosts offline and end overdue commands (the server also does this)."""

    help = (
        "Mark offline every online host not heard from for --after seconds (default "
        "HOST_OFFLINE_AFTER_SECONDS), time out commands whose result never came, and fail "
        "stalled package operations. Safe to run while servers run."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Take the silence threshold."""
        parser.add_argument(
            "--after",
            type=float,
            default=None,
            help="seconds of silence after which a host is offline",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Sweep once and report."""
        after = options["after"]
        if after is not None and after <= 0:
            raise CommandError("--after must be a positive number of seconds")
        report = sweep(
            offline_after=after if after is not None else settings.HOST_OFFLINE_AFTER_SECONDS
        )
        names = ", ".join(report.hosts_offline) or "none"
        self.stdout.write(
            f"Hosts marked offline: {len(report.hosts_offline)} ({names}); "
            f"commands timed out: {report.commands_timed_out}; "
            f"package operations failed: {report.operations_failed}"
        )
