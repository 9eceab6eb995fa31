"""``command`` messages on ``system_alerts``: acknowledge or resolve an alert."""

from __future__ import annotations

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
    if not await database_sync_to_async(permissions.holds_now)(context.user, "manage_alert"):
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
