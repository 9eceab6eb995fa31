"""Reads of the user activity log."""
from __future__ import annotations

from activity.models import UserActivity


def activity_recent(*, limit: int) -> list[UserActivity]:
    """The ``limit`` most recent activity records, newest first."""
    return list(UserActivity.objects.order_by("-timestamp")[:limit])
