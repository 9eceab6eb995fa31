"""``manage.py rotate_host_token HOST``: replace a host's agent token."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from hosts import services
from hosts.management.commands._hosts import agent_start_hint, find_host
from sysmanage.audit import Actor


class Command(BaseCommand):
    """Issue a new token; the agent connected with the old one is disconnected."""

    help = (
        "Replace a host's agent token. The agent connected with the old token is "
        'disconnected at once. The last line is JSON: {"host_id": ..., "token": ...}.'
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Take the host."""
        parser.add_argument("host", help="hostname or host id")

    def handle(self, *args: Any, **options: Any) -> None:
        """Rotate and print the new token."""
        try:
            host, token = services.host_rotate_token(
                host_id=find_host(options["host"]).id, actor=Actor.command_line("rotate_host_token")
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stderr.write(agent_start_hint(f"Issued a new token for {host.hostname}.", token))
        self.stdout.write(json.dumps({"host_id": str(host.id), "token": token}))
