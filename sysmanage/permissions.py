"""
Who may do what: the one place the admin, the REST API, the WebSocket consumers and the
pages ask.

Every right is a Django model permission, granted in the admin to users or to groups;
active superusers hold them all.  Rights over the server's own set-up (registration keys,
agent registrations, host tokens, host groups, the activity log) also need the staff flag,
exactly as the admin does, so a user gets the same answer on every path.  The staff flag alone
grants nothing.

The checks read the flags and permissions of the user object they are given, and Django
caches permissions on that object (``_perm_cache``).  A caller that holds a user for
long, such as an open socket, asks :func:`holds_now` (or passes :func:`fresh`) to act on
rights as they are now; sockets keep only :data:`SOCKET_RIGHTS` in memory, which the
server rechecks (``sysmanage.recheck``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, TypeGuard, TypeVar

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser
from django.db.models import Q, QuerySet
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.views import APIView

from sysmanage.protocol import ALL_HOSTS

if TYPE_CHECKING:
    from sysmanage.models import User

#: Whoever asks: a user, an anonymous visitor, or nobody (a socket not yet authenticated).
Asker: TypeAlias = "User | AnonymousUser | None"


@dataclass(frozen=True)
class Right:
    """A right: the model permissions granting it (any one), and whether staff only."""

    permissions: tuple[str, ...]
    what: str
    staff_only: bool = False


RIGHTS: dict[str, Right] = {
    "run_command": Right(
        ("sysmanage.run_command",), "run commands and package operations on hosts"
    ),
    "run_package_operation": Right(("sysmanage.run_command",), "run package operations on hosts"),
    "patch_reboot": Right(("hosts.patch_host",), "apply updates to and reboot hosts"),
    "view_all_hosts": Right(("hosts.view_all_hosts",), "see every host"),
    "view_command_output": Right(
        ("hosts.view_command_output",), "see the text and output of other users' commands"
    ),
    "raise_alert": Right(("alerts.add_alert",), "raise alerts"),
    "manage_alert": Right(("alerts.change_alert",), "acknowledge or resolve alerts"),
    # Viewing in the admin is allowed by the view or the change permission.
    "view_activity": Right(
        ("activity.view_useractivity", "activity.change_useractivity"),
        "read the user activity log",
        staff_only=True,
    ),
    "view_registrations": Right(
        ("hosts.view_agentregistration", "hosts.change_agentregistration"),
        "see agent registrations",
        staff_only=True,
    ),
    "decide_registrations": Right(
        ("hosts.change_agentregistration",),
        "approve or reject agent registrations",
        staff_only=True,
    ),
    "view_registration_keys": Right(
        ("hosts.view_registrationkey", "hosts.change_registrationkey"),
        "see registration keys",
        staff_only=True,
    ),
    "create_registration_keys": Right(
        ("hosts.add_registrationkey",), "create registration keys", staff_only=True
    ),
    "revoke_registration_keys": Right(
        ("hosts.change_registrationkey",), "revoke registration keys", staff_only=True
    ),
    "manage_host_tokens": Right(
        ("hosts.change_host",),
        "rotate or revoke host tokens, or let a host register again",
        staff_only=True,
    ),
    # One right for every change to groups (create, rename, delete, members): the admin
    # asks it for adding and deleting groups too, so that the answer is the same on
    # every path.  Seeing groups needs nothing more than seeing hosts.
    "manage_host_groups": Right(
        ("hosts.change_hostgroup",),
        "create, change or delete host groups or change which hosts are in them",
        staff_only=True,
    ),
    # Who sees which host groups: as much as every right over hosts together.
    "manage_host_access": Right(
        ("hosts.change_hostgroupgrant",),
        "grant or take away access to host groups",
        staff_only=True,
    ),
    # Every host's live metrics on one socket: what staff who may list the hosts in the
    # admin see there, at a bounded cost (one summary a second).
    "view_fleet_metrics": Right(
        ("hosts.view_host", "hosts.change_host"),
        "watch every host's live metrics at once",
        staff_only=True,
    ),
}

#: Channels that need a right to subscribe to, and that right.
CHANNEL_RIGHTS = {"user_activity": "view_activity"}
#: Subscriptions that need a right because of a filter: (channel, filter, value) -> right.
FILTER_RIGHTS = {("host_metrics", "host_id", ALL_HOSTS): "view_fleet_metrics"}
#: The rights an open socket keeps in memory: the hub consults them for every event, so
#: they cannot be read from the database then.  The recheck keeps them current.
SOCKET_RIGHTS = ("view_activity", "view_command_output", "view_fleet_metrics")


def _active(user: Asker) -> TypeGuard[User]:
    return bool(user is not None and user.is_authenticated and user.is_active)


def holds(user: Asker, right: str) -> bool:
    """Whether ``user`` holds ``right`` (a key of :data:`RIGHTS`)."""
    spec = RIGHTS[right]
    if not _active(user) or (spec.staff_only and not user.is_staff):
        return False
    return bool(user.is_superuser or any(user.has_perm(p) for p in spec.permissions))


def denial(right: str) -> str:
    """The message that explains a refusal for lack of ``right``."""
    spec = RIGHTS[right]
    staff = "staff status and " if spec.staff_only else ""
    granted = " or a host group grant that gives it" if right in HOST_RIGHTS else ""
    return (
        f"You do not have permission to {spec.what} "
        f"(needs {staff}the permission {spec.permissions[0]}{granted})"
    )


def fresh(user: Asker) -> User | None:
    """``user`` as the database has it now, permissions not yet read; None if deleted.

    A user object read when a socket connected keeps the flags and the permission cache
    of that moment.
    """
    if user is None or not user.is_authenticated:
        return None
    return get_user_model()._default_manager.filter(pk=user.pk).first()


def holds_now(user: Asker, right: str) -> bool:
    """Whether ``user`` holds ``right`` according to the database now (runs queries)."""
    return holds(fresh(user), right)


def subscribe_denied_reason(user: Asker, channel: str) -> str | None:
    """Return why ``user`` may not subscribe to ``channel``, or None when it may."""
    if not _active(user):
        return "Authentication required"
    right = CHANNEL_RIGHTS.get(channel)
    if right is not None and not holds(user, right):
        return f"Insufficient permissions for channel '{channel}'"
    return None


def filters_right(channel: str, filters: Mapping[str, object]) -> str | None:
    """The right a subscription to ``channel`` needs because of its ``filters``, if any."""
    for (name, field, value), right in FILTER_RIGHTS.items():
        if name == channel and filters.get(field) == value:
            return right
    return None


def filters_denied_reason(
    channel: str, filters: Mapping[str, object], rights: frozenset[str]
) -> str | None:
    """Why a user with socket ``rights`` may not subscribe to ``channel`` with ``filters``
    (the channel itself allowed), or None when it may."""
    for (name, field, value), right in FILTER_RIGHTS.items():
        if name == channel and filters.get(field) == value and right not in rights:
            spec = RIGHTS[right]
            staff = "staff status and " if spec.staff_only else ""
            return (
                f"Insufficient permissions for channel '{channel}' with {field} {value!r} "
                f"(needs {staff}the permission {spec.permissions[0]})"
            )
    return None


def subscription_lost(channel: str, filters: Mapping[str, object], rights: frozenset[str]) -> bool:
    """Whether a subscription to ``channel`` with ``filters`` needs a right missing from
    ``rights``."""
    right = CHANNEL_RIGHTS.get(channel)
    if right is not None and right not in rights:
        return True
    right = filters_right(channel, filters)
    return right is not None and right not in rights


def socket_rights(user: Asker) -> frozenset[str]:
    """The :data:`SOCKET_RIGHTS` that ``user`` holds (one shared set per distinct answer:
    thousands of sockets keep a few)."""
    rights = frozenset(right for right in SOCKET_RIGHTS if holds(user, right))
    return _RIGHTS_SETS.setdefault(rights, rights)


#: Every distinct answer of :func:`socket_rights` (at most 2 ** len(SOCKET_RIGHTS)).
_RIGHTS_SETS: dict[frozenset[str], frozenset[str]] = {}
#: The caches Django's ``ModelBackend`` fills on a user object to answer ``has_perm``.
_PERMISSION_CACHES = ("_perm_cache", "_user_perm_cache", "_group_perm_cache")


def forget_permissions(user: Asker) -> None:
    """Drop the permissions Django cached on ``user`` (every permission name the user
    holds, in three sets).  A socket keeps its user object for as long as it is open
    but asks only :func:`fresh` users, so there they would only take memory."""
    if user is not None:
        for name in _PERMISSION_CACHES:
            user.__dict__.pop(name, None)


def sees_command_output(
    *, user_id: str | None, rights: frozenset[str], requested_by_id: str | None
) -> bool:
    """Whether a viewer with ``rights`` sees the text and output of a command (or the
    output of a package operation): they asked for it, or they may see everyone's."""
    return "view_command_output" in rights or (
        user_id is not None and requested_by_id is not None and str(requested_by_id) == str(user_id)
    )


def can_see_command_output(user: Asker, requested_by_id: object) -> bool:
    """Whether ``user`` sees the text and output of a command ``requested_by_id`` asked
    for (superusers see all)."""
    return _active(user) and (
        holds(user, "view_command_output")
        or (requested_by_id is not None and str(requested_by_id) == str(user.pk))
    )


def can_run_commands(user: Asker) -> bool:
    """Whether ``user`` may run commands and package operations on hosts."""
    return holds(user, "run_command")


# -- which hosts ---------------------------------------------------------------------------

Rows = TypeVar("Rows", bound="QuerySet[Any]")
#: Which hosts a right reaches: None for every host, else the ids (canonical strings).
HostScope: TypeAlias = "frozenset[str] | None"
#: The rights a host group grant gives over its group's hosts: right -> the grant's flag
#: (None: every grant gives it).
HOST_RIGHTS: dict[str, str | None] = {
    "view": None,
    "run_command": "can_run_commands",
    "run_package_operation": "can_run_package_operations",
    "manage_alert": "can_manage_alerts",
    "patch_reboot": "can_patch_and_reboot",
}

#: Reads the ids of the hosts in the groups granted to a user (directly or through their
#: Django groups) by grants with a flag set (None: any grant; no user: no host);
#: registered by the hosts app, so that the core never imports it.  Returns a query of
#: host ids, evaluated by the caller or used in a filter.
GrantedHosts = Callable[["User | None", "str | None"], Any]
_GRANTED: list[GrantedHosts] = []


def register_granted_hosts(reader: GrantedHosts) -> None:
    """Register the reader of granted hosts (the hosts app, from ``AppConfig.ready``)."""
    _GRANTED[:] = [reader]


def sees_every_host(user: Asker) -> bool:
    """Whether ``user`` sees every host: superusers, staff, and holders of
    ``hosts.view_all_hosts``."""
    return _active(user) and bool(
        user.is_superuser or user.is_staff or holds(user, "view_all_hosts")
    )


def scope_query(user: Asker, right: str = "view") -> Any:
    """The hosts on which ``user`` may use ``right`` (a key of :data:`HOST_RIGHTS`): None
    for every host, else a query of their ids (possibly empty; runs no query until used).

    Seeing a host needs :func:`sees_every_host` or a grant on one of its groups.  Acting
    on it needs the right on every host (a model permission) and sight of it, or a grant
    of its group with the right's flag.
    """
    flag = HOST_RIGHTS[right]
    granted = _GRANTED[0]  # registered before any request is served
    if not _active(user):
        return granted(None, None)
    sees_all = sees_every_host(user)
    if right == "view" or holds(user, right):
        return None if sees_all else granted(user, None)
    return granted(user, flag)


def visible(
    rows: Rows, user: Asker, field: str = "host_id", *, right: str = "view", hostless: bool = False
) -> Rows:
    """``rows`` (a query set) narrowed to those whose ``field`` names a host on which
    ``user`` may use ``right``: what every list and detail of hosts, and of things about
    hosts, goes through.  With ``hostless``, rows about no host (``field`` null) stay, as
    their events reach every subscriber."""
    query = scope_query(user, right)
    if query is None:
        return rows
    if hostless:
        return rows.filter(Q(**{f"{field}__in": query}) | Q(**{f"{field}__isnull": True}))
    return rows.filter(**{f"{field}__in": query})


def host_scope(user: Asker, right: str = "view") -> HostScope:
    """:func:`scope_query`, read: None for every host, else the host ids (runs a query)."""
    query = scope_query(user, right)
    if query is None:
        return None
    return _shared(frozenset(str(host_id) for host_id in query))


def hosts_allowed(user: Asker, right: str, host_ids: Iterable[object]) -> set[str]:
    """Of ``host_ids``, those on which ``user`` may use ``right`` (a key of
    :data:`HOST_RIGHTS`), as canonical strings.  Reads the database: pass a :func:`fresh`
    user to act on rights as they are now."""
    ids = {str(h) for h in host_ids}
    if not _active(user):
        return set()
    query = scope_query(user, right)
    if query is None:
        return ids
    return {str(h) for h in query.filter(id__in=ids)} if ids else set()


def may_anywhere(user: Asker, right: str) -> bool:
    """Whether ``user`` may use ``right`` on some host (or on every host)."""
    if not _active(user):
        return False
    query = scope_query(user, right)
    return query is None or query.exists()


def may_on_host(user: Asker, right: str, host_id: object) -> bool:
    """Whether ``user`` may use ``right`` on the host ``host_id``."""
    return bool(hosts_allowed(user, right, [host_id]))


def sees_fleet_run(*, scope: HostScope, user_id: object, requested_by_id: object) -> bool:
    """Whether a viewer who sees ``scope`` sees a fleet run (its counts and its hosts'
    results): its requester (who could act on every host in it), and those who see
    every host."""
    return scope is None or (
        user_id is not None and requested_by_id is not None and str(user_id) == str(requested_by_id)
    )


def fleet_runs_visible(rows: Rows, user: Asker) -> Rows:
    """Fleet runs (a query set) narrowed to those ``user`` sees (:func:`sees_fleet_run`)."""
    if sees_every_host(user):
        return rows
    if not _active(user):
        return rows.none()
    return rows.filter(requested_by_id=user.pk)


def in_scope(scope: HostScope, host_id: object) -> bool:
    """Whether a host is within ``scope`` (events without a host are in every scope)."""
    return scope is None or host_id is None or str(host_id) in scope


#: Every distinct scope sockets hold, so that thousands of sockets with the same grants
#: keep one set; emptied when it grows past a bound (grants change rarely).
_SCOPES: dict[frozenset[str], frozenset[str]] = {}
_SCOPES_MAX = 1024


def _shared(scope: frozenset[str]) -> frozenset[str]:
    if len(_SCOPES) >= _SCOPES_MAX and scope not in _SCOPES:
        _SCOPES.clear()
    return _SCOPES.setdefault(scope, scope)


def can_raise_alerts(user: Asker) -> bool:
    """Whether ``user`` may raise an alert by hand."""
    return holds(user, "raise_alert")


def can_manage_alerts(user: Asker) -> bool:
    """Whether ``user`` may acknowledge or resolve alerts."""
    return holds(user, "manage_alert")


def can_use_admin(user: Asker) -> bool:
    """Whether ``user`` may open the admin site (as the admin itself decides: active staff)."""
    return _active(user) and bool(user.is_staff)


def can_watch_fleet_metrics(user: Asker) -> bool:
    """Whether ``user`` may watch every host's live metrics at once (one subscription)."""
    return holds(user, "view_fleet_metrics")


def can_view_activity(user: Asker) -> bool:
    """Whether ``user`` may read the user activity log."""
    return holds(user, "view_activity")


def can_view_registrations(user: Asker) -> bool:
    """Whether ``user`` may see SysManage agent registrations."""
    return holds(user, "view_registrations")


def can_decide_registrations(user: Asker) -> bool:
    """Whether ``user`` may approve or reject SysManage agent registrations."""
    return holds(user, "decide_registrations")


def can_view_registration_keys(user: Asker) -> bool:
    """Whether ``user`` may list registration keys."""
    return holds(user, "view_registration_keys")


def can_create_registration_keys(user: Asker) -> bool:
    """Whether ``user`` may create registration keys."""
    return holds(user, "create_registration_keys")


def can_revoke_registration_keys(user: Asker) -> bool:
    """Whether ``user`` may revoke registration keys."""
    return holds(user, "revoke_registration_keys")


def can_manage_host_tokens(user: Asker) -> bool:
    """Whether ``user`` may rotate or revoke host tokens or allow a re-registration."""
    return holds(user, "manage_host_tokens")


def can_manage_host_groups(user: Asker) -> bool:
    """Whether ``user`` may create, change or delete host groups and set their hosts."""
    return holds(user, "manage_host_groups")


def can_manage_host_access(user: Asker) -> bool:
    """Whether ``user`` may grant or take away access to host groups."""
    return holds(user, "manage_host_access")


class RequiresRight(BasePermission):
    """REST: each view action needs the right its view names in ``action_rights``.

    An action the view does not list is refused: a new action must say what it needs.
    """

    message = "You do not have permission to perform this action."

    def has_permission(self, request: Request, view: APIView) -> bool:
        """Whether the requester holds the right of this action (401 first if anonymous)."""
        right = getattr(view, "action_rights", {}).get(getattr(view, "action", None))
        if right is None or not holds(request.user, right):
            if right is not None:
                self.message = denial(right)
            return False
        return True
