"""``manage.py create_registration_key NAME [--group GROUP ...]``: a key that approves
SysManage agents (and puts their hosts in host groups)."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.utils import timezone

from hosts import services
from hosts.smagent import enrollment
from sysmanage.audit import Actor

UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_lifetime(text: str) -> timedelta:
    """``30m``, ``12h``, ``7d``, ``2w`` → a timedelta."""
    match = re.fullmatch(r"\s*(\d+)\s*([mhdw])\s*", text)
    if not match or int(match.group(1)) <= 0:
        raise CommandError(f"--expires-in must look like 30m, 12h, 7d or 2w, not {text!r}")
    return timedelta(**{UNITS[match.group(2)]: int(match.group(1))})


class Command(BaseCommand):
    help = (
        "Create a registration key: SysManage agents that register with it (their "
        "registration_key setting) are approved at once, and join the key's --group host "
        "groups (repeatable; a group that does not exist is created). The key is shown "
        'once; the last line of output is JSON: {"id": ..., "key": ..., "groups": [...]}.'
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Name, use limit, lifetime, host groups."""
        parser.add_argument("name", help="what the key is for, e.g. 'web servers, rollout 3'")
        parser.add_argument(
            "--max-uses",
            type=int,
            default=None,
            help="how many registrations it approves (default: no limit)",
        )
        parser.add_argument(
            "--expires-in",
            default=None,
            help="lifetime such as 12h, 7d or 30m (default: no expiry)",
        )
        parser.add_argument(
            "--group",
            action="append",
            default=[],
            metavar="GROUP",
            help="a host group that hosts registering with the key join, created if there is "
            "none (repeatable)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Create the key and print it."""
        expires_at = None
        if options["expires_in"]:
            expires_at = timezone.now() + parse_lifetime(options["expires_in"])
        if options["max_uses"] is not None and options["max_uses"] < 1:
            raise CommandError("--max-uses must be at least 1")
        actor = Actor.command_line("create_registration_key")
        try:
            with transaction.atomic():  # no group is left created for a refused key
                groups, created = services.host_groups_ensure(names=options["group"], actor=actor)
                key, secret = enrollment.key_create(
                    name=options["name"],
                    max_uses=options["max_uses"],
                    expires_at=expires_at,
                    groups=groups,
                    actor=actor,
                )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        for name in created:
            self.stderr.write(f"Created host group {name}.")
        names = sorted((group.name for group in groups), key=str.lower)
        joined = f" Hosts registering with it join {', '.join(names)}." if names else ""
        self.stderr.write(
            f"Created registration key {key.name}.{joined} Put it in each agent's "
            "/etc/sysmanage-agent.yaml under security: as registration_key (the agent "
            "reads security.registration_key), then restart the agent; the key is shown "
            "only now."
        )
        self.stdout.write(json.dumps({"id": str(key.id), "key": secret, "groups": names}))
