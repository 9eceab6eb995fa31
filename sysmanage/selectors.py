"""
Core reads: users with their permissions, and live sessions, for many at once.

The socket recheck asks these for every user with an open socket in a process, so each
is a fixed number of queries however many users and sockets there are.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.utils import timezone

if TYPE_CHECKING:
    from sysmanage.models import User


def users_with_permissions(*, user_ids: Iterable[str]) -> dict[str, User]:
    """The users named (missing ones left out), by id, with their permissions loaded.

    Two queries: the users, and their direct and group permissions together.  Each user
    gets Django's permission cache filled, so ``has_perm`` asks nothing more.
    """
    ids = list(set(user_ids))
    users = {str(u.pk): u for u in get_user_model()._default_manager.filter(pk__in=ids)}
    found = list(users.values())
    direct = (
        Permission.objects.filter(user__in=found)
        .values_list("user__id", "content_type__app_label", "codename")
        .order_by()
    )
    via_groups = (
        Permission.objects.filter(group__user__in=found)
        .values_list("group__user__id", "content_type__app_label", "codename")
        .order_by()
    )
    granted: dict[str, set[str]] = defaultdict(set)
    for user_id, app_label, codename in direct.union(via_groups):
        granted[str(user_id)].add(f"{app_label}.{codename}")
    for key, user in users.items():
        # what ModelBackend.get_all_permissions would compute and cache (on an attribute
        # of its own, which the user model does not declare)
        user._perm_cache = granted[key] if user.is_active else set()  # type: ignore[attr-defined]
    return users


def _session_engine() -> ModuleType:
    return import_module(settings.SESSION_ENGINE)


def live_sessions(*, session_keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The data of the sessions named that exist and have not expired, by key.

    One query with the database session engines; other engines load each session.
    """
    keys = list(set(session_keys))
    if not keys:
        return {}
    engine = _session_engine()
    store = engine.SessionStore()
    if settings.SESSION_ENGINE in (
        "django.contrib.sessions.backends.db",
        "django.contrib.sessions.backends.cached_db",
    ):
        rows = (
            store.get_model_class()
            .objects.filter(session_key__in=keys, expire_date__gt=timezone.now())
            .values_list("session_key", "session_data")
        )
        return {key: store.decode(data) for key, data in rows}
    found = {}
    for key in keys:
        data = engine.SessionStore(session_key=key).load()
        if data:
            found[key] = data
    return found
