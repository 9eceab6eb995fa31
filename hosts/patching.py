"""
Pending updates and reboots: the one shape both agents' reports take.

This project's agent sends ``patch_status`` (``docs/agent-protocol.md``); the SysManage
agent sends ``package_updates_update`` and ``reboot_status_update``
(``docs/sysmanage-agent.md``).  Each is turned here into :class:`PatchUpdates` and a
reboot flag, which :func:`hosts.services.host_patch_updates_save` and
:func:`hosts.services.host_reboot_save` store.  Nothing here touches the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NotRequired, TypedDict

from hosts.agent_protocol import MessageId
from sysmanage.protocol import ErrorCode, ProtocolError

#: The most updates stored (and shown) per host; the counts cover them all.
MAX_STORED_UPDATES = 1000
NAME_LIMIT, VERSION_LIMIT, MANAGER_LIMIT = 255, 200, 40


class PendingUpdate(TypedDict):
    """One package with a newer version available."""

    name: str
    current: str
    available: str
    security: bool
    #: the package manager that offers it (a SysManage agent's report names it, and its
    #: ``apply_updates`` takes only updates named with their manager)
    manager: NotRequired[str]


@dataclass(frozen=True)
class PatchUpdates:
    """A report of pending updates: how many, how many fix security issues (None when
    the agent did not say), and the packages, security updates first."""

    updates: list[PendingUpdate]
    count: int | None
    security_count: int | None


def _text(value: object, limit: int) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return ""
    return str(value).replace("\x00", "").strip()[:limit]


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _flag(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1")
    return value is True or (isinstance(value, int) and value == 1)


def sorted_updates(updates: list[PendingUpdate]) -> list[PendingUpdate]:
    """``updates`` with security updates first, then by name, at most
    :data:`MAX_STORED_UPDATES`."""
    updates = sorted(updates, key=lambda u: (not u["security"], u["name"].casefold()))
    return updates[:MAX_STORED_UPDATES]


def _sysmanage_update(item: Mapping[str, object]) -> PendingUpdate:
    update: PendingUpdate = {
        "name": _text(item.get("package_name"), NAME_LIMIT),
        "current": _text(item.get("current_version"), VERSION_LIMIT),
        "available": _text(item.get("available_version"), VERSION_LIMIT),
        "security": _flag(item.get("is_security_update")),
    }
    manager = _text(item.get("package_manager"), MANAGER_LIMIT)
    if manager:
        update["manager"] = manager
    return update


def updates_from_sysmanage(data: Mapping[str, object]) -> PatchUpdates:
    """A SysManage agent's ``package_updates_update``: ``available_updates`` (each with
    ``package_name``, ``current_version``, ``available_version``,
    ``is_security_update``), or only its totals (``total_updates``,
    ``security_updates``)."""
    listed = data.get("available_updates")
    if not isinstance(listed, list):
        total, security = data.get("total_updates"), data.get("security_updates")
        return PatchUpdates([], _count(total), _count(security))
    rows = [_sysmanage_update(item) for item in listed if isinstance(item, dict)]
    rows = [row for row in rows if row["name"]]
    return PatchUpdates(sorted_updates(rows), len(rows), sum(row["security"] for row in rows))


def reboot_from_sysmanage(data: Mapping[str, object]) -> bool | None:
    """A SysManage agent's ``reboot_status_update``: ``reboot_required`` (None when the
    report does not carry it)."""
    value = data.get("reboot_required")
    return None if value is None else _flag(value)


def _invalid(why: str, id_: MessageId) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_MESSAGE, why, id_=id_)


def _native_update(item: object, id_: MessageId) -> PendingUpdate:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
        raise _invalid("each of 'updates' must be an object with a 'name'", id_)
    return {
        "name": _text(item["name"], NAME_LIMIT),
        "current": _text(item.get("current"), VERSION_LIMIT),
        "available": _text(item.get("available"), VERSION_LIMIT),
        "security": item.get("security") is True,
    }


def updates_from_native(data: Mapping[str, object], id_: MessageId) -> PatchUpdates | None:
    """The updates of a ``patch_status`` (None when it reports none: ``updates`` null or
    absent, for an agent that cannot list them)."""
    listed = data.get("updates")
    if listed is None:
        return None
    if not isinstance(listed, list):
        raise _invalid("'updates' must be a list or null", id_)
    rows = [_native_update(item, id_) for item in listed[:MAX_STORED_UPDATES]]
    count, security = data.get("update_count"), data.get("security_count")
    counted = _count(count) if count is not None else len(rows)
    secure = _count(security) if security is not None else sum(r["security"] for r in rows)
    if counted is None or secure is None:
        raise _invalid("'update_count' and 'security_count' must be non-negative integers", id_)
    return PatchUpdates(sorted_updates(rows), counted, secure)


def reboot_from_native(data: Mapping[str, object], id_: MessageId) -> bool | None:
    """The ``reboot_required`` of a ``patch_status`` (None: the agent cannot tell)."""
    value = data.get("reboot_required")
    if value is not None and not isinstance(value, bool):
        raise _invalid("'reboot_required' must be true, false or null", id_)
    return value
