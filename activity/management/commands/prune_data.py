"""``manage.py prune_data --older-than 30d``: delete old history, safely while serving."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from activity import services

UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``2w``, ``45s`` → a timedelta."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text or "")
    if not match or int(match.group(1)) <= 0:
        raise CommandError(f"--older-than must look like 30d, 12h, 90m, 2w or 45s, not {text!r}")
    return timedelta(**{UNITS[match.group(2)]: int(match.group(1))})


class Command(BaseCommand):
    """Delete metrics history, activity, finished commands/operations and resolved alerts."""

    help = (
        "Delete data older than --older-than: per-minute metrics history, user activity, "
        "finished command executions and package operations, resolved alerts and "
        "failed-login counters. "
        "Unfinished work and open alerts are kept. Safe to run while servers run."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Take the age and a dry-run switch."""
        parser.add_argument("--older-than", required=True, help="age, e.g. 30d, 12h, 2w")
        parser.add_argument(
            "--dry-run", action="store_true", help="only count what would be deleted"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Prune and report per kind of record."""
        cutoff = timezone.now() - parse_age(options["older_than"])
        verb = "Would delete" if options["dry_run"] else "Deleted"
        for label, count in services.history_prune(
            cutoff=cutoff, dry_run=options["dry_run"]
        ).items():
            self.stdout.write(f"{verb} {count} {label} older than {cutoff:%Y-%m-%d %H:%M} UTC")
