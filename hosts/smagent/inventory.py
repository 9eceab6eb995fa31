"""
The SysManage agent's users-and-groups and services reports, as the server stores them
(see ``docs/sysmanage-agent.md``).

``user_access_update`` and ``role_data`` are not kept as sent: only the fields the host's
page and the REST API show are kept, texts are cut to sane lengths, malformed entries are
dropped and the lists are bounded (:data:`MAX_USERS`, :data:`MAX_GROUPS`,
:data:`MAX_ROLES`).  The identity fields (``host_id``, ``host_token``) and the time of
collection are left out, so that an unchanged report has an unchanged digest and is not
written again.  Nothing here touches the database.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypedDict

#: An agent message's ``data`` (its fields unchecked).
MessageData = Mapping[str, object]

#: At most this many users, groups and roles are kept of one report (regular users and
#: groups first); how many more there were is kept too (``*_not_kept``).
MAX_USERS = 2000
MAX_GROUPS = 500
MAX_ROLES = 500
#: At most this many group names are kept per user.
MAX_USER_GROUPS = 64
#: Lengths texts are cut to.
NAME_CHARS = 128
PATH_CHARS = 255
VERSION_CHARS = 100
STATUS_CHARS = 32
HOSTNAME_CHARS = 255
#: Ids and totals above this are not believed (uids and gids are 32-bit).
MAX_ID = 2**32


class UserEntry(TypedDict):
    """One account of ``user_access_update``."""

    username: str
    uid: int | None
    home_directory: str | None
    shell: str | None
    is_system_user: bool
    groups: list[str]


class GroupEntry(TypedDict):
    """One group of ``user_access_update`` (the agent lists no members)."""

    group_name: str
    gid: int | None
    is_system_group: bool


class UsersReport(TypedDict):
    """``user_access_update`` as stored (inventory kind ``users``)."""

    users: list[UserEntry]
    groups: list[GroupEntry]
    users_not_kept: int
    groups_not_kept: int
    total_users: int | None
    total_groups: int | None
    system_users: int | None
    regular_users: int | None
    system_groups: int | None
    regular_groups: int | None
    platform: str | None
    hostname: str | None


class RoleEntry(TypedDict):
    """One role of ``role_data``: an installed server package and its service."""

    role: str | None
    package_name: str | None
    package_version: str | None
    service_name: str | None
    service_status: str | None
    is_active: bool | None


class ServicesReport(TypedDict):
    """``role_data`` as stored (inventory kind ``services``)."""

    roles: list[RoleEntry]
    roles_not_kept: int
    role_count: int | None
    hostname: str | None


def clean_text(value: object, limit: int) -> str | None:
    """``value`` if it is a string, stripped, with every character that is not printable
    (NUL, controls, line breaks) replaced, cut to ``limit`` characters; else None (an
    empty string too)."""
    if not isinstance(value, str):
        return None
    text = "".join(c if c.isprintable() else "\ufffd" for c in value.strip()[:limit])
    return text or None


def _whole(value: object) -> int | None:
    """``value`` if it is a whole number from 0 below :data:`MAX_ID` (not a bool)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_ID:
        return value
    return None


def _flag(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _dicts(value: object) -> list[Mapping[str, object]]:
    """The objects of ``value`` if it is a list (anything else in it is dropped)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _user(item: Mapping[str, object]) -> UserEntry | None:
    name = clean_text(item.get("username"), NAME_CHARS)
    if name is None:
        return None
    groups = item.get("groups")
    names = [clean_text(g, NAME_CHARS) for g in groups] if isinstance(groups, list) else []
    return {
        "username": name,
        "uid": _whole(item.get("uid")),
        "home_directory": clean_text(item.get("home_directory"), PATH_CHARS),
        "shell": clean_text(item.get("shell"), PATH_CHARS),
        "is_system_user": item.get("is_system_user") is True,
        "groups": [g for g in names if g is not None][:MAX_USER_GROUPS],
    }


def _group(item: Mapping[str, object]) -> GroupEntry | None:
    name = clean_text(item.get("group_name"), NAME_CHARS)
    if name is None:
        return None
    return {
        "group_name": name,
        "gid": _whole(item.get("gid")),
        "is_system_group": item.get("is_system_group") is True,
    }


def users_report(data: MessageData) -> tuple[UsersReport, int] | None:
    """``user_access_update`` as stored, and how many users it lists (its well-formed
    entries, kept or not); None when it has no list of users (nothing to store)."""
    if not isinstance(data.get("users"), list):
        return None
    users = [u for u in map(_user, _dicts(data.get("users"))) if u is not None]
    groups = [g for g in map(_group, _dicts(data.get("groups"))) if g is not None]
    # Regular accounts first (a stable sort keeps the agent's order within each), so that
    # a list cut short keeps the people rather than the system accounts.
    users.sort(key=lambda u: u["is_system_user"])
    groups.sort(key=lambda g: g["is_system_group"])
    report: UsersReport = {
        "users": users[:MAX_USERS],
        "groups": groups[:MAX_GROUPS],
        "users_not_kept": max(len(users) - MAX_USERS, 0),
        "groups_not_kept": max(len(groups) - MAX_GROUPS, 0),
        "total_users": _whole(data.get("total_users")),
        "total_groups": _whole(data.get("total_groups")),
        "system_users": _whole(data.get("system_users")),
        "regular_users": _whole(data.get("regular_users")),
        "system_groups": _whole(data.get("system_groups")),
        "regular_groups": _whole(data.get("regular_groups")),
        "platform": clean_text(data.get("platform"), NAME_CHARS),
        "hostname": clean_text(data.get("hostname"), HOSTNAME_CHARS),
    }
    return report, len(users)


def _role(item: Mapping[str, object]) -> RoleEntry | None:
    role = clean_text(item.get("role"), NAME_CHARS)
    package = clean_text(item.get("package_name"), PATH_CHARS)
    if role is None and package is None:
        return None
    status = clean_text(item.get("service_status"), STATUS_CHARS)
    return {
        "role": role,
        "package_name": package,
        "package_version": clean_text(item.get("package_version"), VERSION_CHARS),
        "service_name": clean_text(item.get("service_name"), PATH_CHARS),
        "service_status": status.lower() if status is not None else None,
        "is_active": _flag(item.get("is_active")),
    }


def services_report(data: MessageData) -> tuple[ServicesReport, int] | None:
    """``role_data`` as stored, and how many roles it lists (its well-formed entries,
    kept or not); None when it has no list of roles (nothing to store)."""
    if not isinstance(data.get("roles"), list):
        return None
    roles = [r for r in map(_role, _dicts(data.get("roles"))) if r is not None]
    report: ServicesReport = {
        "roles": roles[:MAX_ROLES],
        "roles_not_kept": max(len(roles) - MAX_ROLES, 0),
        "role_count": _whole(data.get("role_count")),
        "hostname": clean_text(data.get("hostname"), HOSTNAME_CHARS),
    }
    return report, len(roles)


#: The inventory kinds stored in a normalized form, and how: the report to store and how
#: many items it lists, or None when the message holds no such report.
NORMALIZED: dict[str, Callable[[MessageData], tuple[Mapping[str, object], int] | None]] = {
    "users": users_report,
    "services": services_report,
}
