"""
Fleet runs: one shell command or package operation on many hosts (the hosts of groups,
a list of hosts, or both), in batches, stopped when too many fail; the requests,
records and reads of them.

The run itself is driven by :mod:`hosts.fleetrunner`; this module validates what was
asked (:func:`parse_fleet_run`), checks that the user may run commands on every targeted
host, records the run with one row per host (:func:`fleet_run_create`), records how each
host went, and marks runs whose process stopped as interrupted
(:func:`fleet_runs_interrupt_stale`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from hosts import patchapply
from hosts.models import (
    PACKAGE_CHANGES,
    FleetRun,
    FleetRunHost,
    FleetRunHostStatus,
    FleetRunKind,
    FleetRunState,
    Host,
    HostGroup,
    PackageOperationKind,
    is_package_name,
)
from sysmanage import permissions
from sysmanage.audit import Actor, audit
from sysmanage.protocol import iso
from sysmanage.topics import parse_uuid

MAX_COMMAND_LENGTH = 4096
MAX_TIMEOUT = 3600
#: Seconds each host may take unless the request says: a command's, a package operation's.
DEFAULT_TIMEOUT: dict[str, int] = {
    FleetRunKind.COMMAND: 30,
    FleetRunKind.PACKAGE: 600,
    FleetRunKind.PATCH: 1800,
    # from the request to the host's return
    FleetRunKind.REBOOT: 900,
}
#: The right a run of each kind needs on every host it targets (:func:`run_right`).
KIND_RIGHTS: dict[str, str] = {
    FleetRunKind.COMMAND: "run_command",
    FleetRunKind.PACKAGE: "run_package_operation",
    FleetRunKind.PATCH: "patch_reboot",
    FleetRunKind.REBOOT: "patch_reboot",
}
#: How a refusal names each right.
REFUSED_WHAT = {
    "run_package_operation": "run package operations",
    "patch_reboot": "apply updates and reboot",
}
#: The kinds whose hosts each run a package operation (rather than a shell command).
OPERATION_KINDS = (FleetRunKind.PACKAGE, FleetRunKind.PATCH, FleetRunKind.REBOOT)
#: The most hosts one run may target, and the largest batch.
MAX_HOSTS = 10000
MAX_BATCH = 500
#: Offline hosts: ``skip`` them at their turn, or ``wait`` for them to return.
OFFLINE_POLICIES = ("skip", "wait")
#: The longest a run waits for its offline hosts (a day).
MAX_OFFLINE_WAIT = 86400
FINAL_HOST_STATUSES = (
    FleetRunHostStatus.SUCCEEDED,
    FleetRunHostStatus.FAILED,
    FleetRunHostStatus.SKIPPED,
)


class FleetRunRefused(Exception):
    """The user may not run the run's kind of work on some targeted hosts (``refused``
    of them)."""

    def __init__(self, refused: int, total: int, what: str = "run commands") -> None:
        super().__init__(
            f"You do not have permission to {what} on {refused} of the {total} targeted hosts"
        )
        self.refused = refused
        self.total = total


class FleetRunLimitReached(Exception):
    """The user already has ``limit`` runs running (``FLEET_RUNS_MAX_RUNNING_PER_USER``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"You already have the most fleet runs running at once ({limit}); "
            "start this one once one of them has ended"
        )
        self.limit = limit


def run_right(kind: str) -> str:
    """The right (``sysmanage.permissions.HOST_RIGHTS``) a run of ``kind`` needs on each
    of its hosts: a package run that of package operations, as one operation does; a
    patch or reboot run that of applying updates and rebooting."""
    return KIND_RIGHTS.get(kind, "run_command")


@dataclass(frozen=True)
class FleetRunSpec:
    """A validated fleet run request: a shell command, or (``kind`` ``package``) a
    package operation, whose ``command`` reads ``<operation> <package>``."""

    command: str
    kind: str = FleetRunKind.COMMAND
    operation: str = ""
    package: str = ""
    groups: tuple[str, ...] = ()
    host_ids: tuple[str, ...] = ()
    #: hosts matching every one of these (``FILTER_FIELDS``), besides the groups and ids
    filter: dict[str, str] = field(default_factory=dict)
    timeout: int = 30
    batch_size: int = 5
    #: stop once this many hosts failed (or this percent of them, with ``percent``)
    failure_limit: int | None = None
    percent: bool = False
    offline: str = "skip"
    offline_wait: int = 600
    target: dict[str, Any] = field(default_factory=dict)


def _number(data: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"'{key}' must be a number from {low} to {high}")
    return int(value)


def _failure_limit(value: Any) -> tuple[int | None, bool]:
    """``failure_limit``: a count of hosts (at least 1) or a percent string (``"20%"``)."""
    if value is None:
        return None, False
    if isinstance(value, str) and value.endswith("%"):
        try:
            percent = float(value[:-1])
        except ValueError:
            percent = -1
        if not 0 < percent <= 100 or percent != int(percent):
            raise ValueError("'failure_limit' as a percent must be from '1%' to '100%'")
        return int(percent), True
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("'failure_limit' must be a number of hosts (1 or more) or a percent")
    return value, False


#: Filters a run's ``targets.filter`` may hold: each a substring (any case) of the hosts'.
FILTER_FIELDS = {"search": ("hostname", "fqdn"), "os": ("os_name",)}


def _filter(value: Any) -> dict[str, str]:
    """``targets.filter``: ``search`` (hostname or FQDN) and/or ``os`` (OS name)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not value or set(value) - set(FILTER_FIELDS):
        raise ValueError("'targets.filter' must be an object with 'search' and/or 'os'")
    for key, text in value.items():
        if not isinstance(text, str) or not text.strip() or len(text) > 255:
            raise ValueError(f"'targets.filter.{key}' must be a non-empty string")
    return {key: text.strip() for key, text in value.items()}


def _targets(data: Mapping[str, Any]) -> dict[str, Any]:
    """``targets``: ``groups`` (names), ``host_ids`` and ``filter``, cleaned."""
    targets = data.get("targets")
    if not isinstance(targets, dict) or set(targets) - {"groups", "host_ids", "filter"}:
        raise ValueError("'targets' must be an object with 'groups', 'host_ids' and/or 'filter'")
    groups, host_ids = targets.get("groups", []), targets.get("host_ids", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) and g.strip() for g in groups):
        raise ValueError("'targets.groups' must be a list of group names")
    if not isinstance(host_ids, list) or len(host_ids) > MAX_HOSTS:
        raise ValueError(f"'targets.host_ids' must be a list of at most {MAX_HOSTS} host ids")
    try:
        ids = list(dict.fromkeys(parse_uuid(h) for h in host_ids))
    except ValueError as exc:
        raise ValueError(f"'targets.host_ids': {exc}") from None
    matching = _filter(targets.get("filter"))
    if not groups and not ids and not matching:
        raise ValueError("'targets' names no group, no host and no filter")
    cleaned: dict[str, Any] = {
        "groups": list(dict.fromkeys(g.strip() for g in groups)),
        "host_ids": ids,
    }
    if matching:
        cleaned["filter"] = matching
    return cleaned


def _what(data: Mapping[str, Any], kind: str) -> tuple[str, str, str]:
    """What runs on each host: ``(command, operation, package)``."""
    if kind == FleetRunKind.REBOOT:
        return "reboot", PackageOperationKind.REBOOT, ""
    if kind == FleetRunKind.PATCH:
        try:
            target = patchapply.parse_updates_request(data).target
        except patchapply.PatchRequestError as exc:
            raise ValueError(str(exc)) from None
        described = patchapply.updates_described(target)
        return f"apply {described}", PackageOperationKind.UPGRADE, target
    if kind == FleetRunKind.PACKAGE:
        operation, package = data.get("operation"), data.get("package")
        if operation not in PACKAGE_CHANGES:
            raise ValueError("'operation' must be one of " + ", ".join(PACKAGE_CHANGES))
        if not is_package_name(package):
            raise ValueError("'package' must be one package name")
        return f"{operation} {package}", str(operation), str(package)
    command = data.get("command")
    if not isinstance(command, str) or not command.strip():
        raise ValueError("'command' must be a non-empty string")
    if len(command) > MAX_COMMAND_LENGTH or "\x00" in command:
        raise ValueError(f"'command' must be at most {MAX_COMMAND_LENGTH} characters, no NUL")
    return command, "", ""


def parse_fleet_run(data: Mapping[str, Any], kind: str = FleetRunKind.COMMAND) -> FleetRunSpec:
    """Validate a fleet run request (the ``data`` of the ``command`` message, or the
    REST body) of ``kind``; ValueError says what is wrong."""
    target = _targets(data)
    command, operation, package = _what(data, kind)
    limit, percent = _failure_limit(data.get("failure_limit"))
    offline = data.get("offline", "skip")
    if offline not in OFFLINE_POLICIES:
        raise ValueError("'offline' must be one of " + ", ".join(OFFLINE_POLICIES))
    return FleetRunSpec(
        command=command,
        kind=kind,
        operation=operation,
        package=package,
        groups=tuple(target["groups"]),
        host_ids=tuple(target["host_ids"]),
        filter=target.get("filter", {}),
        timeout=_number(data, "timeout", DEFAULT_TIMEOUT[kind], 1, MAX_TIMEOUT),
        batch_size=_number(data, "batch_size", 5, 1, MAX_BATCH),
        failure_limit=limit,
        percent=percent,
        offline=offline,
        offline_wait=_number(data, "offline_wait", 600, 1, MAX_OFFLINE_WAIT),
        target=target,
    )


def fleet_run_hosts(spec: FleetRunSpec, visible: Any = None) -> list[Host]:
    """The hosts ``spec`` targets, by hostname: of those in ``visible`` (a query of host
    ids; None: all), so that a group's hosts out of the requester's sight are no target
    and an id of one is answered as an id of no host; ValueError if a group or host is
    unknown."""
    query = Q(id__in=spec.host_ids)
    if spec.filter:
        query |= _filter_query(spec.filter)
    for name in spec.groups:
        group = HostGroup.objects.filter(name__iexact=name).first()
        if group is None:
            raise ValueError(f"No host group named {name}")
        query |= Q(groups=group)
    rows = Host.objects.filter(query)
    if visible is not None:
        rows = rows.filter(id__in=visible)
    hosts = list(rows.distinct().order_by("hostname"))
    missing = set(spec.host_ids) - {str(host.id) for host in hosts}
    if missing:
        raise ValueError(f"{len(missing)} of 'targets.host_ids' name no host")
    if not hosts:
        raise ValueError("The targets hold no host")
    if len(hosts) > MAX_HOSTS:
        raise ValueError(f"A fleet run targets at most {MAX_HOSTS} hosts")
    return hosts


def _filter_query(matching: Mapping[str, str]) -> Q:
    """Hosts matching every filter of ``matching``."""
    query = Q()
    for key, text in matching.items():
        either = Q()
        for column in FILTER_FIELDS[key]:
            either |= Q(**{f"{column}__icontains": text})
        query &= either
    return query


def failure_threshold(total: int, limit: int | None, percent: bool) -> int | None:
    """How many failed hosts stop a run of ``total`` hosts (None: no limit)."""
    if limit is None:
        return None
    return max(1, math.ceil(total * limit / 100)) if percent else limit


def fleet_run_create(*, spec: FleetRunSpec, user: Any, actor: Actor | None = None) -> FleetRun:
    """Record a fleet run (running, every host queued) that ``user`` asked for.

    Refuses with :class:`FleetRunRefused` if ``user`` may not run commands (for a
    package run: package operations) on every targeted host (as the database has the
    user's rights now); with :class:`FleetRunLimitReached` if ``user`` already has
    ``FLEET_RUNS_MAX_RUNNING_PER_USER`` runs running; ValueError if a target is unknown.
    """
    now = permissions.fresh(user)
    hosts = fleet_run_hosts(spec, permissions.scope_query(now))
    right = run_right(spec.kind)
    allowed = permissions.hosts_allowed(now, right, (h.id for h in hosts))
    refused = sum(1 for host in hosts if str(host.id) not in allowed)
    if refused:
        what = REFUSED_WHAT.get(right, "run commands")
        raise FleetRunRefused(refused, len(hosts), what)
    with transaction.atomic():
        _refuse_over_limit(user)
        run = FleetRun.objects.create(
            kind=spec.kind,
            command=spec.command,
            operation=spec.operation,
            package=spec.package,
            target=spec.target,
            timeout=spec.timeout,
            batch_size=spec.batch_size,
            failure_limit=spec.failure_limit,
            failure_percent=spec.percent,
            offline=spec.offline,
            offline_wait=spec.offline_wait,
            total=len(hosts),
            requested_by=user if getattr(user, "pk", None) else None,
            heartbeat_at=timezone.now(),
        )
        FleetRunHost.objects.bulk_create(
            FleetRunHost(run=run, host=host, hostname=host.hostname, position=index)
            for index, host in enumerate(hosts)
        )
        audit(
            "fleet_run_started",
            actor,
            run_id=str(run.id),
            command=spec.command,
            hosts=len(hosts),
            target=_target_text(spec.target),
        )
    return run


def _refuse_over_limit(user: Any) -> None:
    """In the transaction that records a run: :class:`FleetRunLimitReached` if ``user``
    already has the most runs running at once.  The user's row is locked first, so that
    requests of one user at the same moment (on any process) are counted one by one."""
    limit = settings.FLEET_RUNS_MAX_RUNNING_PER_USER
    if limit <= 0 or not getattr(user, "pk", None):
        return
    list(get_user_model().objects.select_for_update().filter(pk=user.pk).values_list("pk"))
    running = FleetRun.objects.filter(requested_by_id=user.pk, state=FleetRunState.RUNNING)
    if running.count() >= limit:
        raise FleetRunLimitReached(limit)


def _target_text(target: Mapping[str, Any]) -> str:
    parts = []
    if target.get("groups"):
        parts.append("groups " + ", ".join(target["groups"]))
    if target.get("host_ids"):
        parts.append(f"{len(target['host_ids'])} host(s) by id")
    for key, text in target.get("filter", {}).items():
        parts.append(f"{key} {text!r}")
    return "; ".join(parts)


def fleet_run_host_started(*, row_id: int) -> bool:
    """Note that a host of a run started; False if it is no longer queued (the sweep
    skipped it: the run was taken for interrupted), and then it must not start."""
    queued = FleetRunHost.objects.filter(id=row_id, status=FleetRunHostStatus.QUEUED)
    return bool(queued.update(status=FleetRunHostStatus.RUNNING, started_at=timezone.now()))


def fleet_run_host_ended(
    *,
    row_id: int,
    status: str,
    reason: str = "",
    execution_id: Any = None,
    package_operation_id: Any = None,
    exit_code: int | None = None,
) -> None:
    """Record how a host of a run ended (and the command or package operation it ran
    there), and add it to the run's counts; once: a host already ended (skipped by the
    sweep meanwhile) keeps its end."""
    if status not in FINAL_HOST_STATUSES:
        raise ValueError(f"{status!r} is not a final status")
    now = timezone.now()
    with transaction.atomic():
        run_id = FleetRunHost.objects.filter(id=row_id).values_list("run_id", flat=True).get()
        ended = (
            FleetRunHost.objects.filter(id=row_id)
            .exclude(status__in=FINAL_HOST_STATUSES)
            .update(
                status=status,
                reason=reason[:2000],
                execution_id=execution_id,
                package_operation_id=package_operation_id,
                exit_code=exit_code,
                finished_at=now,
            )
        )
        if not ended:
            return
        # one UPDATE that adds to the count: the hosts of a batch end at once
        FleetRun.objects.filter(id=run_id).update(**{status: F(status) + 1}, heartbeat_at=now)


def fleet_run_skip_rest(*, run_id: Any, reason: str) -> int:
    """Skip, with ``reason``, every host of a run not yet ended; how many."""
    with transaction.atomic():
        rest = FleetRunHost.objects.filter(run__id=run_id).exclude(status__in=FINAL_HOST_STATUSES)
        count = rest.update(
            status=FleetRunHostStatus.SKIPPED, reason=reason, finished_at=timezone.now()
        )
        FleetRun.objects.filter(id=run_id).update(skipped=F("skipped") + count)
    return count


def fleet_run_finish(*, run_id: Any, state: str, reason: str = "") -> FleetRun:
    """Record the end of a run (its state and why), if it is still running."""
    with transaction.atomic():
        run = FleetRun.objects.select_for_update().get(id=run_id)
        if run.state == FleetRunState.RUNNING:
            run.state, run.reason = state, reason
            run.finished_at = timezone.now()
            run.save(update_fields=["state", "reason", "finished_at"])
    return run


def fleet_run_heartbeat(*, run_id: Any) -> None:
    """Note that the process running the run is alive."""
    FleetRun.objects.filter(id=run_id, state=FleetRunState.RUNNING).update(
        heartbeat_at=timezone.now()
    )


def fleet_runs_interrupt_stale(*, silent_for: float) -> list[str]:
    """Mark as interrupted the runs still running whose process has not said it is
    alive for ``silent_for`` seconds (it stopped or died); their hosts not yet ended
    are skipped.  Returns their ids."""
    cutoff = timezone.now() - timedelta(seconds=silent_for)
    stale = FleetRun.objects.filter(state=FleetRunState.RUNNING, heartbeat_at__lt=cutoff)
    ended = []
    for run_id in stale.values_list("id", flat=True):
        why = "The server process running it stopped"
        fleet_run_skip_rest(run_id=run_id, reason=why)
        fleet_run_finish(run_id=run_id, state=FleetRunState.INTERRUPTED, reason=why)
        ended.append(str(run_id))
    return ended


# -- reads --------------------------------------------------------------------------


def fleet_run_counts(run: FleetRun) -> dict[str, int]:
    """The run's hosts by where they are: ``queued``, ``running`` and the three ends."""
    rows = FleetRunHost.objects.filter(run=run, status__in=("queued", "running"))
    running = rows.filter(status=FleetRunHostStatus.RUNNING).count()
    queued = rows.count() - running
    return {
        "queued": queued,
        "running": running,
        "succeeded": run.succeeded,
        "failed": run.failed,
        "skipped": run.skipped,
    }


def fleet_run_host_data(row: FleetRunHost) -> dict[str, Any]:
    """One host of a run, as the API shows it."""
    return {
        "host_id": str(row.host_id) if row.host_id else None,
        "hostname": row.hostname,
        "status": row.status,
        "reason": row.reason,
        "execution_id": str(row.execution_id) if row.execution_id else None,
        "operation_id": str(row.package_operation_id) if row.package_operation_id else None,
        "exit_code": row.exit_code,
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
    }


def fleet_run_data(run: FleetRun, *, with_hosts: bool = False) -> dict[str, Any]:
    """A run as the API shows it (with each host's outcome if ``with_hosts``)."""
    limit = run.failure_limit
    data: dict[str, Any] = {
        "run_id": str(run.id),
        "kind": run.kind,
        "target": run.target,
        "command": run.command,
        "operation": run.operation or None,
        "package": run.package or None,
        "timeout": run.timeout,
        "batch_size": run.batch_size,
        "failure_limit": None if limit is None else (f"{limit}%" if run.failure_percent else limit),
        "offline": run.offline,
        "offline_wait": run.offline_wait,
        "state": run.state,
        "reason": run.reason,
        "total": run.total,
        "counts": fleet_run_counts(run),
        "requested_by": run.requested_by.username if run.requested_by else None,
        "created_at": iso(run.created_at),
        "finished_at": iso(run.finished_at),
    }
    if with_hosts:
        data["hosts"] = [fleet_run_host_data(row) for row in run.hosts.all()]
    return data
