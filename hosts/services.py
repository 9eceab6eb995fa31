"""
Writes of the hosts app: every change to hosts, commands and package operations goes
through here, and each publishes its event after the transaction commits.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Exists, F, OuterRef, Q, QuerySet
from django.utils import timezone

from hosts.agent_protocol import MAX_OUTPUT_CHARS, CommandOutcome, HostFacts, ResultKind
from hosts.certificates import Certificate, CertificateReport
from hosts.events import (
    CommandFinished,
    HostMetricsReported,
    HostStatusChanged,
    PackageOperationFinished,
    command_event,
    operation_event,
)
from hosts.metrics import PERCENT_KEYS, Metrics, MinuteAverages
from hosts.models import (
    AgentKind,
    CommandExecution,
    ExecutionStatus,
    Host,
    HostCertificate,
    HostGroup,
    HostGroupGrant,
    HostInventory,
    HostPatchStatus,
    HostStatus,
    MetricSample,
    OperationStatus,
    PackageOperation,
    PackageOperationKind,
)
from hosts.patching import PatchUpdates
from hosts.tokens import new_token, token_digest
from sysmanage import metrics
from sysmanage.audit import Actor, DetailValue, audit
from sysmanage.control import AgentDispatch, CloseAgent
from sysmanage.events import publish, publish_control, publish_now
from sysmanage.fleet import fleet_changed
from sysmanage.protocol import iso, utc_now_iso
from sysmanage.writebatch import WriteBatch

logger = logging.getLogger(__name__)


class WorkEnded(NamedTuple):
    """A command or package operation a result was about (``kind`` is the result's:
    ``command_result`` or ``package_result``), and whether it was ended just now."""

    kind: ResultKind
    ref: str
    ended_now: bool


HOST_FACT_FIELDS = (
    "fqdn",
    "ip_addresses",
    "os_name",
    "os_version",
    "kernel",
    "architecture",
    "cpu_count",
    "memory_total",
    "agent_version",
)


def host_create(
    *,
    hostname: str,
    host_id: Any = None,
    agent_kind: str = AgentKind.NATIVE,
    groups: Collection[HostGroup] = (),
    **facts: Any,
) -> Host:
    """Create a host (status unknown until its agent connects), in ``groups``."""
    unknown = set(facts) - set(HOST_FACT_FIELDS)
    if unknown:
        raise TypeError(f"unknown host fields: {', '.join(sorted(unknown))}")
    with transaction.atomic():
        host = Host.objects.create(
            id=host_id or uuid.uuid4(), hostname=hostname, agent_kind=agent_kind, **facts
        )
        if groups:
            host.groups.add(*groups)
        fleet_changed()
    return host


def host_delete(*, host: Host) -> None:
    """Delete a host and everything recorded about it; its agent is disconnected."""
    with transaction.atomic():
        host_id = str(host.id)
        host.delete()
        publish_control(CloseAgent(host_id=host_id, reason="Host was deleted"))
        fleet_changed()


def host_register(
    *, hostname: str, groups: Collection[HostGroup] = (), actor: Actor | None = None
) -> tuple[Host, str]:
    """Enroll a host: create it (or re-enroll an existing one) and issue its agent token;
    it joins ``groups`` (an enrolled host keeps the groups it is in).

    Returns the host and the token, which is not stored and cannot be shown again.
    """
    with transaction.atomic():
        host = Host.objects.select_for_update().filter(hostname__iexact=hostname).first()
        if host is None:
            host = host_create(hostname=hostname)
        elif host.agent_kind != AgentKind.NATIVE:
            raise ValueError(
                f"{hostname} is managed by a SysManage agent; it enrolls by "
                "registering (see docs/sysmanage-agent.md)"
            )
        if groups:
            host.groups.add(*groups)
        token = _issue_token(host)
        joined = {"groups": _names(group.name for group in groups)} if groups else {}
        audit("host_enrolled", actor, host_id=str(host.id), hostname=host.hostname, **joined)
    return host, token


def host_rotate_token(*, host_id: Any, actor: Actor | None = None) -> tuple[Host, str]:
    """Replace a host's token; an agent connected with the old one is disconnected."""
    with transaction.atomic():
        host = Host.objects.select_for_update().get(id=host_id)
        if host.agent_kind != AgentKind.NATIVE:
            raise ValueError(
                f"{host.hostname} is managed by a SysManage agent, which gets a "
                "new token only by registering again with a registration key"
            )
        token = _issue_token(host)
        publish_control(CloseAgent(host_id=str(host.id), reason="Agent token was rotated"))
        audit("host_token_rotated", actor, host_id=str(host.id), hostname=host.hostname)
    return host, token


def host_revoke_token(*, host_id: Any, actor: Actor | None = None) -> Host:
    """Revoke a host's token; its connected agent is disconnected at once."""
    with transaction.atomic():
        host = Host.objects.select_for_update().get(id=host_id)
        host.token_hash = ""
        host.token_revoked_at = timezone.now()
        host.save(update_fields=["token_hash", "token_revoked_at", "updated_at"])
        publish_control(CloseAgent(host_id=str(host.id), reason="Agent token was revoked"))
        audit("host_token_revoked", actor, host_id=str(host.id), hostname=host.hostname)
    return host


def _issue_token(host: Host) -> str:
    token = new_token()
    host.token_hash = token_digest(token)
    host.token_issued_at = timezone.now()
    host.token_revoked_at = None
    host.save(update_fields=["token_hash", "token_issued_at", "token_revoked_at", "updated_at"])
    return token


def host_set_status(*, host_id: Any, status: str, seen_at: datetime | None = None) -> Host:
    """Set a host's status; publish ``host_status`` (with the previous one) if it changed."""
    if status not in HostStatus.values:
        raise ValueError(f"unknown host status {status!r}")
    with transaction.atomic():
        host = Host.objects.select_for_update().get(id=host_id)
        previous = host.status
        host.status = status
        fields = ["status", "updated_at"]
        if status == HostStatus.ONLINE or seen_at is not None:
            host.last_seen = seen_at or timezone.now()
            fields.append("last_seen")
        host.save(update_fields=fields)
        _status_changed(host, previous)
    return host


def _status_changed(host: Host, previous: str) -> None:
    """Publish ``host_status`` (on commit) if ``host``'s status is not ``previous``."""
    if previous != host.status:
        publish(
            HostStatusChanged(
                host_id=str(host.id),
                hostname=host.hostname,
                status=host.status,
                previous_status=previous,
                timestamp=iso(timezone.now()) or utc_now_iso(),
            )
        )
        fleet_changed()


def host_metrics_publish(
    *,
    host_id: str,
    hostname: str,
    metrics: Metrics,
    cpu_count: int | None,
    at: datetime,
) -> None:
    """Publish live metrics an agent reported on ``host_metrics`` at once, with no
    database write: agent connections call it on the event loop for every report (the
    history is kept a row per minute, apart)."""
    publish_now(
        HostMetricsReported(
            host_id=host_id,
            hostname=hostname,
            timestamp=iso(at) or utc_now_iso(),
            metrics=metrics,
            cpu_count=cpu_count,
        )
    )


def command_create(
    *,
    host: Host,
    command: str,
    timeout: int,
    user: Any,
    request_id: str = "",
    execution_id: Any = None,
    actor: Actor | None = None,
) -> CommandExecution:
    """Record a command a user asked to run (pending) and tell the host's agent."""
    with transaction.atomic():
        execution = CommandExecution.objects.create(
            id=execution_id or uuid.uuid4(),
            host=host,
            command=command,
            timeout=timeout,
            requested_by=user,
            request_id=request_id,
        )
        publish(command_event(execution))
        publish_control(AgentDispatch(host_id=str(host.id)))
        audit(
            "command_run",
            actor,
            host_id=str(host.id),
            hostname=host.hostname,
            command=command,
            execution_id=str(execution.id),
        )
        fleet_changed()
    return execution


def command_finish(
    *,
    execution: CommandExecution,
    status: str,
    exit_code: int | None = None,
    stdout: str = "",
    stderr: str = "",
    execution_time: float | None = None,
    error: str = "",
    stdout_truncated: bool = False,
    stderr_truncated: bool = False,
    stdout_bytes: int | None = None,
    stderr_bytes: int | None = None,
) -> CommandExecution:
    """Record a command's end (completed, failed or timed out) and publish it."""
    if status not in (ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.TIMEOUT):
        raise ValueError(f"{status!r} is not a final status")
    with transaction.atomic():
        execution.status = status
        execution.exit_code = exit_code
        execution.stdout = stdout
        execution.stderr = stderr
        execution.stdout_truncated, execution.stdout_bytes = stdout_truncated, stdout_bytes
        execution.stderr_truncated, execution.stderr_bytes = stderr_truncated, stderr_bytes
        execution.execution_time = execution_time
        execution.error = error
        execution.finished_at = timezone.now()
        execution.save()
        took = (execution.finished_at - execution.created_at).total_seconds()
        transaction.on_commit(lambda: metrics.round_trip("command", status, took))
        publish(command_event(execution))
        publish_control(CommandFinished(execution_id=str(execution.id)))
        fleet_changed()
    return execution


def _cut(name: str, text: str, size: int | None) -> tuple[str, bool]:
    """How an output was cut, for the log: ``(description, by the server)``."""
    by_server = len(text) >= MAX_OUTPUT_CHARS
    whole = f"{size} bytes" if size is not None else "an unknown size"
    where = f"the server's limit of {MAX_OUTPUT_CHARS} characters" if by_server else "the agent"
    return f"{name} of {whole} cut to {len(text)} characters by {where}", by_server


def _log_cut(what: str, hostname: str, cuts: list[tuple[str, bool]]) -> None:
    """One line for an output cut: a warning when the server dropped some of it, a
    note when the agent cut it to its own limit."""
    level = logging.WARNING if any(by_server for _, by_server in cuts) else logging.INFO
    logger.log(level, "%s on %s: %s", what, hostname, "; ".join(text for text, _ in cuts))


def package_operation_create(
    *,
    host: Host,
    operation: str,
    package: str,
    user: Any,
    operation_id: Any = None,
    actor: Actor | None = None,
) -> PackageOperation:
    """Record a package operation a user asked for (pending) and tell the host's agent."""
    with transaction.atomic():
        record = PackageOperation.objects.create(
            id=operation_id or uuid.uuid4(),
            host=host,
            operation=operation,
            package=package,
            requested_by=user,
        )
        publish(operation_event(record))
        publish_control(AgentDispatch(host_id=str(host.id)))
        audit(
            "package_operation_started",
            actor,
            host_id=str(host.id),
            hostname=host.hostname,
            operation=operation,
            package=package,
            execution_id=str(record.id),
        )
        fleet_changed()
    return record


def package_operation_update(
    *,
    operation: PackageOperation,
    status: str,
    progress: int,
    message: str = "",
    output: str | None = None,
    output_truncated: bool = False,
    output_bytes: int | None = None,
) -> PackageOperation:
    """Record progress or the end of a package operation and publish it."""
    if status not in OperationStatus.values:
        raise ValueError(f"unknown operation status {status!r}")
    with transaction.atomic():
        operation.status = status
        operation.progress = max(0, min(100, progress))
        operation.message = message
        if output is not None:
            operation.output = output
            operation.output_truncated, operation.output_bytes = output_truncated, output_bytes
        if status in (OperationStatus.COMPLETED, OperationStatus.FAILED):
            operation.finished_at = timezone.now()
            took = (operation.finished_at - operation.created_at).total_seconds()
            transaction.on_commit(lambda: metrics.round_trip("package_operation", status, took))
        operation.save()
        publish(operation_event(operation))
        if status in (OperationStatus.COMPLETED, OperationStatus.FAILED):
            publish_control(PackageOperationFinished(operation_id=str(operation.id)))
            fleet_changed()
    return operation


# -- host groups ----------------------------------------------------------------------

#: The most names one audit record lists (a group can hold thousands of hosts).
AUDIT_NAMES = 20


def _names(names: Iterable[str]) -> str:
    """Names for an audit record, sorted: ``a, b, c`` (and how many more)."""
    ordered = sorted(names, key=str.lower)
    shown = ", ".join(ordered[:AUDIT_NAMES])
    more = len(ordered) - AUDIT_NAMES
    return f"{shown} and {more} more" if more > 0 else shown


def _changes(added: Collection[str], removed: Collection[str]) -> dict[str, str]:
    """``added`` and ``removed`` for an audit record, each only if not empty."""
    changes = {"added": _names(added), "removed": _names(removed)}
    return {key: value for key, value in changes.items() if value}


def host_group_name(name: str) -> str:
    """``name`` as a group is named (stripped); ValueError if empty or too long."""
    cleaned = name.strip()
    if not cleaned:
        raise ValueError("A host group needs a name")
    limit = HostGroup._meta.get_field("name").max_length or 100
    if len(cleaned) > limit:
        raise ValueError(f"A host group's name has at most {limit} characters")
    return cleaned


def _save_group(group: HostGroup) -> None:
    """Save ``group``; a name another group has (in any case) is a ValueError."""
    taken = HostGroup.objects.filter(name__iexact=group.name).exclude(pk=group.pk)
    if taken.exists():
        raise ValueError(f"A host group named {group.name} exists already")
    try:
        with transaction.atomic():  # a savepoint: a concurrent twin must not end ours
            group.save()
    except IntegrityError:
        raise ValueError(f"A host group named {group.name} exists already") from None


def host_group_create(
    *,
    name: str,
    description: str = "",
    host_ids: Collection[Any] | None = None,
    actor: Actor | None = None,
) -> HostGroup:
    """Create a host group (with ``host_ids`` as its hosts); ValueError if the name is
    empty or taken (in any case), or a host id names no host."""
    with transaction.atomic():
        group = HostGroup(name=host_group_name(name), description=description.strip())
        _save_group(group)
        audit("host_group_created", actor, group_id=str(group.id), group=group.name)
        if host_ids:
            host_group_set_hosts(group_id=group.id, host_ids=host_ids, actor=actor)
    return group


def host_group_update(
    *,
    group_id: Any,
    name: str | None = None,
    description: str | None = None,
    host_ids: Collection[Any] | None = None,
    actor: Actor | None = None,
) -> HostGroup:
    """Rename a host group, change its description or make ``host_ids`` its hosts (what
    is not None); ValueError as :func:`host_group_create`."""
    with transaction.atomic():
        group = HostGroup.objects.select_for_update().get(id=group_id)
        before = (group.name, group.description)
        if name is not None:
            group.name = host_group_name(name)
        if description is not None:
            group.description = description.strip()
        if (group.name, group.description) != before:
            _save_group(group)
            renamed = {"renamed_from": before[0]} if group.name != before[0] else {}
            audit("host_group_changed", actor, group_id=str(group.id), group=group.name, **renamed)
        if host_ids is not None:
            host_group_set_hosts(group_id=group.id, host_ids=host_ids, actor=actor)
    return group


def host_group_delete(*, group_id: Any, actor: Actor | None = None) -> None:
    """Delete a host group: its hosts stay, in their other groups; registration keys
    stop naming it."""
    with transaction.atomic():
        group = HostGroup.objects.select_for_update().get(id=group_id)
        count = group.hosts.count()
        name, group_id = group.name, str(group.id)
        group.delete()
        audit("host_group_deleted", actor, group_id=group_id, group=name, hosts=count)


#: The flags of a grant, as the audit log names them.
GRANT_FLAGS = (
    "can_run_commands",
    "can_run_package_operations",
    "can_manage_alerts",
    "can_patch_and_reboot",
)


def _grant_details(grant: HostGroupGrant) -> dict[str, DetailValue]:
    holder: dict[str, DetailValue] = (
        {"user_id": str(grant.user_id), "user": grant.user.get_username()}
        if grant.user is not None
        else {"user_group": grant.group.name if grant.group is not None else None}
    )
    flags = [flag.removeprefix("can_") for flag in GRANT_FLAGS if getattr(grant, flag)]
    return {
        "grant_id": str(grant.id),
        "group": grant.host_group.name,
        **holder,
        "rights": ", ".join(["view", *flags]),
    }


def host_group_grant_save(grant: HostGroupGrant, *, actor: Actor | None = None) -> HostGroupGrant:
    """Give or change a grant of rights over a host group's hosts (to a user or to a
    Django group); open sockets of its holders take it within seconds
    (``hosts.receivers``).  ValueError when the grant names no holder or both, or the
    holder already has a grant on the group."""
    if (grant.user_id is None) == (grant.group_id is None):
        raise ValueError("A grant names either a user or a user group")
    with transaction.atomic():
        created = grant._state.adding
        taken = HostGroupGrant.objects.filter(host_group_id=grant.host_group_id).exclude(
            pk=grant.pk
        )
        holder = (
            Q(user_id=grant.user_id) if grant.user_id is not None else Q(group_id=grant.group_id)
        )
        taken = taken.filter(holder)
        if taken.exists():
            raise ValueError("That holder has a grant on this group already; change it instead")
        grant.save()
        audit(
            "host_group_grant_given" if created else "host_group_grant_changed",
            actor,
            **_grant_details(grant),
        )
    return grant


def host_group_grant_delete(*, grant_id: Any, actor: Actor | None = None) -> None:
    """Take a grant away; its holders stop seeing the group's hosts (unless other rights
    show them) within seconds."""
    with transaction.atomic():
        grant = HostGroupGrant.objects.select_related("host_group", "user", "group").get(
            id=grant_id
        )
        details = _grant_details(grant)
        grant.delete()
        audit("host_group_grant_removed", actor, **details)


def host_group_set_hosts(
    *, group_id: Any, host_ids: Collection[Any], actor: Actor | None = None
) -> HostGroup:
    """Make ``host_ids`` the hosts of a group (others leave it); ValueError naming the
    ids of no host."""
    wanted = {str(host_id) for host_id in host_ids}
    with transaction.atomic():
        group = HostGroup.objects.select_for_update().get(id=group_id)
        found = dict(Host.objects.filter(id__in=wanted).values_list("id", "hostname"))
        missing = wanted - {str(host_id) for host_id in found}
        if missing:
            raise ValueError(f"No host with id {', '.join(sorted(missing)[:AUDIT_NAMES])}")
        current = dict(group.hosts.values_list("id", "hostname"))
        added = [name for host_id, name in found.items() if host_id not in current]
        removed = [name for host_id, name in current.items() if host_id not in found]
        group.hosts.set(Host.objects.filter(id__in=found).only("id"))
        if added or removed:
            audit(
                "host_group_members_changed",
                actor,
                group_id=str(group.id),
                group=group.name,
                **_changes(added, removed),
                hosts=len(found),
            )
    return group


def host_set_groups(
    *, host_id: Any, groups: Collection[HostGroup], keep: bool = False, actor: Actor | None = None
) -> Host:
    """Make ``groups`` a host's groups (with ``keep``, add them to those it is in)."""
    with transaction.atomic():
        host = Host.objects.select_for_update().get(id=host_id)
        current = {group.pk: group for group in host.groups.all()}
        wanted = {group.pk: group for group in groups}
        if keep:
            wanted = {**current, **wanted}
        added = [group.name for pk, group in wanted.items() if pk not in current]
        removed = [group.name for pk, group in current.items() if pk not in wanted]
        host.groups.set(list(wanted.values()))
        if added or removed:
            audit(
                "host_groups_changed",
                actor,
                host_id=str(host.id),
                hostname=host.hostname,
                **_changes(added, removed),
            )
    return host


def host_groups_ensure(
    *, names: Iterable[str], actor: Actor | None = None
) -> tuple[list[HostGroup], list[str]]:
    """The groups ``names`` name (in any case), each created if there is none; returns
    them and the names of those created now."""
    groups: dict[str, HostGroup] = {}
    created: list[str] = []
    with transaction.atomic():
        for raw in names:
            name = host_group_name(raw)
            if name.lower() in groups:
                continue
            group = HostGroup.objects.filter(name__iexact=name).first()
            if group is None:
                group = host_group_create(name=name, actor=actor)
                created.append(group.name)
            groups[name.lower()] = group
    return list(groups.values()), created


# -- agent-driven changes ------------------------------------------------------------


def host_agent_hello(*, host_id: Any, session: str, facts: HostFacts) -> Host:
    """Store the facts an agent reported on connecting, and mark its host online
    (publishing ``host_status`` if it was not): one row lock and one write, since a
    reconnect storm brings every agent's hello at once.  The host returned says whether
    work waits for it (:func:`work_waiting`)."""
    reported: Mapping[str, object] = facts
    with transaction.atomic():
        host = _with_work_waiting(Host.objects.select_for_update()).get(id=host_id)
        previous = host.status
        changed = ["agent_session", "status", "last_seen", "updated_at"]
        for field in HOST_FACT_FIELDS:
            value = reported.get(field)
            if value is not None and value != getattr(host, field):
                setattr(host, field, value)
                changed.append(field)
        host.agent_session = session
        host.status = HostStatus.ONLINE
        host.last_seen = timezone.now()
        host.save(update_fields=changed)
        _status_changed(host, previous)
        if work_waiting(host):  # a reboot awaited is unfinished work: no query otherwise
            _reboots_returned(host.id)
    return host


def _with_work_waiting(hosts: QuerySet[Host]) -> QuerySet[Host]:
    """``hosts``, each read with whether unfinished work waits for it (:func:`work_waiting`)."""
    return hosts.annotate(
        work_waiting=Exists(
            CommandExecution.objects.filter(
                host_id=OuterRef("pk"), status__in=CommandExecution.ACTIVE_STATUSES
            )
        )
        | Exists(
            PackageOperation.objects.filter(
                host_id=OuterRef("pk"), status__in=PackageOperation.ACTIVE_STATUSES
            )
        )
    )


def work_waiting(host: Host) -> bool:
    """Whether unfinished commands or package operations waited for ``host`` when
    :func:`host_agent_hello` read it (True if unknown): without, its agent's connection
    need not ask for them (:func:`work_hand_over`)."""
    return bool(getattr(host, "work_waiting", True))


def host_agent_gone(*, host_id: Any, session: str) -> bool:
    """Mark a host offline when its current agent connection ends; False if superseded."""
    with transaction.atomic():
        host = Host.objects.select_for_update().filter(id=host_id).first()
        if host is None or host.agent_session != session:
            return False
        host.agent_session = ""
        host.save(update_fields=["agent_session", "updated_at"])
        host_set_status(host_id=host.id, status=HostStatus.OFFLINE)
    return True


def host_update_facts(*, host_id: Any, facts: HostFacts) -> None:
    """Store facts an agent reported while connected (no event: facts are not live data)."""
    changes = {
        field: value
        for field, value in facts.items()
        if field in HOST_FACT_FIELDS and value is not None
    }
    if changes:
        Host.objects.filter(id=host_id).update(**changes, updated_at=timezone.now())


def host_inventory_save(
    *,
    host_id: Any,
    kind: str,
    data: dict[str, object],
    item_count: int | None,
    facts: HostFacts,
    digest: str = "",
) -> bool:
    """Replace one kind of a host's inventory, and the host facts it carries; False (and
    nothing written) when ``digest`` says the stored report is the same."""
    if digest and HostInventory.objects.filter(host_id=host_id, kind=kind, digest=digest).exists():
        return False
    with transaction.atomic():
        HostInventory.objects.update_or_create(
            host_id=host_id,
            kind=kind,
            defaults={"data": data, "item_count": item_count, "digest": digest},
        )
        host_update_facts(host_id=host_id, facts=facts)
    return True


#: Hosts whose last-seen time one statement writes, at most; minutes of history, too.
WRITE_CHUNK = 500
#: How long what agent connections note for the database (last-seen times, finished
#: minutes of history) waits, from the first note, to be written with the rest (seconds).
BATCH_SECONDS = 1.0


def hosts_touch(*, host_ids: Collection[Any], seen_at: datetime) -> None:
    """Record that the agents of ``host_ids`` were heard from at ``seen_at`` (no event):
    one statement per :data:`WRITE_CHUNK` hosts, never moving a last-seen time back."""
    ids = list(host_ids)
    for start in range(0, len(ids), WRITE_CHUNK):
        Host.objects.filter(id__in=ids[start : start + WRITE_CHUNK]).filter(
            Q(last_seen__lt=seen_at) | Q(last_seen__isnull=True)
        ).update(last_seen=seen_at)


def _touch_noted(noted: list[tuple[Any, datetime]]) -> None:
    """Write the last-seen times a process noted, with the earliest time among them, so
    that no host is said to have been heard from later than it was."""
    hosts_touch(host_ids={host_id for host_id, _ in noted}, seen_at=min(t for _, t in noted))


#: The last-seen times noted by this process's agent connections, written together.
LAST_SEEN: WriteBatch[tuple[Any, datetime]] = WriteBatch(
    _touch_noted, what="last-seen times of agents", delay=BATCH_SECONDS
)


class LastSeen:
    """An agent connection's last-seen time, noted at most every third of the offline
    timeout (often enough to keep the host online) and written with every other
    connection's of the process (:data:`LAST_SEEN`), so that a fleet costs one statement a
    second, and no report waits for it."""

    def __init__(self, host_id: Any, *, written_now: bool = False) -> None:
        self.host_id = host_id
        self.written = time.monotonic() if written_now else float("-inf")

    def touch(self) -> None:
        """Note that the agent was heard from; have it written if it is time to."""
        now = time.monotonic()
        if now - self.written >= settings.HOST_OFFLINE_AFTER_SECONDS / 3:
            self.written = now
            LAST_SEEN.add((self.host_id, timezone.now()))


def hosts_mark_offline(*, silent_for: float) -> list[Host]:
    """Mark offline every online host not heard from for ``silent_for`` seconds."""
    cutoff = timezone.now() - timedelta(seconds=silent_for)
    stale = Host.objects.filter(status=HostStatus.ONLINE).filter(
        Q(last_seen__lt=cutoff) | Q(last_seen__isnull=True)
    )
    return [host_set_status(host_id=host.id, status=HostStatus.OFFLINE) for host in stale]


def work_hand_over(*, host_id: Any) -> tuple[list[CommandExecution], list[PackageOperation]]:
    """The unfinished commands and package operations of ``host_id``, oldest first, for
    its agent's connection to send.  Pending ones move to running (in progress) at once,
    in the same transaction: work is handed over or failed as not taken
    (:func:`command_fail_pending`), never both."""
    with transaction.atomic():
        commands = list(
            CommandExecution.objects.select_for_update(of=("self",))
            .select_related("host", "requested_by")
            .filter(host_id=host_id, status__in=CommandExecution.ACTIVE_STATUSES)
            .order_by("created_at")
        )
        for execution in commands:
            if execution.status == ExecutionStatus.PENDING:
                execution.status = ExecutionStatus.RUNNING
                execution.started_at = timezone.now()
                execution.save(update_fields=["status", "started_at"])
                publish(command_event(execution))
        operations = list(
            PackageOperation.objects.select_for_update(of=("self",))
            .select_related("host")
            .filter(host_id=host_id, status__in=PackageOperation.ACTIVE_STATUSES)
            .order_by("created_at")
        )
        for operation in operations:
            if operation.status == OperationStatus.PENDING:
                package_operation_update(
                    operation=operation,
                    status=OperationStatus.IN_PROGRESS,
                    progress=0,
                    message="Sent to the agent",
                )
    return commands, operations


def command_mark_running(*, execution_id: Any, host_id: Any) -> bool:
    """Note that the agent started a pending command; False if it was not pending."""
    with transaction.atomic():
        execution = (
            CommandExecution.objects.select_for_update(of=("self",))
            .select_related("host", "requested_by")
            .filter(id=execution_id, host_id=host_id)
            .first()
        )
        if execution is None or execution.status != ExecutionStatus.PENDING:
            return False
        execution.status = ExecutionStatus.RUNNING
        execution.started_at = timezone.now()
        execution.save(update_fields=["status", "started_at"])
        publish(command_event(execution))
    return True


def command_record_result(*, execution_id: Any, host_id: Any, result: CommandOutcome) -> bool:
    """Store an agent's result once; False if unknown, another host's, or already final.
    An output that was cut is said so in the log."""
    with transaction.atomic():
        execution = (
            CommandExecution.objects.select_for_update(of=("self",))
            .select_related("host", "requested_by")
            .filter(id=execution_id, host_id=host_id)
            .first()
        )
        if execution is None or execution.status not in CommandExecution.ACTIVE_STATUSES:
            return False
        command_finish(execution=execution, **result)
    cuts = []
    if result.get("stdout_truncated"):
        cuts.append(_cut("stdout", result.get("stdout", ""), result.get("stdout_bytes")))
    if result.get("stderr_truncated"):
        cuts.append(_cut("stderr", result.get("stderr", ""), result.get("stderr_bytes")))
    if cuts:
        _log_cut(f"command {execution.id}", execution.host.hostname, cuts)
    return True


def work_fail_oversized(*, host_id: Any, refs: Collection[str], why: str) -> list[WorkEnded]:
    """Fail, with ``why``, the unfinished commands and package operations of ``host_id``
    among ``refs`` (ids found in a result too large to take, whose output is lost).

    Returns every one of the host's among ``refs``, failed now or ended before, so that
    the agent can be told that its result needs no resending.
    """
    ended: list[WorkEnded] = []
    with transaction.atomic():
        for execution in (
            CommandExecution.objects.select_for_update(of=("self",))
            .select_related("host", "requested_by")
            .filter(id__in=refs, host_id=host_id)
        ):
            active = execution.status in CommandExecution.ACTIVE_STATUSES
            if active:
                command_finish(
                    execution=execution,
                    status=ExecutionStatus.FAILED,
                    error=why,
                    stdout_truncated=True,
                    stderr_truncated=True,
                )
            ended.append(WorkEnded("command_result", str(execution.id), active))
        for operation in (
            PackageOperation.objects.select_for_update(of=("self",))
            .select_related("host")
            .filter(id__in=refs, host_id=host_id)
        ):
            active = operation.status in PackageOperation.ACTIVE_STATUSES
            if active:
                package_operation_update(
                    operation=operation,
                    status=OperationStatus.FAILED,
                    progress=operation.progress,
                    message=why,
                    output="",
                    output_truncated=True,
                )
            ended.append(WorkEnded("package_result", str(operation.id), active))
    return ended


def command_fail_pending(*, execution_id: Any, why: str) -> bool:
    """Fail a command not handed to its agent yet (still pending) with ``why``; False if
    it was handed over or ended meanwhile (or is gone), atomically."""
    with transaction.atomic():
        execution = (
            CommandExecution.objects.select_for_update(of=("self",))
            .select_related("host", "requested_by")
            .filter(id=execution_id)
            .first()
        )
        if execution is None or execution.status != ExecutionStatus.PENDING:
            return False
        command_finish(execution=execution, status=ExecutionStatus.FAILED, error=why)
    return True


def commands_expire_overdue(*, grace: float) -> int:
    """Time out commands whose agent never answered (timeout plus ``grace`` seconds)."""
    now = timezone.now()
    expired = 0
    for execution in CommandExecution.objects.filter(
        status__in=CommandExecution.ACTIVE_STATUSES
    ).select_related("host", "requested_by"):
        deadline = execution.created_at + timedelta(seconds=execution.timeout + grace)
        if deadline > now:
            continue
        with transaction.atomic():
            locked = CommandExecution.objects.select_for_update().get(id=execution.id)
            if locked.status in CommandExecution.ACTIVE_STATUSES:
                command_finish(
                    execution=execution,
                    status=ExecutionStatus.TIMEOUT,
                    error="No result from the agent in time",
                )
                expired += 1
    return expired


def package_operation_record_progress(
    *, operation_id: Any, host_id: Any, progress: int, message: str
) -> bool:
    """Store progress of an unfinished operation; False if unknown or finished."""
    with transaction.atomic():
        operation = (
            PackageOperation.objects.select_for_update(of=("self",))
            .select_related("host")
            .filter(id=operation_id, host_id=host_id)
            .first()
        )
        if operation is None or operation.status not in PackageOperation.ACTIVE_STATUSES:
            return False
        package_operation_update(
            operation=operation,
            status=OperationStatus.IN_PROGRESS,
            progress=progress,
            message=message,
        )
    return True


def package_operation_record_result(
    *,
    operation_id: Any,
    host_id: Any,
    status: str,
    message: str,
    output: str,
    output_truncated: bool = False,
    output_bytes: int | None = None,
    recheck: bool = True,
) -> bool:
    """Store an operation's final result once; False if unknown or already final.
    Applying updates asks the agent for its updates and reboot flag again, unless
    ``recheck`` is false (an agent that looks again by itself)."""
    if status not in (OperationStatus.COMPLETED, OperationStatus.FAILED):
        raise ValueError(f"{status!r} is not a final status")
    with transaction.atomic():
        operation = (
            PackageOperation.objects.select_for_update(of=("self",))
            .select_related("host")
            .filter(id=operation_id, host_id=host_id)
            .first()
        )
        if operation is None or operation.status not in PackageOperation.ACTIVE_STATUSES:
            return False
        if operation.rebooting_since is not None:
            return False  # the result came already; the host is awaited
        reboot = operation.operation == PackageOperationKind.REBOOT
        if reboot and status == OperationStatus.COMPLETED:
            _reboot_began(operation, message=message, output=output)
            return True
        if operation.operation == PackageOperationKind.UPGRADE and recheck:
            _updates_recheck(operation.host_id)
        package_operation_update(
            operation=operation,
            status=status,
            message=message,
            output=output,
            output_truncated=output_truncated,
            output_bytes=output_bytes,
            progress=100 if status == OperationStatus.COMPLETED else operation.progress,
        )
    if output_truncated:
        cut = _cut("output", output, output_bytes)
        _log_cut(f"package operation {operation.id}", operation.host.hostname, [cut])
    return True


def _reboot_began(operation: PackageOperation, *, message: str, output: str) -> None:
    """The agent began the reboot: wait for the host to come back, unless its agent
    connected again already (the result can come after the reconnect)."""
    operation.rebooting_since = timezone.now()
    if operation.agent_returned_at is not None:
        _reboot_done(operation)
        return
    package_operation_update(
        operation=operation,
        status=OperationStatus.IN_PROGRESS,
        progress=50,
        message="Rebooting: waiting for the host to come back"
        + (f". {message}" if message else ""),
        output=output,
    )


def _reboot_done(operation: PackageOperation) -> None:
    """The host came back from ``operation``'s reboot."""
    assert operation.rebooting_since is not None
    took = (timezone.now() - operation.rebooting_since).total_seconds()
    package_operation_update(
        operation=operation,
        status=OperationStatus.COMPLETED,
        progress=100,
        message=f"Rebooted: the host is back online after {took:.0f}s",
    )
    _updates_recheck(operation.host_id)


def _reboots_returned(host_id: Any) -> None:
    """The host's agent connected: the reboots it began are over; those it was handed
    and has not answered yet note it (their result may come later)."""
    rebooting = PackageOperation.objects.select_for_update(of=("self",)).filter(
        host_id=host_id,
        operation=PackageOperationKind.REBOOT,
        status=OperationStatus.IN_PROGRESS,
    )
    for operation in rebooting:
        if operation.rebooting_since is not None:
            _reboot_done(operation)
        elif operation.agent_returned_at is None:
            operation.agent_returned_at = timezone.now()
            operation.save(update_fields=["agent_returned_at"])


def _updates_recheck(host_id: Any) -> None:
    """Ask the host's agent again for its pending updates and reboot flag (with its next
    work; this project's agent reports them after every package operation and on
    connecting anyway): applying updates and rebooting change both."""
    HostPatchStatus.objects.update_or_create(
        host_id=host_id, defaults={"check_requested_at": timezone.now()}
    )
    publish_control(AgentDispatch(host_id=str(host_id)))


def reboots_expire_overdue(*, within: float) -> int:
    """Fail the reboots whose host did not come back within ``within`` seconds."""
    cutoff = timezone.now() - timedelta(seconds=within)
    count = 0
    with transaction.atomic():
        for operation in PackageOperation.objects.select_for_update(of=("self",)).filter(
            operation=PackageOperationKind.REBOOT,
            status=OperationStatus.IN_PROGRESS,
            rebooting_since__lt=cutoff,
        ):
            package_operation_update(
                operation=operation,
                status=OperationStatus.FAILED,
                progress=operation.progress,
                message=f"The host did not come back within {within:g}s of the reboot",
            )
            count += 1
    return count


def package_operation_fail_pending(*, operation_id: Any, why: str) -> bool:
    """Fail a package operation not handed to its agent yet (still pending) with
    ``why``; False if it was handed over or ended meanwhile (or is gone), atomically."""
    with transaction.atomic():
        operation = (
            PackageOperation.objects.select_for_update(of=("self",))
            .select_related("host")
            .filter(id=operation_id)
            .first()
        )
        if operation is None or operation.status != OperationStatus.PENDING:
            return False
        package_operation_update(
            operation=operation, status=OperationStatus.FAILED, progress=0, message=why, output=""
        )
    return True


def package_operations_expire_overdue(*, silent_for: float) -> int:
    """Fail operations with no progress for ``silent_for`` seconds (agent gone)."""
    cutoff = timezone.now() - timedelta(seconds=silent_for)
    # a reboot waiting for its host has its own bound (:func:`reboots_expire_overdue`)
    stale = PackageOperation.objects.filter(
        status__in=PackageOperation.ACTIVE_STATUSES,
        updated_at__lt=cutoff,
        rebooting_since__isnull=True,
    ).select_related("host")
    count = 0
    for operation in stale:
        if package_operation_record_result(
            operation_id=operation.id,
            host_id=operation.host_id,
            status=OperationStatus.FAILED,
            output=operation.output,
            output_truncated=operation.output_truncated,
            output_bytes=operation.output_bytes,
            message="No word from the agent in time; the result is unknown",
        ):
            count += 1
    return count


#: A finished minute of a host's metrics: host id, minute, reports, their averages.
MinuteRow = tuple[Any, datetime, int, MinuteAverages]


def _merged(
    old_samples: int, old: MinuteAverages, samples: int, new: MinuteAverages
) -> MinuteAverages:
    """Two parts of one minute as one: percentages averaged by their reports, the disks
    and load of the later part (if it has them)."""
    total = old_samples + samples
    merged: MinuteAverages = {}
    for key in PERCENT_KEYS:
        before, after = old.get(key), new.get(key)
        if after is None or before is None:
            merged[key] = before if after is None else after
        else:
            merged[key] = (before * old_samples + after * samples) / total
    merged["disk_usage"] = new.get("disk_usage") or old.get("disk_usage") or {}
    merged["load_average"] = new.get("load_average") or old.get("load_average") or []
    return merged


def _row_averages(row: MetricSample) -> MinuteAverages:
    return {
        "cpu_usage": row.cpu_usage,
        "memory_usage": row.memory_usage,
        "disk_usage": row.disk_usage,
        "load_average": row.load_average,
    }


def metric_samples_save(*, rows: Sequence[MinuteRow]) -> None:
    """Store one-minute history rows, each merged into the row of its host and minute if
    there is one already: a few statements for all of them."""
    combined: dict[tuple[str, datetime], tuple[int, MinuteAverages]] = {}
    for host_id, minute, samples, averages in rows:
        key = (str(host_id), minute)
        if key in combined:
            old_samples, old = combined[key]
            combined[key] = (old_samples + samples, _merged(old_samples, old, samples, averages))
        else:
            combined[key] = (samples, averages)
    keys = list(combined)
    for start in range(0, len(keys), WRITE_CHUNK):
        chunk = {key: combined[key] for key in keys[start : start + WRITE_CHUNK]}
        try:
            _save_minutes(chunk)
        except IntegrityError:
            # Another process created one of the rows meanwhile: merge into it instead.
            _save_minutes(chunk)


def _save_minutes(rows: dict[tuple[str, datetime], tuple[int, MinuteAverages]]) -> None:
    # Nearly always every row is new (a minute is written once it is over): insert them
    # all in one statement, and merge only if one was there already.
    try:
        with transaction.atomic():
            MetricSample.objects.bulk_create(
                MetricSample(host_id=host_id, minute=minute, samples=samples, **averages)
                for (host_id, minute), (samples, averages) in rows.items()
            )
        return
    except IntegrityError:
        pass
    with transaction.atomic():
        existing = {
            (str(row.host_id), row.minute): row
            for row in MetricSample.objects.select_for_update().filter(
                host_id__in={host_id for host_id, _ in rows},
                minute__in={minute for _, minute in rows},
            )
        }
        changed, created = [], []
        for (host_id, minute), (samples, averages) in rows.items():
            row = existing.get((host_id, minute))
            if row is None:
                created.append(
                    MetricSample(host_id=host_id, minute=minute, samples=samples, **averages)
                )
                continue
            for field, value in _merged(row.samples, _row_averages(row), samples, averages).items():
                setattr(row, field, value)
            row.samples += samples
            changed.append(row)
        MetricSample.objects.bulk_create(created)
        MetricSample.objects.bulk_update(
            changed, ["samples", "cpu_usage", "memory_usage", "disk_usage", "load_average"]
        )


def metric_sample_save(
    *, host_id: Any, minute: datetime, samples: int, averages: MinuteAverages
) -> None:
    """Store (or merge into) the one-minute history row of a host."""
    metric_samples_save(rows=[(host_id, minute, samples, averages)])


def _save_noted_minutes(rows: list[MinuteRow]) -> None:
    metric_samples_save(rows=rows)


#: Finished minutes of this process's agent connections, written together.
METRIC_MINUTES: WriteBatch[MinuteRow] = WriteBatch(
    _save_noted_minutes, what="minutes of metrics history", delay=BATCH_SECONDS
)


# -- pending updates and reboots ---------------------------------------------------------


def host_patch_updates_save(*, host_id: Any, report: PatchUpdates) -> None:
    """Store a host's pending updates (whichever agent reported them); the fleet's
    count of hosts with security updates may move."""
    HostPatchStatus.objects.update_or_create(
        host_id=host_id,
        defaults={
            "update_count": report.count,
            "security_count": report.security_count,
            "updates": report.updates,
            "updates_reported_at": timezone.now(),
        },
    )
    fleet_changed()


def host_reboot_save(*, host_id: Any, required: bool) -> None:
    """Store whether a host needs a reboot; ``reboot_required_since`` keeps the first
    report of a run of them (the reboot alert measures from it)."""
    now = timezone.now()
    with transaction.atomic():
        status, _ = HostPatchStatus.objects.select_for_update().get_or_create(host_id=host_id)
        if required and not status.reboot_required:
            status.reboot_required_since = now
        elif not required:
            status.reboot_required_since = None
        status.reboot_required, status.reboot_reported_at = required, now
        status.save(
            update_fields=["reboot_required", "reboot_required_since", "reboot_reported_at"]
        )
    fleet_changed()


def host_updates_check_request(*, host: Host, actor: Actor | None) -> None:
    """Ask the host's agent for a fresh check of its updates: sent with its next work
    (now, if it is connected), rather than at the agent's own next check."""
    with transaction.atomic():
        HostPatchStatus.objects.update_or_create(
            host=host, defaults={"check_requested_at": timezone.now()}
        )
        audit("host_updates_check", actor, host_id=str(host.id), hostname=host.hostname)
        publish_control(AgentDispatch(host_id=str(host.id)))


def host_updates_check_take(*, host_id: Any) -> bool:
    """Whether a check of updates asked for is still to be sent to the host's agent;
    True marks it sent."""
    due = HostPatchStatus.objects.filter(host_id=host_id, check_requested_at__isnull=False).filter(
        Q(check_sent_at__isnull=True) | Q(check_sent_at__lt=F("check_requested_at"))
    )
    # Read first: this runs with every look for due commands (a polling agent's too), and
    # an UPDATE that matches nothing still takes SQLite's write lock.
    return due.exists() and bool(due.update(check_sent_at=timezone.now()))


# -- certificates ----------------------------------------------------------------------------

_CERTIFICATE_FIELDS = (
    "file_path",
    "name",
    "subject",
    "issuer",
    "serial_number",
    "fingerprint_sha256",
    "not_before",
    "not_after",
    "is_ca",
    "key_usage",
)


def _certificate_values(cert: Certificate | HostCertificate) -> tuple[object, ...]:
    return tuple(getattr(cert, name) for name in _CERTIFICATE_FIELDS)


def host_certificates_save(*, host_id: Any, hostname: str, report: CertificateReport) -> bool:
    """Replace a host's certificates with those of a report; True when the set changed.

    The agent resends the same set every few minutes: an unchanged set only has its
    ``reported_at`` moved (one statement).  A report cut to the bound is logged.
    """
    now = timezone.now()
    if report.dropped:
        logger.warning(
            "certificates of %s: %d of %d stored, the rest dropped (at most %d per host)",
            hostname,
            len(report.certificates),
            report.distinct,
            len(report.certificates),
        )
    wanted = {_certificate_values(cert) for cert in report.certificates}
    with transaction.atomic():
        stored = HostCertificate.objects.select_for_update().filter(host_id=host_id)
        current = {_certificate_values(row) for row in stored}
        if current == wanted and len(wanted) == len(report.certificates):
            stored.update(reported_at=now)
            return False
        stored.delete()
        HostCertificate.objects.bulk_create(
            [
                HostCertificate(
                    host_id=host_id,
                    reported_at=now,
                    **{name: getattr(cert, name) for name in _CERTIFICATE_FIELDS},
                )
                for cert in report.certificates
            ],
            batch_size=500,
        )
    return True
