"""``manage.py register_host HOSTNAME``: enroll a host and print its agent token once."""

from __future__ import annotations

import json
import re
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from hosts import services
from sysmanage.audit import Actor

HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,253}[A-Za-z0-9])?$")


class Command(BaseCommand):
    """Enroll a host; the last line printed is JSON with ``host_id`` and ``token``."""

    help = (
        "Enroll a host and print its agent token (shown once; only a digest is stored). "
        "Re-running for an enrolled host issues a new token and invalidates the old one. "
        'The last line of output is JSON: {"host_id": ..., "token": ...}.'
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Take the hostname."""
        parser.add_argument("hostname", help="the host's name, e.g. web-01")

    def handle(self, *args: Any, **options: Any) -> None:
        """Enroll the host and print the token."""
        hostname = options["hostname"].strip()
        if not HOSTNAME.match(hostname):
            raise CommandError(f"{hostname!r} is not a valid hostname")
        try:
            host, token = services.host_register(
                hostname=hostname, actor=Actor.command_line("register_host")
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stderr.write(
            f"Enrolled {host.hostname}. Start its agent with:\n"
            f"  python -m agent --server http://SERVER:8000 --token {token}\n"
            "The token is shown only now."
        )
        self.stdout.write(json.dumps({"host_id": str(host.id), "token": token}))
