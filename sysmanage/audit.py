"""
Who did what: the hook through which lower apps report user actions.

Services of ``hosts`` and ``alerts`` describe the acting person with an :class:`Actor`
and call :func:`audit`; the ``activity`` app (higher up) registers the sink that stores
and publishes each record, so lower apps never import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import transaction


@dataclass(frozen=True)
class Actor:
    """Who acted: a user and where the request came from, or a named system process."""

    user: Any = None
    username: str = ""
    ip_address: str | None = None
    user_agent: str = ""

    @classmethod
    def command_line(cls, command: str) -> Actor:
        """An administrator acting through ``manage.py command``."""
        import getpass

        return cls(
            username=f"{getpass.getuser()} (manage.py {command})"[:150], user_agent="manage.py"
        )


AuditSink = Callable[..., Any]
_sinks: list[AuditSink] = []


def register_sink(sink: AuditSink) -> None:
    """Register the function that records audit entries (the activity app does)."""
    if sink not in _sinks:
        _sinks.append(sink)


def audit(action: str, actor: Actor | None, **details: Any) -> None:
    """Record that ``actor`` did ``action``, once the current transaction commits."""
    if actor is None:
        return

    def record() -> None:
        for sink in _sinks:
            sink(
                action=action,
                user=actor.user,
                username=actor.username or None,
                ip_address=actor.ip_address,
                user_agent=actor.user_agent,
                details=details,
            )

    transaction.on_commit(record)


def request_actor(request: Any) -> Actor:
    """The actor behind an HTTP request (REST API, admin, pages)."""
    meta = getattr(request, "META", {})
    return Actor(
        user=getattr(request, "user", None),
        ip_address=meta.get("REMOTE_ADDR"),
        user_agent=meta.get("HTTP_USER_AGENT", "")[:500],
    )
