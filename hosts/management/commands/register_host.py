"""``manage.py register_host HOSTNAME [--group GROUP ...]``: enroll a host (in host
groups) and print its agent token once."""

from __future__ import annotations

import json
import re
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from hosts import services
from hosts.management.commands._hosts import agent_start_hint
from hosts.models import Host
from sysmanage.audit import Actor

HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,253}[A-Za-z0-9])?$")


class Command(BaseCommand):
    """Enroll a host; the last line printed is JSON with ``host_id`` and ``token``."""

    help = (
        "Enroll a host and print its agent token (shown once; only a digest is stored). "
        "An enrolled host is refused (rotate_host_token gives it a new token). "
        "--group puts the host in a group (repeat it for several; a group that does not "
        "exist is created). "
        'The last line of output is JSON: {"host_id": ..., "token": ..., "groups": [...]}.'
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Take the hostname."""
        parser.add_argument("hostname", help="the host's name, e.g. web-01")
        parser.add_argument(
            "--reissue",
            action="store_true",
            help="the host is enrolled already: issue a new token anyway (as rotate_host_token)",
        )
        parser.add_argument(
            "--group",
            action="append",
            default=[],
            metavar="GROUP",
            help="a host group to put the host in, created if there is none (repeatable)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Enroll the host and print the token."""
        hostname = options["hostname"].strip()
        if not HOSTNAME.match(hostname):
            raise CommandError(f"{hostname!r} is not a valid hostname")
        enrolled = Host.objects.filter(hostname__iexact=hostname).first()
        if enrolled is not None and not options["reissue"]:
            raise CommandError(
                f"{enrolled.hostname} is already enrolled and its agent keeps its token. "
                "To give it a new one (the agent running with the old token is cut off), "
                f"run: manage.py rotate_host_token {enrolled.hostname}"
            )
        actor = Actor.command_line("register_host")
        try:
            with transaction.atomic():  # no group is left created for a refused host
                groups, created = services.host_groups_ensure(names=options["group"], actor=actor)
                if enrolled is not None:  # --reissue: as rotate_host_token, old agent cut off
                    host, token = services.host_rotate_token(host_id=enrolled.id, actor=actor)
                    services.host_set_groups(host_id=host.id, groups=groups, keep=True, actor=actor)
                else:
                    host, token = services.host_register(
                        hostname=hostname, groups=groups, actor=actor
                    )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        for name in created:
            self.stderr.write(f"Created host group {name}.")
        names = sorted(host.groups.values_list("name", flat=True), key=str.lower)
        joined = f" Host groups: {', '.join(names)}." if names else ""
        self.stderr.write(agent_start_hint(f"Enrolled {host.hostname}.{joined}", token))
        self.stdout.write(json.dumps({"host_id": str(host.id), "token": token, "groups": names}))
