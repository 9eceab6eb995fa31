"""
The command queue of SysManage agents.

Commands and package operations waiting for a host are the queue.  When a connection
(or a poll) of the host's agent takes one, a :class:`~hosts.models.AgentDelivery` records
the send; its id is the ``queue_message_id`` the agent acknowledges and dedupes by.  An
unacknowledged send is repeated with the same id every ``SYSMANAGE_AGENT_ACK_SECONDS`` up
to ``SYSMANAGE_AGENT_MAX_ATTEMPTS`` times, then the command fails as not delivered; a
command no connection took within ``SYSMANAGE_AGENT_DELIVERY_SECONDS`` fails the same
way.  Sending moves the command to ``running`` in the same transaction, so a command is
either delivered or failed, never both.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from hosts import patchapply, services
from hosts.delivery import DeliveryPolicy, WorkKind
from hosts.models import (
    AgentDelivery,
    AgentKind,
    CommandExecution,
    DeliveryState,
    ExecutionStatus,
    HostPatchStatus,
    OperationStatus,
    PackageOperation,
    PackageOperationKind,
)
from hosts.smagent import protocol

#: The agent command for each kind of package operation (``PackageOperation.operation``).
PACKAGE_COMMANDS: dict[str, protocol.CommandType] = {
    PackageOperationKind.INSTALL: "install_packages",
    PackageOperationKind.UPDATE: "install_packages",  # installing a package upgrades it
    PackageOperationKind.REMOVE: "uninstall_packages",
    PackageOperationKind.UPGRADE: "apply_updates",
    PackageOperationKind.REBOOT: "reboot_system",
}
PACKAGE_TIMEOUT = 1800
#: Seconds the agent has to start a reboot (the host's return is awaited apart).
REBOOT_TIMEOUT = 120
BATCH = 50


@dataclass(frozen=True)
class Outgoing:
    """A command to send now, and the request it carries out (for ``agent_took``)."""

    message: protocol.CommandMessage
    ref: str


def _shell_command(execution: CommandExecution, delivery_id: str) -> protocol.CommandMessage:
    return protocol.command_message(
        delivery_id,
        "execute_shell",
        {"command": execution.command, "timeout": execution.timeout},
        execution.timeout,
    )


def _package_command(
    operation: PackageOperation, delivery_id: str, packages: list[protocol.PackageSpec]
) -> protocol.CommandMessage:
    requested_by = operation.requested_by.get_username() if operation.requested_by else ""
    if operation.operation == PackageOperationKind.REBOOT:
        return protocol.command_message(delivery_id, "reboot_system", {}, REBOOT_TIMEOUT)
    if operation.operation == PackageOperationKind.UPGRADE:
        parameters: protocol.UpdateParameters = {
            "request_id": str(operation.id),
            "requested_by": requested_by,
            "packages": packages,
            "security_only": operation.package == "*security",
        }
        return protocol.command_message(delivery_id, "apply_updates", parameters, PACKAGE_TIMEOUT)
    return protocol.command_message(
        delivery_id,
        PACKAGE_COMMANDS[operation.operation],
        {
            "request_id": str(operation.id),
            "requested_by": requested_by,
            "packages": [{"package_name": operation.package, "package_manager": "auto"}],
        },
        PACKAGE_TIMEOUT,
    )


def _updates_chosen(operation: PackageOperation) -> tuple[list[protocol.PackageSpec], str]:
    """The pending updates (as last reported) an ``upgrade`` operation applies, each with
    its package manager, and what the operation's progress says of them; no updates and
    the reason when there is nothing the agent could apply."""
    status = HostPatchStatus.objects.filter(host_id=operation.host_id).first()
    pending = list(status.updates) if status is not None else []
    chosen, missing = patchapply.updates_to_apply(operation.package, pending)
    unnamed = [u["name"] for u in chosen if not u.get("manager")]
    packages: list[protocol.PackageSpec] = [
        {"package_name": u["name"], "package_manager": u["manager"]}
        for u in chosen
        if u.get("manager")
    ]
    notes = []
    if missing:
        notes.append("not pending, left out: " + ", ".join(missing[:10]))
    if unnamed:
        notes.append("no package manager reported, left out: " + ", ".join(unnamed[:10]))
    if packages:
        said = f"Sent to the agent: {len(packages)} update{'' if len(packages) == 1 else 's'}"
        return packages, "; ".join([said, *notes])
    if not pending and operation.package.startswith(patchapply.ALL_UPDATES):
        return [], ""
    return [], "Nothing to apply: " + ("; ".join(notes) or "no such pending update")


def _message(delivery: AgentDelivery) -> Outgoing:
    if delivery.execution is not None:
        return Outgoing(
            _shell_command(delivery.execution, str(delivery.id)), str(delivery.execution_id)
        )
    assert delivery.operation is not None
    return Outgoing(
        _package_command(delivery.operation, str(delivery.id), delivery.packages or []),
        str(delivery.operation_id),
    )


def _nothing_to_apply(operation: PackageOperation, why: str) -> None:
    """End an ``upgrade`` that selects no update the agent could apply, unsent: done if
    nothing is pending, failed (saying why) if what was asked for is not."""
    services.package_operation_record_result(
        operation_id=operation.id,
        host_id=operation.host_id,
        status=OperationStatus.FAILED if why else OperationStatus.COMPLETED,
        message=why or "No pending updates to apply (as the agent last reported)",
        output="",
    )


def take_due(host_id: Any, *, resend_all: bool = False) -> list[Outgoing]:
    """The commands to send to ``host_id``'s agent now, each send recorded.

    New commands and operations get a delivery and move to running/in progress; sent
    ones not acknowledged within ``SYSMANAGE_AGENT_ACK_SECONDS`` (or all unacknowledged
    ones, after a reconnect: ``resend_all``) go again, until the attempts run out.
    """
    out: list[Outgoing] = []
    new: list[Any] = []
    now = timezone.now()
    with transaction.atomic():
        for execution in (
            CommandExecution.objects.select_for_update(of=("self",))
            .select_related("host", "requested_by")
            .filter(host_id=host_id, status=ExecutionStatus.PENDING, delivery__isnull=True)
            .order_by("created_at")[:BATCH]
        ):
            delivery = AgentDelivery.objects.create(
                host_id=host_id, command_type="execute_shell", execution=execution, sent_at=now
            )
            services.command_mark_running(execution_id=execution.id, host_id=host_id)
            new.append(delivery.id)
            out.append(Outgoing(_shell_command(execution, str(delivery.id)), str(execution.id)))
        for operation in (
            PackageOperation.objects.select_for_update(of=("self",))
            .select_related("host", "requested_by")
            .filter(host_id=host_id, status=OperationStatus.PENDING, delivery__isnull=True)
            .order_by("created_at")[:BATCH]
        ):
            packages: list[protocol.PackageSpec] = []
            said = "Sent to the agent"
            if operation.operation == PackageOperationKind.UPGRADE:
                packages, said = _updates_chosen(operation)
                if not packages:
                    _nothing_to_apply(operation, said)
                    continue
            delivery = AgentDelivery.objects.create(
                host_id=host_id,
                command_type=PACKAGE_COMMANDS[operation.operation],
                operation=operation,
                sent_at=now,
                packages=packages,
            )
            services.package_operation_record_progress(
                operation_id=operation.id, host_id=host_id, progress=0, message=said
            )
            new.append(delivery.id)
            out.append(
                Outgoing(_package_command(operation, str(delivery.id), packages), str(operation.id))
            )
        overdue = now - timedelta(seconds=settings.SYSMANAGE_AGENT_ACK_SECONDS)
        unacknowledged = (
            AgentDelivery.objects.select_for_update(of=("self",))
            .select_related("execution", "operation", "operation__requested_by")
            .filter(host_id=host_id, state=DeliveryState.SENT)
            .exclude(id__in=new)
        )
        if not resend_all:
            unacknowledged = unacknowledged.filter(sent_at__lt=overdue)
        for delivery in unacknowledged[:BATCH]:
            if not _still_wanted(delivery):
                delivery.state = DeliveryState.ABANDONED
                delivery.save(update_fields=["state"])
            elif delivery.attempts >= settings.SYSMANAGE_AGENT_MAX_ATTEMPTS:
                _abandon(delivery)
            else:
                delivery.attempts += 1
                delivery.sent_at = now
                delivery.save(update_fields=["attempts", "sent_at"])
                out.append(_message(delivery))
    return out


def unacknowledged(host_id: Any) -> bool:
    """Whether commands sent to ``host_id``'s agent still wait for an acknowledgement."""
    return AgentDelivery.objects.filter(host_id=host_id, state=DeliveryState.SENT).exists()


def _still_wanted(delivery: AgentDelivery) -> bool:
    if delivery.execution is not None:
        return delivery.execution.status in CommandExecution.ACTIVE_STATUSES
    return (
        delivery.operation is not None
        and delivery.operation.status in PackageOperation.ACTIVE_STATUSES
    )


def _abandon(delivery: AgentDelivery) -> None:
    delivery.state = DeliveryState.ABANDONED
    delivery.save(update_fields=["state"])
    why = (
        f"Not delivered: the agent did not acknowledge the command after "
        f"{delivery.attempts} attempts"
    )
    if delivery.execution_id is not None:
        services.command_record_result(
            execution_id=delivery.execution_id,
            host_id=delivery.host_id,
            result={"status": "failed", "error": why},
        )
    else:
        services.package_operation_record_result(
            operation_id=delivery.operation_id,
            host_id=delivery.host_id,
            status=OperationStatus.FAILED,
            message=why,
            output="",
        )


def _delivery(host_id: Any, delivery_id: Any) -> AgentDelivery | None:
    try:
        key = uuid.UUID(str(delivery_id))
    except ValueError:
        return None
    return (
        AgentDelivery.objects.select_for_update(of=("self",))
        .filter(id=key, host_id=host_id)
        .first()
    )


def acknowledge(*, host_id: Any, delivery_id: Any) -> bool:
    """Note the agent's ``command_acknowledgment``; False for an id not sent to it."""
    with transaction.atomic():
        delivery = _delivery(host_id, delivery_id)
        if delivery is None:
            return False
        if delivery.state == DeliveryState.SENT:
            delivery.state = DeliveryState.ACKNOWLEDGED
            delivery.acknowledged_at = timezone.now()
            delivery.save(update_fields=["state", "acknowledged_at"])
    return True


def record_result(*, host_id: Any, data: protocol.MessageData) -> bool:
    """Store a ``command_result`` once (it may come before the acknowledgement).

    False for a result of a command this server did not send as a delivery (the
    metrics set it pushes, or an unknown id).
    """
    with transaction.atomic():
        delivery = _delivery(host_id, data.get("command_id"))
        if delivery is None:
            return False
        now = timezone.now()
        if delivery.state != DeliveryState.ACKNOWLEDGED:
            delivery.state = DeliveryState.ACKNOWLEDGED
            delivery.acknowledged_at = now
            delivery.save(update_fields=["state", "acknowledged_at"])
        if delivery.execution_id is not None:
            elapsed = round((now - delivery.created_at).total_seconds(), 3)  # first send
            services.command_record_result(
                execution_id=delivery.execution_id,
                host_id=host_id,
                result=protocol.shell_result(data, elapsed),
            )
        elif delivery.operation_id is not None:
            if delivery.command_type == "apply_updates" and protocol.apply_started(data):
                _applying(delivery, now)
            else:
                services.package_operation_record_result(
                    operation_id=delivery.operation_id,
                    host_id=host_id,
                    **protocol.package_result(data),
                )
    return True


def _applying(delivery: AgentDelivery, now: Any) -> None:
    """The agent began applying the updates in the background: the operation goes on
    until its ``update_apply_result`` (or its time runs out)."""
    if delivery.applying_since is None:
        delivery.applying_since = now
        delivery.save(update_fields=["applying_since"])
        services.package_operation_record_progress(
            operation_id=delivery.operation_id,
            host_id=delivery.host_id,
            progress=50,
            message="The agent is applying the updates; it reports when they are done",
        )


def record_apply_result(*, host_id: Any, data: protocol.MessageData) -> bool:
    """End the ``upgrade`` operation an ``update_apply_result`` reports on.

    The report names no command: it goes to the oldest ``apply_updates`` of the host
    still going whose packages include one it names (the agent applies them one
    command at a time).  False if there is none (a report of updates this server did
    not ask for, or one repeated after its operation ended)."""
    names, outcome = protocol.apply_result(data)
    with transaction.atomic():
        going = (
            AgentDelivery.objects.select_for_update(of=("self",))
            .filter(
                host_id=host_id,
                command_type="apply_updates",
                operation__status__in=PackageOperation.ACTIVE_STATUSES,
            )
            .order_by("created_at")
        )
        for delivery in going:
            if names & {p.get("package_name") for p in delivery.packages or []}:
                if delivery.state != DeliveryState.ACKNOWLEDGED:
                    delivery.state = DeliveryState.ACKNOWLEDGED
                    delivery.acknowledged_at = timezone.now()
                    delivery.save(update_fields=["state", "acknowledged_at"])
                # The agent looks for updates again by itself once done: asking it too
                # would queue a second, minutes-long check ahead of later commands.
                return services.package_operation_record_result(
                    operation_id=delivery.operation_id, host_id=host_id, recheck=False, **outcome
                )
    return False


def fail_oversized(*, host_id: Any, ids: Collection[str], why: str) -> list[services.WorkEnded]:
    """Fail, with ``why``, the work of the deliveries among ``ids`` (found in a
    ``command_result`` too large to take), acknowledging them: the agent has them, and
    they are not to be sent again.  Returns what was failed now."""
    with transaction.atomic():
        found = list(
            AgentDelivery.objects.select_for_update(of=("self",)).filter(
                id__in=ids, host_id=host_id
            )
        )
        for delivery in found:
            if delivery.state != DeliveryState.ACKNOWLEDGED:
                delivery.state = DeliveryState.ACKNOWLEDGED
                delivery.acknowledged_at = timezone.now()
                delivery.save(update_fields=["state", "acknowledged_at"])
        refs = [
            str(d.execution_id or d.operation_id) for d in found if d.execution_id or d.operation_id
        ]
        ended = services.work_fail_oversized(host_id=host_id, refs=refs, why=why)
    return [work for work in ended if work.ended_now]


def fail_undelivered_command(*, execution_id: Any, why: str) -> bool:
    """Fail a command no agent connection took; False if it was sent after all."""
    with transaction.atomic():
        execution = (
            CommandExecution.objects.select_for_update(of=("self",))
            .select_related("host", "requested_by")
            .filter(id=execution_id)
            .first()
        )
        if (
            execution is None
            or execution.status != ExecutionStatus.PENDING
            or AgentDelivery.objects.filter(execution_id=execution_id).exists()
        ):
            return False
        services.command_finish(execution=execution, status=ExecutionStatus.FAILED, error=why)
    return True


def fail_undelivered_operation(*, operation_id: Any, why: str) -> bool:
    """Fail a package operation no agent connection took; False if it was sent."""
    with transaction.atomic():
        operation = (
            PackageOperation.objects.select_for_update(of=("self",)).filter(id=operation_id).first()
        )
        if (
            operation is None
            or operation.status != OperationStatus.PENDING
            or AgentDelivery.objects.filter(operation_id=operation_id).exists()
        ):
            return False
        services.package_operation_record_result(
            operation_id=operation_id,
            host_id=operation.host_id,
            status=OperationStatus.FAILED,
            message=why,
            output="",
        )
    return True


def expire_undelivered() -> int:
    """Fail the commands and operations of SysManage-agent hosts that no connection took
    within ``SYSMANAGE_AGENT_DELIVERY_SECONDS`` (run by the maintenance sweep)."""
    cutoff = timezone.now() - timedelta(seconds=settings.SYSMANAGE_AGENT_DELIVERY_SECONDS)
    why = "Not delivered: the host's agent did not connect in time"
    expired = 0
    for execution_id in CommandExecution.objects.filter(
        host__agent_kind=AgentKind.SYSMANAGE,
        status=ExecutionStatus.PENDING,
        delivery__isnull=True,
        created_at__lt=cutoff,
    ).values_list("id", flat=True):
        expired += fail_undelivered_command(execution_id=execution_id, why=why)
    for operation_id in PackageOperation.objects.filter(
        host__agent_kind=AgentKind.SYSMANAGE,
        status=OperationStatus.PENDING,
        delivery__isnull=True,
        created_at__lt=cutoff,
    ).values_list("id", flat=True):
        expired += fail_undelivered_operation(operation_id=operation_id, why=why)
    return expired


def settle_untaken(kind: WorkKind, ref: str, why: str) -> bool:
    """For work no connection confirmed in time: fail it with ``why`` unless a
    connection took it after all (True), atomically."""
    if kind == "command":
        return not fail_undelivered_command(execution_id=ref, why=why)
    return not fail_undelivered_operation(operation_id=ref, why=why)


def delivery_window() -> float:
    """How long a request waits for a connection to take it: through a reconnect of the
    agent, or until its next poll (``SYSMANAGE_AGENT_DELIVERY_SECONDS``)."""
    return float(settings.SYSMANAGE_AGENT_DELIVERY_SECONDS)


#: How commands and package operations reach SysManage agents (``hosts.delivery``).
POLICY = DeliveryPolicy(window=delivery_window, settle_untaken=settle_untaken)
