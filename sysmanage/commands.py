"""
``command`` messages: a registry of handlers per channel, filled by the apps.

A handler is an async function ``(context, message)`` that replies through
``context.reply`` (a ``response`` with the request's ``id``) or raises
:class:`~sysmanage.protocol.ProtocolError`.  The consumer runs each in its own task.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sysmanage import dbgate
from sysmanage.audit import Actor
from sysmanage.auth import ScopeView
from sysmanage.protocol import (
    ClientMessage,
    ErrorCode,
    ProtocolError,
    ServerMessage,
    error_envelope,
)
from sysmanage.topics import TOPICS

if TYPE_CHECKING:
    from sysmanage.models import User

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommandContext:
    """What a command handler may use: who asked, the connection scope, and a reply hook."""

    user: User
    scope: ScopeView
    reply: Callable[[ServerMessage], None]

    @property
    def ip_address(self) -> str | None:
        """The client's address as the server saw it."""
        client = self.scope.get("client")
        return client[0] if client else None

    @property
    def actor(self) -> Actor:
        """The requester, for the audit trail."""
        return Actor(user=self.user, ip_address=self.ip_address, user_agent=self.user_agent)

    @property
    def user_agent(self) -> str:
        """The client's User-Agent header, if it sent one."""
        for key, value in self.scope.get("headers", ()):
            if key.lower() == b"user-agent":
                return str(value.decode("latin-1"))[:500]
        return ""


CommandHandler = Callable[[CommandContext, ClientMessage], Awaitable[None]]
_HANDLERS: dict[str, CommandHandler] = {}


def register(channel: str, handler: CommandHandler) -> None:
    """Make ``handler`` answer ``command`` messages on ``channel``; refuses duplicates."""
    if channel not in TOPICS:
        raise ValueError(f"unknown channel {channel!r}")
    if channel in _HANDLERS and _HANDLERS[channel] is not handler:
        raise ValueError(f"a command handler for {channel!r} is registered already")
    _HANDLERS[channel] = handler


def handler_for(channel: str | None, id_: str | int | None) -> CommandHandler:
    """The handler for ``channel``, or the protocol error explaining there is none."""
    handler = _HANDLERS.get(channel or "")
    if handler is not None:
        return handler
    if channel in TOPICS:
        raise ProtocolError(
            ErrorCode.INVALID_COMMAND,
            f"Channel '{channel}' takes no commands",
            channel=channel or "system",
            id_=id_,
            command_channels=sorted(_HANDLERS),
        )
    raise ProtocolError(
        ErrorCode.UNKNOWN_CHANNEL,
        f"Unknown channel {str(channel)[:64]!r}" if channel else "Message has no 'channel'",
        id_=id_,
        requested_channel=channel,
        available_channels=sorted(TOPICS),
    )


async def run(handler: CommandHandler, context: CommandContext, message: ClientMessage) -> None:
    """Run one command handler, turning its failures into error envelopes."""
    try:
        await handler(context, message)
    except ProtocolError as exc:
        context.reply(exc.to_envelope())
    except Exception:
        fault = dbgate.log_exception(logger, "command on %s failed", message.channel)
        channel = message.channel or "system"
        context.reply(
            dbgate.socket_error(fault, channel=channel, id_=message.id)
            if fault is not None
            else error_envelope(
                ErrorCode.INTERNAL_ERROR, "Internal server error", channel=channel, id_=message.id
            )
        )
