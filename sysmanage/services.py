"""Core services."""
from __future__ import annotations

import hashlib

from sysmanage.events import publish_control
from sysmanage.protocol import CloseCode


def session_tag(session_key: str) -> str:
    """A name for a Django session that does not reveal its key (keys are credentials)."""
    return hashlib.sha256(session_key.encode()).hexdigest()[:32]


def user_sessions_revoke(*, user_id: str, reason: str) -> None:
    """Close every open WebSocket of ``user_id`` in every server process, after commit."""
    publish_control("close_user", user_id=user_id, reason=reason,
                    code=int(CloseCode.AUTH_FAILED))


def session_sockets_close(*, session_key: str, reason: str) -> None:
    """Close every open WebSocket authenticated by this Django session, after commit."""
    publish_control("close_session", session=session_tag(session_key), reason=reason,
                    code=int(CloseCode.AUTH_FAILED))
