"""``manage.py allow_reregistration HOST``: let a SysManage agent register again."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from hosts.management.commands._hosts import find_host
from hosts.smagent import enrollment
from hosts.smagent.enrollment import EnrollmentRefused
from sysmanage.audit import Actor


class Command(BaseCommand):
    help = (
        "Let the SysManage agent of a host register again (once, within --minutes): for "
        "an agent that lost its local database and so its identity. Its next "
        "registration gets a new host token; until then it keeps getting 409."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """The host and the window."""
        parser.add_argument("host", help="hostname or host id")
        parser.add_argument(
            "--minutes", type=int, default=60, help="how long the permission lasts (default 60)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Open the window."""
        if not 1 <= options["minutes"] <= 7 * 24 * 60:
            raise CommandError("--minutes must be from 1 to 10080")
        try:
            host = enrollment.allow_reregistration(
                host_id=find_host(options["host"]).id,
                minutes=options["minutes"],
                actor=Actor.command_line("allow_reregistration"),
            )
        except EnrollmentRefused as exc:
            raise CommandError(exc.detail) from None
        self.stdout.write(
            f"The agent of {host.hostname} may register again until "
            f"{host.reregistration_allowed_until:%Y-%m-%d %H:%M:%S} UTC."
        )
