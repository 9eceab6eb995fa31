"""Core services."""
from __future__ import annotations

from sysmanage.events import publish_control
from sysmanage.protocol import CloseCode


def user_sessions_revoke(*, user_id: str, reason: str) -> None:
    """Close every open WebSocket of ``user_id`` in every server process, after commit."""
    publish_control("close_user", user_id=user_id, reason=reason,
                    code=int(CloseCode.AUTH_FAILED))
