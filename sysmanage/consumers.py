"""
The client WebSocket endpoint, ``/ws``: the seed protocol for dashboards and clients.

:class:`ClientConsumer` owns one connection: it authenticates it, enforces size and
rate limits, parses each message and hands it to a small handler per message type.
Channels are handled by :mod:`sysmanage.topics`; events arrive through the process's
:class:`~sysmanage.hub.Hub`, never through a per-connection layer channel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, ClassVar

from channels.db import database_sync_to_async
from django.conf import settings

from sysmanage import admission, commands, dbgate, permissions
from sysmanage.auth import SocketCredentials, authenticate_socket, find_token, seconds_until
from sysmanage.connection import Connection
from sysmanage.node import running_hub
from sysmanage.protocol import (
    ClientMessage,
    CloseCode,
    ErrorCode,
    MessageType,
    ProtocolError,
    auth_failed_envelope,
    envelope,
    error_envelope,
    parse_client_message,
    request_id_of,
)
from sysmanage.ratelimit import TokenBucket
from sysmanage.services import session_tag, token_session_tag
from sysmanage.topics import Topic, filter_problem, get_topic, snapshot_provider
from sysmanage.transport import Frame

logger = logging.getLogger(__name__)


class ClientConsumer(Connection):
    """One authenticated client connection speaking the seed protocol."""

    user: Any = None
    #: the Django session a session-authenticated socket was opened with (kept in memory
    #: only: the recheck asks whether it still exists)
    session_key: str | None = None
    #: the credential fingerprint the socket was opened with (``sysmanage.credentials``)
    fingerprint: str | None = None
    #: what the user may see, as read at ``rights_read_at`` (``time.monotonic()``)
    rights: frozenset[str] = frozenset()
    rights_read_at = 0.0
    overflow_reason = "Too many undelivered messages; reconnect and resubscribe"

    async def connect(self) -> None:
        """Called on the handshake: authenticate, then accept (always, to explain refusals)."""
        address = admission.address_key(self.scope)
        blocked = admission.AUTH_FAILURES.blocked_for(address)
        if blocked:
            await self._refuse_blocked(blocked)  # before any database work
            return
        read_at = time.monotonic()
        try:
            credentials = await authenticate_socket(self.scope)
        except Exception as exc:
            fault = dbgate.unavailable(exc)
            if fault is None:
                raise
            dbgate.note(fault, exc)
            await self._accept(find_token(self.scope)[2])
            await self._close_with(CloseCode.TRY_AGAIN_LATER, dbgate.socket_error(fault))
            return
        await self._accept(credentials.subprotocol)
        if credentials.user is None:
            admission.AUTH_FAILURES.record(address)
            await self._refuse(credentials.error or "Invalid or expired JWT token")
            return
        self._adopt(credentials, read_at)
        try:
            self.hub = await running_hub()
        except Exception:
            logger.exception("cannot reach the channel layer; refusing the connection")
            await self._close_with(
                CloseCode.TRY_AGAIN_LATER,
                error_envelope(
                    ErrorCode.SERVICE_UNAVAILABLE,
                    "The server cannot deliver events right now; reconnect later",
                ),
            )
            return
        # No await between counting and registering: the cap cannot be raced past.
        if admission.over_user_limit(len(self.hub.by_user.get(self.user_id or "", ()))):
            await self._refuse_over_limit()
            return
        self.hub.register(self)
        delay = seconds_until(credentials.expires_at)
        self.expiry_timer = (
            asyncio.get_running_loop().call_later(delay, self._token_expired)
            if delay is not None
            else None
        )

    def _adopt(self, credentials: SocketCredentials, read_at: float) -> None:
        """Take on the authenticated user, and set up this connection's limits."""
        self.user = credentials.user
        self.user_id = str(self.user.pk)
        self.auth_via = credentials.via
        self.fingerprint = credentials.fingerprint
        self.rights, self.rights_read_at = credentials.rights, read_at
        session = self.scope.get("session")
        if credentials.via == "session" and session is not None and session.session_key:
            self.session_tag = session_tag(session.session_key)
            self.session_key = session.session_key
        elif credentials.token_session is not None:
            self.session_tag = token_session_tag(credentials.token_session)
        self.bucket = TokenBucket(settings.WS_RATE_LIMIT_PER_SECOND, settings.WS_RATE_LIMIT_BURST)

    async def _refuse_blocked(self, seconds: float) -> None:
        """Turn away an address with too many failed authentications, unchecked."""
        await self._accept(None)
        await self._close_with(
            CloseCode.AUTH_BLOCKED,
            error_envelope(
                ErrorCode.TOO_MANY_AUTH_FAILURES,
                "Too many failed authentications from this address; try again later",
                retry_after=admission.retry_after(seconds),
            ),
        )

    async def _refuse_over_limit(self) -> None:
        """Turn away a user who holds the most sockets allowed in this process."""
        limit = settings.WS_MAX_SOCKETS_PER_USER
        await self._close_with(
            CloseCode.TOO_MANY_CONNECTIONS,
            error_envelope(
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"Too many open connections for this user (at most {limit}); close some first",
                limit=limit,
            ),
        )

    async def disconnect(self, code: int) -> None:
        """Called when the socket closes: drop subscriptions, timers and running tasks."""
        if self.hub is not None:
            self.hub.unregister(self)
        timer = getattr(self, "expiry_timer", None)
        if timer is not None:
            timer.cancel()
        self._release()

    # -- sending ----------------------------------------------------------------------

    def deliver(self, frame: Frame) -> None:
        """Called by the hub with an event frame; never blocks."""
        if not self.closing and self.outbound is not None:
            self.outbound.deliver(frame)

    def _before_close(self) -> None:
        """The socket gets no more events once closing starts."""
        if self.hub is not None:
            self.hub.unregister(self)

    def _close_reason(self, message: Mapping[str, Any]) -> str | None:
        """The error code of ``message``, for the close frame of a client that stopped
        reading."""
        code = message["data"].get("code")
        return str(code) if code is not None else None

    async def _refuse(self, why: str) -> None:
        await self._close_with(CloseCode.AUTH_FAILED, auth_failed_envelope(why))

    def update_rights(self, rights: frozenset[str], *, read_at: float) -> None:
        """Called with the user's rights as read from the database at ``read_at``: keep
        them (unless newer ones were read since) and end each subscription that needs a
        right no longer held."""
        if self.closing or self.hub is None or read_at < self.rights_read_at:
            return
        self.rights, self.rights_read_at = rights, read_at
        for channel in permissions.CHANNEL_RIGHTS:
            if permissions.channel_lost(channel, rights) and self.hub.unsubscribe(self, channel):
                self.reply(
                    error_envelope(
                        ErrorCode.SUBSCRIPTION_REVOKED,
                        f"Subscription to '{channel}' ended: you no longer have permission "
                        "for this channel",
                        channel=channel,
                        requested_channel=channel,
                    )
                )

    def _token_expired(self) -> None:
        if not self.closing:
            self.closing = True
            self._spawn(
                self._close_with(CloseCode.AUTH_FAILED, auth_failed_envelope("JWT token expired"))
            )

    def _log_overflow(self) -> None:
        logger.warning("closing a client that stopped reading (user %s)", self.user_id)

    # -- receiving ----------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Called for each client frame: check limits, parse, dispatch by type."""
        if self.user is None or self.closing:
            return
        if text_data is not None and (
            len(text_data) > settings.WS_MAX_MESSAGE_BYTES
            or len(text_data.encode("utf-8")) > settings.WS_MAX_MESSAGE_BYTES
        ):
            await self._close_with(
                CloseCode.MESSAGE_TOO_BIG,
                error_envelope(
                    ErrorCode.MESSAGE_TOO_LARGE,
                    f"Message exceeds {settings.WS_MAX_MESSAGE_BYTES} bytes",
                ),
            )
            return
        if not await self._within_rate(text_data):
            return
        if text_data is None:
            self.reply(
                error_envelope(
                    ErrorCode.INVALID_MESSAGE, "Binary frames are not supported; send JSON text"
                )
            )
            return
        try:
            message = parse_client_message(text_data)
            await self.HANDLERS[message.type](self, message)
        except ProtocolError as exc:
            self.reply(exc.to_envelope())
        except Exception:
            fault = dbgate.log_exception(logger, "error handling a client message")
            self.reply(
                dbgate.socket_error(fault, id_=request_id_of(text_data))
                if fault is not None
                else error_envelope(ErrorCode.INTERNAL_ERROR, "Internal server error")
            )

    async def on_ping(self, message: ClientMessage) -> None:
        """Answer an application-level ping with a pong carrying the same id."""
        self.reply(envelope(MessageType.PONG, message.channel or "system", {}, id_=message.id))

    async def on_subscribe(self, message: ClientMessage) -> None:
        """Subscribe (or re-subscribe with new filters) and confirm the filters in force."""
        topic = get_topic(message.channel, message.id)
        read_at = time.monotonic()
        denied, rights = await database_sync_to_async(_authorize_now)(topic, self.user)
        if rights is not None:
            self.update_rights(rights, read_at=read_at)
        if denied:
            raise ProtocolError(
                ErrorCode.SUBSCRIPTION_FAILED,
                denied,
                channel="subscription",
                id_=message.id,
                requested_channel=topic.name,
            )
        filters = topic.clean_filters(message.filters, message.id)
        problem = await database_sync_to_async(filter_problem)(filters)
        if problem:
            raise ProtocolError(
                ErrorCode.INVALID_FILTERS,
                problem,
                channel="subscription",
                id_=message.id,
                requested_channel=topic.name,
            )
        assert self.hub is not None
        self.hub.subscribe(self, topic.name, filters)
        self.reply(
            envelope(
                MessageType.RESPONSE,
                topic.name,
                {
                    "action": "subscribe",
                    "status": "subscribed",
                    "channel": topic.name,
                    "filters": _jsonable(filters),
                },
                id_=message.id,
            )
        )
        provider = snapshot_provider(topic.name) if topic.sends_initial_state else None
        if provider is not None:
            state = await database_sync_to_async(provider)(filters)
            self.reply(envelope(MessageType.STATUS, topic.name, state, id_=message.id))

    async def on_unsubscribe(self, message: ClientMessage) -> None:
        """Unsubscribe; answering even when there was no subscription (it is idempotent)."""
        topic = get_topic(message.channel, message.id)
        assert self.hub is not None
        was = self.hub.unsubscribe(self, topic.name)
        self.reply(
            envelope(
                MessageType.RESPONSE,
                topic.name,
                {
                    "action": "unsubscribe",
                    "status": "unsubscribed",
                    "channel": topic.name,
                    "was_subscribed": was,
                },
                id_=message.id,
            )
        )

    async def on_command(self, message: ClientMessage) -> None:
        """Run a channel command in its own task so that long commands block nothing."""
        handler = commands.handler_for(message.channel, message.id)
        context = commands.CommandContext(user=self.user, scope=self.scope, reply=self.reply)
        self._spawn(commands.run(handler, context, message))

    #: by message type (``parse_client_message`` lets through only the types below)
    HANDLERS: ClassVar[
        dict[str, Callable[[ClientConsumer, ClientMessage], Coroutine[Any, Any, None]]]
    ] = {
        MessageType.PING: on_ping,
        MessageType.SUBSCRIBE: on_subscribe,
        MessageType.UNSUBSCRIBE: on_unsubscribe,
        MessageType.COMMAND: on_command,
    }


def _authorize_now(topic: Topic, user: Any) -> tuple[str | None, frozenset[str] | None]:
    """Whether the user, as the database has it now, may subscribe to ``topic`` (None, or
    why not), and the user's socket rights now (None if the user is gone)."""
    now = permissions.fresh(user)
    return topic.authorize(now), (permissions.socket_rights(now) if now is not None else None)


def _jsonable(filters: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in filters.items()}
