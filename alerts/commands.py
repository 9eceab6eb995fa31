"""``command`` messages on ``system_alerts``: acknowledge or resolve an alert."""

from __future__ import annotations

from typing import Any

from alerts import services
from alerts.models import Alert
from sysmanage import permissions
from sysmanage.commands import CommandContext
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.protocol import ClientMessage, ErrorCode, MessageType, ProtocolError, envelope
from sysmanage.topics import parse_uuid

ACTIONS: dict[str, services.AlertTransition] = {
    "acknowledge": services.alert_acknowledge,
    "resolve": services.alert_resolve,
}


async def handle_alert_command(context: CommandContext, message: ClientMessage) -> None:
    """``{"action": "acknowledge"|"resolve", "alert_id": ...}`` → a ``response``."""
    action = message.data.get("action")
    if action not in ACTIONS:
        raise ProtocolError(
            ErrorCode.INVALID_COMMAND,
            "'action' must be acknowledge or resolve",
            channel="system_alerts",
            id_=message.id,
        )
    try:
        alert_id = parse_uuid(message.data.get("alert_id"))
    except ValueError as exc:
        raise ProtocolError(
            ErrorCode.INVALID_COMMAND, f"'alert_id' {exc}", channel="system_alerts", id_=message.id
        ) from None
    # As the database has the user now: the socket's user object is from connect time.
    allowed = await database_sync_to_async(_may_manage)(context.user, alert_id)
    if allowed is None:
        raise ProtocolError(
            ErrorCode.COMMAND_FAILED,
            "Alert not found",
            channel="system_alerts",
            id_=message.id,
            alert_id=alert_id,
        )
    if not allowed:
        raise ProtocolError(
            ErrorCode.PERMISSION_DENIED,
            "You do not have permission to manage alerts",
            channel="system_alerts",
            id_=message.id,
        )
    try:
        alert = await database_sync_to_async(ACTIONS[action])(
            alert_id=alert_id, actor=context.actor
        )
    except Alert.DoesNotExist:
        raise ProtocolError(
            ErrorCode.COMMAND_FAILED,
            "Alert not found",
            channel="system_alerts",
            id_=message.id,
            alert_id=alert_id,
        ) from None
    except services.AlertStateError as exc:
        raise ProtocolError(
            ErrorCode.COMMAND_FAILED,
            str(exc).capitalize(),
            channel="system_alerts",
            id_=message.id,
            alert_id=alert_id,
        ) from None
    context.reply(
        envelope(
            MessageType.RESPONSE,
            "system_alerts",
            {
                "action": action,
                "alert_id": str(alert.id),
                "status": alert.status,
                "severity": alert.severity,
                "title": alert.title,
            },
            id_=message.id,
        )
    )


def _may_manage(user: Any, alert_id: str) -> bool | None:
    """Whether ``user``, as the database has them now, may acknowledge or resolve the
    alert: on its host (or, for an alert about no host, everywhere).  None when there is
    no such alert, or it is about a host the user does not see; someone who may manage
    alerts nowhere is refused whatever the alert."""
    now = permissions.fresh(user)
    if not permissions.holds(now, "manage_alert") and not permissions.may_anywhere(
        now, "manage_alert"
    ):
        return False  # refused whatever the alert
    row = Alert.objects.filter(pk=alert_id).values("host_id").first()
    if row is None:
        return None
    host_id = row["host_id"]
    if host_id is None:
        return permissions.holds(now, "manage_alert")
    if not permissions.may_on_host(now, "view", host_id):
        return None
    return permissions.may_on_host(now, "manage_alert", host_id)
