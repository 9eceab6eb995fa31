"""``manage.py prune_data --older-than 30d``: delete old history, safely while serving."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.db.models import Model, QuerySet
from django.utils import timezone

from activity.models import LoginCounter, UserActivity
from alerts.models import Alert
from hosts.models import CommandExecution, MetricSample, PackageOperation

UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
BATCH = 1000


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``2w``, ``45s`` → a timedelta."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text or "")
    if not match or int(match.group(1)) <= 0:
        raise CommandError(f"--older-than must look like 30d, 12h, 90m, 2w or 45s, not {text!r}")
    return timedelta(**{UNITS[match.group(2)]: int(match.group(1))})


def delete_in_batches(queryset: QuerySet[Model]) -> int:
    """Delete rows a batch at a time so that no long lock blocks a running server."""
    total = 0
    while True:
        ids = list(queryset.values_list("pk", flat=True)[:BATCH])
        if not ids:
            return total
        with transaction.atomic():
            deleted, _ = queryset.model._default_manager.filter(pk__in=ids).delete()
        total += deleted


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
        targets = {
            "metric samples": MetricSample.objects.filter(minute__lt=cutoff),
            "activity records": UserActivity.objects.filter(timestamp__lt=cutoff),
            "command executions": CommandExecution.objects.filter(created_at__lt=cutoff).exclude(
                status__in=CommandExecution.ACTIVE_STATUSES
            ),
            "package operations": PackageOperation.objects.filter(created_at__lt=cutoff).exclude(
                status__in=PackageOperation.ACTIVE_STATUSES
            ),
            "resolved alerts": Alert.objects.filter(status="resolved", updated_at__lt=cutoff),
            # Failed-login counters whose window began before the cutoff and that lock
            # nothing now: they would be started afresh at the next attempt anyway.
            "login counters": LoginCounter.objects.filter(window_started__lt=cutoff).exclude(
                blocked_until__gt=timezone.now()
            ),
        }
        verb = "Would delete" if options["dry_run"] else "Deleted"
        for label, queryset in targets.items():
            count = queryset.count() if options["dry_run"] else delete_in_batches(queryset)
            self.stdout.write(f"{verb} {count} {label} older than {cutoff:%Y-%m-%d %H:%M} UTC")
