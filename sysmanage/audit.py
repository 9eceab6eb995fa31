"""
Who did what: the hook through which lower apps report user actions.

Services of ``hosts`` and ``alerts`` describe the acting person with an :class:`Actor`
and call :func:`audit`; the ``activity`` app (higher up) registers the sink that stores
and publishes each record, so lower apps never import it.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from django.db import transaction
from django.http import HttpRequest
from rest_framework.request import Request

if TYPE_CHECKING:
    from sysmanage.models import User

#: A value in the details of an audit record: what its JSON column stores as it is
#: (ids and names as strings, flags, counts).
DetailValue = str | int | float | bool | None
#: The details of an audit record, as the services name them (``host_id``, ``hostname``,
#: ``command``...): display values and ids, never model instances.
AuditDetails = dict[str, DetailValue]


@dataclass(frozen=True)
class Actor:
    """Who acted: a user and where the request came from, or a named system process."""

    user: User | None = None
    username: str = ""
    ip_address: str | None = None
    user_agent: str = ""

    @classmethod
    def command_line(cls, command: str) -> Actor:
        """An administrator acting through ``manage.py command``."""
        return cls(
            username=f"{getpass.getuser()} (manage.py {command})"[:150], user_agent="manage.py"
        )


class AuditSink(Protocol):
    """Records one audit entry (``activity.services.activity_record``)."""

    def __call__(
        self,
        *,
        action: str,
        user: User | None,
        username: str | None,
        ip_address: str | None,
        user_agent: str,
        details: AuditDetails,
    ) -> object:
        """Store the entry (and publish it)."""


_sinks: list[AuditSink] = []


def register_sink(sink: AuditSink) -> None:
    """Register the function that records audit entries (the activity app does)."""
    if sink not in _sinks:
        _sinks.append(sink)


def audit(action: str, actor: Actor | None, **details: DetailValue) -> None:
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


def request_actor(request: HttpRequest | Request) -> Actor:
    """The actor behind an HTTP request (REST API, admin, pages); an anonymous visitor is
    no user."""
    meta = getattr(request, "META", {})
    user = getattr(request, "user", None)
    return Actor(
        user=user if getattr(user, "is_authenticated", False) else None,
        ip_address=meta.get("REMOTE_ADDR"),
        user_agent=meta.get("HTTP_USER_AGENT", "")[:500],
    )
