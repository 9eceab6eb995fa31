"""Reads of hosts, command executions and package operations."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from typing import Any, NamedTuple, TypedDict

from django.conf import settings
from django.db.models import Count, F, Max, Q, QuerySet
from django.db.models.functions import Length, Substr
from django.utils import timezone

from hosts.certificates import days_left
from hosts.events import command_event, operation_event
from hosts.fleetruns import fleet_run_data
from hosts.models import (
    AgentRegistration,
    CommandExecution,
    FleetRun,
    Host,
    HostCertificate,
    HostGroup,
    HostGroupGrant,
    HostInventory,
    HostPatchStatus,
    HostStatus,
    InventoryKind,
    MetricSample,
    PackageOperation,
    RegistrationStatus,
)
from hosts.patching import PendingUpdate
from hosts.tokens import token_digest
from sysmanage import permissions
from sysmanage.permissions import HostScope
from sysmanage.protocol import iso
from sysmanage.topics import NOBODY, TOPICS, Filters, Viewer, snapshot_list

#: How many rows of each inventory list a host's page shows at most.
INVENTORY_STORAGE_ROWS = 100
INVENTORY_UPDATE_ROWS = 200
INVENTORY_PACKAGE_ROWS = 500
MIB = 1024 * 1024
MAX_NUMBER = 2**64


def granted_host_ids(user: Any, flag: str | None) -> QuerySet[Any]:
    """The ids of the hosts in the groups granted to ``user``, directly or through their
    Django groups, by grants with ``flag`` set (None: any grant); none without a user
    (``sysmanage.permissions.scope_query``)."""
    if user is None:
        return Host.objects.none().values_list("id", flat=True)
    grants = HostGroupGrant.objects.filter(Q(user=user) | Q(group__user=user))
    if flag:
        grants = grants.filter(**{flag: True})
    return Host.objects.filter(groups__grants__in=grants).values_list("id", flat=True).distinct()


def within(rows: QuerySet[Any], scope: HostScope, field: str = "host_id") -> QuerySet[Any]:
    """``rows`` narrowed to the hosts of ``scope`` (None: unchanged)."""
    return rows if scope is None else rows.filter(**{f"{field}__in": scope})


def host_list(
    *,
    search: str | None = None,
    status: str | None = None,
    group: str | None = None,
    visible: Any = None,
) -> QuerySet[Host]:
    """Hosts with their groups, optionally narrowed by a hostname/FQDN search, a status
    and the name of a group they are in (in any case); only those in ``visible`` (a query
    of host ids, from ``sysmanage.permissions.scope_query``) unless it is None."""
    hosts = Host.objects.all() if visible is None else Host.objects.filter(id__in=visible)
    if search:
        hosts = hosts.filter(hostname__icontains=search) | hosts.filter(fqdn__icontains=search)
    if status:
        hosts = hosts.filter(status=status)
    if group:
        # Names are unique without regard to case: one group at most, no duplicate rows.
        hosts = hosts.filter(groups__name__iexact=group)
    return hosts.prefetch_related("groups").order_by("hostname")


def host_group_list(visible: Any = None) -> QuerySet[HostGroup]:
    """Host groups by name, each with its ``host_count``: of the hosts in ``visible`` (a
    query of host ids) unless it is None."""
    counted = Count("hosts") if visible is None else Count("hosts", filter=Q(hosts__in=visible))
    return HostGroup.objects.annotate(host_count=counted).order_by("name")


class HostStatusRow(TypedDict):
    """One host on the ``host_status`` channel."""

    host_id: str
    hostname: str
    status: str
    last_seen: str | None


class MetricMinute(TypedDict):
    """One minute of a host's metrics history (disks and load as last reported)."""

    minute: str | None
    samples: int
    cpu_usage: float | None
    memory_usage: float | None
    disk_usage: dict[str, float]
    load_average: list[float]


def host_status_row(host: Host) -> HostStatusRow:
    """One host as the ``host_status`` channel shows it."""
    return {
        "host_id": str(host.id),
        "hostname": host.hostname,
        "status": host.status,
        "last_seen": iso(host.last_seen),
    }


def host_status_snapshot(filters: Filters, viewer: Viewer = NOBODY) -> dict[str, Any]:
    """Current status of every host ``viewer`` sees (or the one in ``filters``), for new
    subscribers."""
    hosts = within(Host.objects.all(), viewer.scope, "id").order_by("hostname")
    if filters.get("host_id"):
        hosts = hosts.filter(id=filters["host_id"])
    return {"hosts": [host_status_row(h) for h in hosts]}


def command_snapshot(filters: Filters, viewer: Viewer = NOBODY) -> dict[str, Any]:
    """The ``command_execution`` snapshot: the commands pending or running (on the
    ``host_id`` of ``filters``, if any), newest first, each as its ``command_execution``
    event shows it to ``viewer``: text and output so far only for the requester and
    holders of ``hosts.view_command_output`` (``sysmanage.topics.snapshot_list``)."""
    rows = (
        CommandExecution.objects.select_related("host", "requested_by")
        .filter(status__in=CommandExecution.ACTIVE_STATUSES)
        .order_by("-created_at")
    )
    if filters.get("host_id"):
        rows = rows.filter(host_id=filters["host_id"])
    if filters.get("run_id"):
        rows = rows.filter(request_id=f"fleet-run:{filters['run_id']}")
    snapshot = snapshot_list(
        "command_execution",
        "commands",
        within(rows, viewer.scope),
        lambda execution: command_event(execution).data(),
        filters,
        viewer,
    )
    if filters.get("run_id"):
        snapshot["fleet_run"] = fleet_run_snapshot(filters, viewer)
    return snapshot


def fleet_run_snapshot(filters: Filters, viewer: Viewer) -> dict[str, Any] | None:
    """The fleet run of ``filters`` as it is now (its counts, no host results), as its
    ``fleet_run.progress`` events show it to ``viewer``; None if there is none."""
    run = FleetRun.objects.select_related("requested_by").filter(id=filters["run_id"]).first()
    if run is None or not permissions.sees_fleet_run(
        scope=viewer.scope, user_id=viewer.user_id, requested_by_id=run.requested_by_id
    ):
        return None
    data = fleet_run_data(run)
    data["requested_by_id"] = str(run.requested_by_id) if run.requested_by_id else None
    return TOPICS["command_execution"].present(filters, viewer, data)


def fleet_run_id_problem(run_id: str, user: Any = None) -> str | None:
    """Why ``run_id`` is not a filter for ``user`` to subscribe with (no such run, or
    one they do not see: answered alike), or None."""
    runs = permissions.fleet_runs_visible(FleetRun.objects.filter(id=run_id), user)
    return None if runs.exists() else "no such fleet run"


def operation_snapshot(filters: Filters, viewer: Viewer = NOBODY) -> dict[str, Any]:
    """The ``package_operations`` snapshot: the operations pending or in progress on the
    host of ``filters``, newest first, each as its ``package_operations`` event shows it
    (progress and message; like the events, no output)."""
    rows = (
        PackageOperation.objects.select_related("host")
        .defer("output")
        .filter(host_id=filters["host_id"], status__in=PackageOperation.ACTIVE_STATUSES)
        .order_by("-created_at")
    )
    rows = within(rows, viewer.scope)
    return snapshot_list(
        "package_operations",
        "operations",
        rows,
        lambda operation: operation_event(operation).data(),
        filters,
        viewer,
    )


def host_id_problem(host_id: str, user: Any = None) -> str | None:
    """Why ``host_id`` cannot be used as a filter (no such host), or None."""
    return None if Host.objects.filter(id=host_id).exists() else f"no host with id {host_id}"


def host_counts(scope: HostScope = None) -> dict[str, int]:
    """Total and online host counts (of the hosts in ``scope``; None: all);
    ``offline_hosts`` counts every host not online (as the protocol defines it),
    ``unknown_hosts`` those of them never heard from."""
    counts = within(Host.objects.all(), scope, "id").aggregate(
        total=Count("id"),
        online=Count("id", filter=Q(status=HostStatus.ONLINE)),
        unknown=Count("id", filter=Q(status=HostStatus.UNKNOWN)),
    )
    total, online = counts["total"], counts["online"]
    return {
        "total_hosts": total,
        "online_hosts": online,
        "offline_hosts": total - online,
        "unknown_hosts": counts["unknown"],
    }


def host_status_counts() -> dict[str, int]:
    """Hosts per status; every status is present."""
    found = dict(Host.objects.values_list("status").annotate(n=Count("id")).order_by())
    return {status: found.get(status, 0) for status in HostStatus.values}


def pending_operation_count(scope: HostScope = None) -> int:
    """Command executions and package operations not yet finished (on the hosts in
    ``scope``; None: all)."""
    commands = CommandExecution.objects.filter(status__in=CommandExecution.ACTIVE_STATUSES)
    operations = PackageOperation.objects.filter(status__in=PackageOperation.ACTIVE_STATUSES)
    return within(commands, scope).count() + within(operations, scope).count()


def host_for_token(token: str) -> Host | None:
    """The host whose current agent token is ``token``, if any."""
    if not token:
        return None
    return Host.objects.filter(token_hash=token_digest(token)).first()


def hosts_for_tokens(tokens: Collection[str]) -> dict[str, Host]:
    """The hosts whose current agent token is one of ``tokens``, by token (one query)."""
    digests = {token_digest(token): token for token in tokens if token}
    if not digests:
        return {}
    return {digests[h.token_hash]: h for h in Host.objects.filter(token_hash__in=digests)}


def metric_history(
    host_id: str, *, since: datetime, until: datetime | None = None
) -> list[MetricMinute]:
    """A host's per-minute metrics of the minutes starting from ``since`` up to ``until``
    (when given), oldest first."""
    rows = MetricSample.objects.filter(host_id=host_id, minute__gte=since)
    if until is not None:
        rows = rows.filter(minute__lte=until)
    rows = rows.order_by("minute")
    return [
        {
            "minute": iso(r.minute),
            "samples": r.samples,
            "cpu_usage": r.cpu_usage,
            "memory_usage": r.memory_usage,
            "disk_usage": r.disk_usage,
            "load_average": r.load_average,
        }
        for r in rows
    ]


def operation_event_data(operation_id: Any) -> dict[str, Any]:
    """A package operation as its ``package_operations`` events show it."""
    operation = PackageOperation.objects.select_related("host").get(id=operation_id)
    return operation_event(operation).data()


def command_event_data(execution_id: Any) -> dict[str, Any]:
    """An execution as its ``command_execution`` events show it."""
    execution = CommandExecution.objects.select_related("host", "requested_by").get(id=execution_id)
    return command_event(execution).data()


#: Characters of each output a list item shows; the detail endpoint has the whole.
LIST_PREVIEW_CHARS = 200
#: Characters of a command's ``error`` a list item shows.
LIST_ERROR_CHARS = 1000


def command_list(*, host_id: Any = None, status: str | None = None) -> QuerySet[CommandExecution]:
    """Command executions, newest first, without their outputs: each carries
    ``stdout_length``/``stderr_length`` and ``stdout_preview``/``stderr_preview``, and
    ``error_text``, its error cut short.  Outputs run to 512 Ki characters each; a page
    of them was hundreds of megabytes, read from the database whole."""
    rows = (
        CommandExecution.objects.select_related("host", "requested_by")
        .defer("stdout", "stderr", "error")
        .annotate(
            stdout_length=Length("stdout"),
            stderr_length=Length("stderr"),
            stdout_preview=Substr("stdout", 1, LIST_PREVIEW_CHARS),
            stderr_preview=Substr("stderr", 1, LIST_PREVIEW_CHARS),
            error_text=Substr("error", 1, LIST_ERROR_CHARS),
        )
    )
    if host_id is not None:
        rows = rows.filter(host_id=host_id)
    if status:
        rows = rows.filter(status=status)
    return rows


def package_operation_list(
    *, host_id: Any = None, status: str | None = None
) -> QuerySet[PackageOperation]:
    """Package operations, newest first, without their output: each carries
    ``output_length`` and ``output_preview`` instead."""
    rows = (
        PackageOperation.objects.select_related("host", "requested_by")
        .defer("output")
        .annotate(
            output_length=Length("output"), output_preview=Substr("output", 1, LIST_PREVIEW_CHARS)
        )
    )
    if host_id is not None:
        rows = rows.filter(host_id=host_id)
    if status:
        rows = rows.filter(status=status)
    return rows


def registration_pending_count() -> int:
    """How many SysManage agent registrations are waiting for approval."""
    return AgentRegistration.objects.filter(status=RegistrationStatus.PENDING).count()


# -- inventory, as a host's page shows it ----------------------------------------------------
#
# The reports come from SysManage agents as they sent them: any field may be missing or of
# another type, so every value goes through one of these coercions and the shapers return
# only strings, non-negative numbers, booleans and lists of such dicts.

#: A stored report (a JSON object as the agent sent it), or an object inside one.
Report = Mapping[str, object]


def _text(value: object, limit: int = 200) -> str:
    """``value`` as display text (strings and numbers only), or ``""``."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return ""
    return str(value).strip()[:limit]


def _number(value: object) -> float | None:
    """``value`` as a non-negative number below 2**64 (numeric strings too), or None."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    # The bound keeps absurd values from overflowing the arithmetic and the size filters;
    # NaN and the infinities fail the comparison too.
    return value if 0 <= value < MAX_NUMBER else None


def _count(value: object) -> int | None:
    """``value`` as a whole non-negative number, or None."""
    number = _number(value)
    return int(number) if number is not None else None


def _flag(value: object) -> bool:
    """Whether ``value`` says yes (``True``, ``1``, ``"true"``, ``"yes"``)."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1")
    return value is True or (isinstance(value, int) and value == 1)


def _object(value: object) -> Mapping[str, object]:
    """``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def _dicts(value: object) -> list[Mapping[str, object]]:
    """The dicts in ``value`` if it is a list; anything else is no items."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _listed(data: Report, key: str, total_key: str) -> int | None:
    """How many items a report lists: the list's length, else its reported total."""
    items = data.get(key)
    return len(items) if isinstance(items, list) else _count(data.get(total_key))


class OsInventory(TypedDict):
    """The ``os`` report as a host's page shows it."""

    name: str
    version: str
    codename: str
    kernel: str
    architecture: str
    timezone: str


class StorageRow(TypedDict):
    """One storage device; sizes in bytes."""

    name: str
    mount_point: str
    file_system: str
    total: int | None
    used: int | None
    used_percent: int | None


class HardwareInventory(TypedDict):
    """The ``hardware`` report as a host's page shows it; memory in bytes."""

    cpu_model: str
    cpu_vendor: str
    cpu_cores: int | None
    cpu_threads: int | None
    cpu_mhz: int | None
    memory_total: int | None
    memory_available: int | None
    storage: list[StorageRow]
    storage_more: int
    interfaces: list[str]


class UpdateRow(TypedDict):
    """One available update."""

    name: str
    current: str
    available: str
    manager: str
    security: bool


class UpdatesInventory(TypedDict):
    """The ``updates`` report as a host's page shows it."""

    count: int | None
    security_count: int | None
    rows: list[UpdateRow]
    listed: int
    more: int


class PackageRow(TypedDict):
    """One installed package."""

    name: str
    version: str
    manager: str


class SoftwareInventory(TypedDict):
    """The ``software`` report as a host's page shows it."""

    count: int | None
    rows: list[PackageRow]
    listed: int
    more: int


class UserRow(TypedDict):
    """One account of the ``users`` report."""

    name: str
    uid: int | None
    shell: str
    home: str
    groups: list[str]


class GroupRow(TypedDict):
    """One group of the ``users`` report."""

    name: str
    gid: int | None
    system: bool


class UsersInventory(TypedDict):
    """The ``users`` report as a host's page shows it: regular accounts apart from
    system ones, each list by uid (groups by gid)."""

    count: int
    regular: list[UserRow]
    system: list[UserRow]
    not_kept: int
    groups: list[GroupRow]
    system_group_count: int
    groups_not_kept: int


class ServiceRow(TypedDict):
    """One role of the ``services`` report; ``tone`` is how its status reads (``good``
    running, ``warn`` stopped, ``neutral`` anything else)."""

    role: str
    package: str
    version: str
    service: str
    status: str
    tone: str


class ServicesInventory(TypedDict):
    """The ``services`` report as a host's page shows it, by role."""

    rows: list[ServiceRow]
    running: int
    not_kept: int


InventoryReport = (
    OsInventory
    | HardwareInventory
    | UpdatesInventory
    | SoftwareInventory
    | UsersInventory
    | ServicesInventory
)


def inventory_os(data: Report) -> OsInventory:
    """The ``os`` report: distribution, kernel, architecture, time zone."""
    info = _object(data.get("os_info"))
    return {
        "name": _text(info.get("distribution")) or _text(data.get("platform")),
        "version": _text(info.get("distribution_version")),
        "codename": _text(info.get("distribution_codename")),
        "kernel": _text(data.get("platform_release")),
        "architecture": (
            _text(data.get("machine_architecture")) or _text(data.get("architecture"))
        ),
        "timezone": _text(data.get("timezone")),
    }


def _storage_row(device: Report) -> StorageRow:
    """One storage device; sizes in bytes, use in whole percent when both sizes are known."""
    total = _count(device.get("total_size"))
    used = _count(device.get("used_size"))
    percent = round(min(used, total) * 100 / total) if total and used is not None else None
    return {
        "name": _text(device.get("name")),
        "mount_point": _text(device.get("mount_point"), 255),
        "file_system": _text(device.get("file_system"), 50),
        "total": total,
        "used": used,
        "used_percent": percent,
    }


def inventory_hardware(data: Report) -> HardwareInventory:
    """The ``hardware`` report: CPU, memory (in bytes), storage devices, interface names."""
    devices = _dicts(data.get("storage_devices"))
    memory_total = _number(data.get("memory_total_mb"))
    memory_available = _number(data.get("memory_available_mb"))
    interfaces = (_text(i.get("name"), 100) for i in _dicts(data.get("network_interfaces")))
    return {
        "cpu_model": _text(data.get("cpu_model")),
        "cpu_vendor": _text(data.get("cpu_vendor")),
        "cpu_cores": _count(data.get("cpu_cores")),
        "cpu_threads": _count(data.get("cpu_threads")),
        "cpu_mhz": _count(data.get("cpu_frequency_mhz")),
        "memory_total": int(memory_total * MIB) if memory_total is not None else None,
        "memory_available": (int(memory_available * MIB) if memory_available is not None else None),
        "storage": [_storage_row(d) for d in devices[:INVENTORY_STORAGE_ROWS]],
        "storage_more": max(len(devices) - INVENTORY_STORAGE_ROWS, 0),
        "interfaces": [name for name in interfaces if name],
    }


def _update_row(item: Report) -> UpdateRow:
    return {
        "name": _text(item.get("package_name"), 255),
        "current": _text(item.get("current_version")),
        "available": _text(item.get("available_version")),
        "manager": _text(item.get("package_manager"), 50),
        "security": _flag(item.get("is_security_update")),
    }


def inventory_updates(data: Report, *, limit: int = INVENTORY_UPDATE_ROWS) -> UpdatesInventory:
    """The ``updates`` report: counts, and up to ``limit`` rows, security updates first."""
    rows = [row for row in map(_update_row, _dicts(data.get("available_updates"))) if row["name"]]
    rows.sort(key=lambda row: (not row["security"], row["name"].casefold()))
    # With a list, the counts are those of the rows shown; without, the agent's own.
    security: int | None
    if isinstance(data.get("available_updates"), list):
        security = sum(row["security"] for row in rows)
    else:
        security = _count(data.get("security_updates"))
    return {
        "count": _listed(data, "available_updates", "total_updates"),
        "security_count": security,
        "rows": rows[:limit],
        "listed": len(rows),
        "more": max(len(rows) - limit, 0),
    }


def inventory_software(data: Report, *, limit: int = INVENTORY_PACKAGE_ROWS) -> SoftwareInventory:
    """The ``software`` report: how many packages, and the first ``limit`` by name."""
    rows: list[PackageRow] = [
        {
            "name": _text(item.get("package_name"), 255),
            "version": _text(item.get("version")),
            "manager": _text(item.get("package_manager"), 50),
        }
        for item in _dicts(data.get("software_packages"))
    ]
    rows = sorted(
        (row for row in rows if row["name"]),
        key=lambda row: (row["name"].casefold(), row["version"]),
    )
    return {
        "count": _listed(data, "software_packages", "total_packages"),
        "rows": rows[:limit],
        "listed": len(rows),
        "more": max(len(rows) - limit, 0),
    }


def _by_id(key: str) -> Callable[[Mapping[str, Any]], tuple[bool, int, str]]:
    """Order by the number under ``key`` (none last), then by name."""

    def order(row: Mapping[str, Any]) -> tuple[bool, int, str]:
        number = row[key]
        return (number is None, number or 0, str(row["name"]).casefold())

    return order


def inventory_users(data: Report) -> UsersInventory:
    """The ``users`` report (stored as :func:`hosts.smagent.inventory.users_report`
    keeps it): regular and system accounts, and the groups."""
    regular: list[UserRow] = []
    system: list[UserRow] = []
    for item in _dicts(data.get("users")):
        member_of = item.get("groups")
        row: UserRow = {
            "name": _text(item.get("username"), 128),
            "uid": _count(item.get("uid")),
            "shell": _text(item.get("shell"), 255),
            "home": _text(item.get("home_directory"), 255),
            "groups": [_text(g, 128) for g in member_of if _text(g)]
            if isinstance(member_of, list)
            else [],
        }
        if row["name"]:
            (system if _flag(item.get("is_system_user")) else regular).append(row)
    groups: list[GroupRow] = [
        {
            "name": _text(item.get("group_name"), 128),
            "gid": _count(item.get("gid")),
            "system": _flag(item.get("is_system_group")),
        }
        for item in _dicts(data.get("groups"))
    ]
    groups = sorted((g for g in groups if g["name"]), key=_by_id("gid"))
    return {
        "count": len(regular) + len(system),
        "regular": sorted(regular, key=_by_id("uid")),
        "system": sorted(system, key=_by_id("uid")),
        "not_kept": _count(data.get("users_not_kept")) or 0,
        "groups": groups,
        "system_group_count": sum(g["system"] for g in groups),
        "groups_not_kept": _count(data.get("groups_not_kept")) or 0,
    }


#: How a service's status reads on the host page.
SERVICE_TONES = {"running": "good", "stopped": "warn"}


def inventory_services(data: Report) -> ServicesInventory:
    """The ``services`` report (stored as :func:`hosts.smagent.inventory.services_report`
    keeps it): each role's package, service and status, by role."""
    rows: list[ServiceRow] = []
    for item in _dicts(data.get("roles")):
        status = _text(item.get("service_status"), 32).lower()
        row: ServiceRow = {
            "role": _text(item.get("role"), 128),
            "package": _text(item.get("package_name"), 255),
            "version": _text(item.get("package_version"), 100),
            "service": _text(item.get("service_name"), 255),
            "status": status,
            "tone": SERVICE_TONES.get(status, "neutral"),
        }
        if row["role"] or row["package"]:
            rows.append(row)
    rows.sort(key=lambda r: (r["role"].casefold(), r["package"].casefold()))
    return {
        "rows": rows,
        "running": sum(row["status"] == "running" for row in rows),
        "not_kept": _count(data.get("roles_not_kept")) or 0,
    }


INVENTORY_SHAPERS: dict[str, Callable[[Report], InventoryReport]] = {
    InventoryKind.OS: inventory_os,
    InventoryKind.HARDWARE: inventory_hardware,
    InventoryKind.UPDATES: inventory_updates,
    InventoryKind.SOFTWARE: inventory_software,
    InventoryKind.USERS: inventory_users,
    InventoryKind.SERVICES: inventory_services,
}


def inventory_view(rows: list[HostInventory]) -> dict[str, dict[str, object]]:
    """Inventory rows as plain dicts by kind, each with its ``updated_at``; kinds not
    reported are left out, so an empty dict means no inventory at all."""
    view: dict[str, dict[str, object]] = {}
    for row in rows:
        shape = INVENTORY_SHAPERS.get(row.kind)
        if shape is not None:
            data = row.data if isinstance(row.data, dict) else {}
            view[row.kind] = {**shape(data), "updated_at": row.updated_at}
    return view


def host_inventory_view(host_id: Any) -> dict[str, dict[str, object]]:
    """A host's latest inventory as its page shows it (see :func:`inventory_view`)."""
    return inventory_view(list(HostInventory.objects.filter(host_id=host_id)))


# -- pending updates and reboots ---------------------------------------------------------


class PatchView(TypedDict):
    """A host's pending updates and reboot state, as its page and the REST API show
    them; ``None`` where the agent did not report."""

    update_count: int | None
    security_count: int | None
    updates: list[PendingUpdate]
    updates_reported_at: str | None
    reboot_required: bool | None
    reboot_required_since: str | None
    reboot_reported_at: str | None


def host_patch_view(host_id: Any) -> PatchView:
    """A host's pending updates and whether it needs a reboot."""
    row = HostPatchStatus.objects.filter(host_id=host_id).first()
    if row is None:
        row = HostPatchStatus(host_id=host_id)
    return {
        "update_count": row.update_count,
        "security_count": row.security_count,
        "updates": row.updates if isinstance(row.updates, list) else [],
        "updates_reported_at": iso(row.updates_reported_at),
        "reboot_required": row.reboot_required,
        "reboot_required_since": iso(row.reboot_required_since),
        "reboot_reported_at": iso(row.reboot_reported_at),
    }


def patch_counts(scope: HostScope = None) -> dict[str, int]:
    """Hosts with at least one pending security update, and hosts needing a reboot (of
    the hosts in ``scope``; None: all)."""
    counts = within(HostPatchStatus.objects.all(), scope).aggregate(
        security=Count("host_id", filter=Q(security_count__gt=0)),
        reboot=Count("host_id", filter=Q(reboot_required=True)),
    )
    return {
        "hosts_with_security_updates": counts["security"],
        "hosts_needing_reboot": counts["reboot"],
    }


class RebootWaiting(NamedTuple):
    """A host that needs a reboot, and since when."""

    host_id: Any
    hostname: str
    since: datetime


def hosts_needing_reboot() -> list[RebootWaiting]:
    """The hosts whose agent last reported that they need a reboot."""
    rows = HostPatchStatus.objects.filter(
        reboot_required=True, reboot_required_since__isnull=False
    ).values_list("host_id", "host__hostname", "reboot_required_since")
    return [
        RebootWaiting(host_id, hostname, since)
        for host_id, hostname, since in rows
        if since is not None
    ]


# -- certificates ----------------------------------------------------------------------------


class CertificateRow(TypedDict):
    """One certificate as the host page and the REST API show it."""

    file_path: str
    name: str
    subject: str
    issuer: str
    serial_number: str
    fingerprint_sha256: str
    not_before: str | None
    not_after: str | None
    days_left: int | None
    expired: bool
    expiring: bool
    is_ca: bool
    key_usage: str


class CertificatesView(TypedDict):
    """A host's certificates: counts, then the certificates that are not CA certificates
    (soonest expiry first, those without an expiry last), then the CA certificates."""

    reported_at: str | None
    warning_days: int
    total: int
    expiring: int
    expired: int
    ca_count: int
    certificates: list[CertificateRow]
    ca_certificates: list[CertificateRow]


def _certificate_row(row: HostCertificate, now: datetime, warning_days: int) -> CertificateRow:
    left = days_left(row.not_after, now) if row.not_after is not None else None
    expired = left is not None and left < 0
    return {
        "file_path": row.file_path,
        "name": row.name,
        "subject": row.subject,
        "issuer": row.issuer,
        "serial_number": row.serial_number,
        "fingerprint_sha256": row.fingerprint_sha256,
        "not_before": iso(row.not_before),
        "not_after": iso(row.not_after),
        "days_left": None if left is None else int(left),  # whole days, toward zero
        "expired": expired,
        "expiring": left is not None and not expired and left <= warning_days,
        "is_ca": row.is_ca,
        "key_usage": row.key_usage,
    }


def host_certificates_view(host_id: Any) -> CertificatesView:
    """The certificates a host's agent last reported (``HOST_CERTIFICATE_WARNING_DAYS``
    decides which count as expiring)."""
    now = timezone.now()
    warning_days = settings.HOST_CERTIFICATE_WARNING_DAYS
    rows = [
        _certificate_row(row, now, warning_days)
        for row in HostCertificate.objects.filter(host_id=host_id).order_by(
            F("not_after").asc(nulls_last=True), "file_path"
        )
    ]
    reported = HostCertificate.objects.filter(host_id=host_id).aggregate(at=Max("reported_at"))
    return {
        "reported_at": iso(reported["at"]),
        "warning_days": warning_days,
        "total": len(rows),
        "expiring": sum(r["expiring"] for r in rows),
        "expired": sum(r["expired"] for r in rows),
        "ca_count": sum(r["is_ca"] for r in rows),
        "certificates": [r for r in rows if not r["is_ca"]],
        "ca_certificates": [r for r in rows if r["is_ca"]],
    }


class CertificateDue(NamedTuple):
    """A certificate (not a CA certificate) that expires soon, or has expired."""

    host_id: Any
    hostname: str
    file_path: str
    name: str
    not_after: datetime


def certificates_expiring(before: datetime) -> list[CertificateDue]:
    """The certificates, other than CA certificates, of every host that expire before
    ``before`` (expired ones included)."""
    rows = HostCertificate.objects.filter(is_ca=False, not_after__lt=before).values_list(
        "host_id", "host__hostname", "file_path", "name", "not_after"
    )
    return [
        CertificateDue(host_id, hostname, path, name, not_after)
        for host_id, hostname, path, name, not_after in rows
        if not_after is not None
    ]
