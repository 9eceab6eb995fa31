"""``manage.py revoke_host HOST``: revoke a host's agent token."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from hosts import services
from hosts.management.commands._hosts import find_host
from sysmanage.audit import Actor


class Command(BaseCommand):
    """Revoke the token; the connected agent is disconnected at once."""

    help = (
        "Revoke a host's agent token. Its connected agent is disconnected at once and "
        "cannot reconnect until register_host or rotate_host_token issues a new token."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Take the host."""
        parser.add_argument("host", help="hostname or host id")

    def handle(self, *args: Any, **options: Any) -> None:
        """Revoke."""
        host = services.host_revoke_token(
            host_id=find_host(options["host"]).id, actor=Actor.command_line("revoke_host")
        )
        self.stdout.write(f"Revoked the agent token of {host.hostname}.")
