"""
The client WebSocket endpoint, ``/ws``: the seed protocol for dashboards and clients.

:class:`ClientConsumer` owns one connection: it authenticates it, enforces size and
rate limits, parses each message and hands it to a small handler per message type.
Channels are handled by :mod:`sysmanage.topics`; events arrive through the process's
:class:`~sysmanage.hub.Hub`, never through a per-connection layer channel.

A socket opened with an access token follows that token's life: it is warned before the
token expires (status ``token_expiring``), may hand over a new token of the same user at
any time (``refresh``), and after expiry waits ``WS_TOKEN_GRACE_SECONDS`` for one --
keeping its subscriptions, but refused new ones and commands -- before it is closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

from django.conf import settings

from sysmanage import admission, commands, dbgate, permissions
from sysmanage.auth import (
    SocketCredentials,
    authenticate_socket,
    find_token,
    token_credentials,
    warning_lead,
)
from sysmanage.connection import Connection
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.node import running_hub
from sysmanage.protocol import (
    ALL_HOSTS,
    ClientMessage,
    CloseCode,
    ErrorCode,
    MessageType,
    ProtocolError,
    auth_failed_envelope,
    envelope,
    error_envelope,
    iso,
    parse_client_message,
    refresh_token_of,
    request_id_of,
)
from sysmanage.ratelimit import TokenBucket
from sysmanage.services import session_tag, token_session_tag
from sysmanage.topics import (
    Filters,
    SnapshotProvider,
    Topic,
    Viewer,
    filter_problem,
    get_topic,
    snapshot_provider,
)
from sysmanage.transport import Frame

logger = logging.getLogger(__name__)

#: The ``event`` of the ``status`` that warns a socket its access token expires soon.
TOKEN_EXPIRING = "token_expiring"  # noqa: S105 - an event name, not a secret
#: What a socket whose token expired may not do until it sends a ``refresh``.
NEEDS_VALID_TOKEN = frozenset({MessageType.SUBSCRIBE, MessageType.COMMAND})


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
    #: the hosts the user sees (None: every host), read with the rights.  Most sockets see
    #: every host: the class holds that answer, and a socket stores its own only when it
    #: sees some hosts (one attribute less per socket).  A socket subscribes only once
    #: :meth:`_adopt` has set it.
    host_scope: permissions.HostScope = None
    #: the access token's expiry (epoch seconds); None for session sockets
    expires_at: float | None = None
    #: the expiry a ``token_expiring`` warning was sent for (one warning per token)
    warned_for: float | None = None
    #: the token expired: the socket waits for a ``refresh`` until the grace ends
    in_grace = False
    #: the next step of the token's life: the warning, the expiry, or the end of grace
    expiry_timer: asyncio.TimerHandle | None = None
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
        self._follow_token(credentials.expires_at, credentials.issued_at)

    def _adopt(self, credentials: SocketCredentials, read_at: float) -> None:
        """Take on the authenticated user, and set up this connection's limits."""
        self.user = credentials.user
        self.user_id = str(self.user.pk)
        self.auth_via = credentials.via
        self.fingerprint = credentials.fingerprint
        self.rights, self.rights_read_at = credentials.rights, read_at
        if credentials.scope is not None:
            self.host_scope = credentials.scope
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
        if self.expiry_timer is not None:
            self.expiry_timer.cancel()
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

    def update_rights(
        self, rights: frozenset[str], *, read_at: float, scope: permissions.HostScope
    ) -> None:
        """Called with the user's rights and the hosts they see, as read from the database
        at ``read_at``: keep them (unless newer ones were read since) and end each
        subscription that needs a right no longer held, or names a host no longer seen."""
        if self.closing or self.hub is None or read_at < self.rights_read_at:
            return
        self.rights, self.rights_read_at = rights, read_at
        for channel, subscribers in list(self.hub.subscriptions.items()):
            filters = subscribers.get(self)
            if filters is None:
                continue
            if permissions.subscription_lost(channel, filters, rights):
                why = "you no longer have permission for this channel"
            elif not permissions.in_scope(scope, filters.get("host_id")):
                why = "you can no longer see its host"
            else:
                continue
            if self.hub.unsubscribe(self, channel):
                self.reply(
                    error_envelope(
                        ErrorCode.SUBSCRIPTION_REVOKED,
                        f"Subscription to '{channel}' ended: {why}",
                        channel=channel,
                        requested_channel=channel,
                    )
                )
        self.hub.rescope(self, scope)

    # -- the access token's life ---------------------------------------------------------

    def _follow_token(self, expires_at: float | None, issued_at: float | None) -> None:
        """Arm the timers of a (new) access token: the warning, unless this token had
        one, then its expiry."""
        if self.expiry_timer is not None:
            self.expiry_timer.cancel()
            self.expiry_timer = None
        self.expires_at, self.in_grace = expires_at, False
        if expires_at is None:
            return
        lead = warning_lead(expires_at, issued_at, time.time())
        if lead > 0 and self.warned_for != expires_at:
            self._at(expires_at - lead, self._warn_expiring)
        else:
            self._at(expires_at, self._token_expired)

    def _at(self, when: float, step: Callable[[], None]) -> None:
        """Run ``step`` at ``when`` (epoch seconds; at once if that is past)."""
        delay = max(0.0, when - time.time())
        self.expiry_timer = asyncio.get_running_loop().call_later(delay, step)

    def _warn_expiring(self) -> None:
        """Tell the client its token expires soon, so that it sends a ``refresh``."""
        if self.closing or self.expires_at is None:
            return
        seconds_left = round(max(0.0, self.expires_at - time.time()))
        self.warned_for = self.expires_at
        self.reply(
            envelope(
                MessageType.STATUS,
                "system",
                {
                    "event": TOKEN_EXPIRING,
                    "expires_at": _iso_epoch(self.expires_at),
                    "seconds_left": seconds_left,
                    "message": f"The access token expires in {seconds_left} s; send a "
                    "'refresh' with a new access token to keep this connection",
                },
            )
        )
        self._at(self.expires_at, self._token_expired)

    def _token_expired(self) -> None:
        """The token expired: wait out the grace for a ``refresh``, or close at once."""
        if self.closing or self.expires_at is None:
            return
        grace = settings.WS_TOKEN_GRACE_SECONDS
        if grace > 0:
            self.in_grace = True
            self._at(self.expires_at + grace, self._grace_over)
        else:
            self._grace_over()

    def _grace_over(self) -> None:
        """No ``refresh`` came in time: close the socket (4001)."""
        if not self.closing:
            self.closing = True
            self._spawn(
                self._close_with(CloseCode.AUTH_FAILED, auth_failed_envelope("JWT token expired"))
            )

    def _check_token(self, message: ClientMessage) -> None:
        """In the grace period, refuse what needs a valid token (``refresh`` still helps)."""
        if self.in_grace and self.expires_at is not None and message.type in NEEDS_VALID_TOKEN:
            raise ProtocolError(
                ErrorCode.TOKEN_EXPIRED,
                "The access token expired; send a 'refresh' with a new access token first",
                id_=message.id,
                action="refresh",
                grace_ends_at=_iso_epoch(self.expires_at + settings.WS_TOKEN_GRACE_SECONDS),
            )

    def _take_token(self, credentials: SocketCredentials, read_at: float) -> None:
        """Make a verified token of the socket's own user the socket's credentials: its
        fingerprint and sign-in (what the recheck and a token logout go by), the rights
        read with it, and its expiry."""
        assert self.hub is not None
        self.user = credentials.user
        self.fingerprint = credentials.fingerprint
        session = credentials.token_session
        self.hub.retag(self, token_session_tag(session) if session is not None else None)
        self.update_rights(credentials.rights, read_at=read_at, scope=credentials.scope)
        self._follow_token(credentials.expires_at, credentials.issued_at)

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
            self._check_token(message)
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
        try:
            filters: Filters | None = topic.clean_filters(message.filters, message.id)
            invalid = None
        except ProtocolError as exc:  # told after a refusal, as the checks go in order
            filters, invalid = None, exc
        read_at = time.monotonic()
        # One trip to the database threads: the user now, and the filters' own check.
        denied, rights, scope, problem = await database_sync_to_async(_authorize_now)(
            topic, self.user, filters
        )
        if rights is not None:
            self.update_rights(rights, read_at=read_at, scope=scope)
        if not denied and filters is not None and not problem:
            # A recheck read after this subscribe's read may have narrowed the socket
            # meanwhile: the newest rights and hosts decide.
            denied, problem = _still_allowed(topic, filters, self.rights, self.host_scope)
        if denied:
            raise _subscription_error(ErrorCode.SUBSCRIPTION_FAILED, denied, message, topic)
        if invalid is not None:
            raise invalid
        assert filters is not None
        denied = permissions.filters_denied_reason(topic.name, filters, self.rights)
        if denied:
            raise _subscription_error(ErrorCode.SUBSCRIPTION_FAILED, denied, message, topic)
        if problem:
            raise _subscription_error(ErrorCode.INVALID_FILTERS, problem, message, topic)
        if topic.all_hosts(filters):
            self._subscribe_all_hosts(topic, filters, message)
            return
        hub = self.hub
        assert hub is not None
        answer: dict[str, Any] = {
            "action": "subscribe",
            "status": "subscribed",
            "channel": topic.name,
            "filters": _jsonable(filters),
        }
        recovered = False
        if message.since is None:
            hub.subscribe(self, topic.name, filters)
            head = hub.head(topic.name)
            if head is not None:
                answer["position"] = head.to_json()
            self.reply(envelope(MessageType.RESPONSE, topic.name, answer, id_=message.id))
        else:
            # Live events wait from here until the missed ones are sent (hub.release).
            head = None
            try:
                recovered, head, missed = await hub.resume(self, topic.name, filters, message.since)
                if hub.subscriptions[topic.name].get(self) is not filters:
                    # ended while the history was read (a right or the host taken away)
                    denied, problem = _still_allowed(topic, filters, self.rights, self.host_scope)
                    raise _subscription_error(
                        ErrorCode.INVALID_FILTERS if problem else ErrorCode.SUBSCRIPTION_FAILED,
                        problem or denied or f"Subscription to '{topic.name}' ended",
                        message,
                        topic,
                    )
                answer["recovered"] = recovered
                if head is not None:
                    answer["position"] = head.to_json()
                response = envelope(MessageType.RESPONSE, topic.name, answer, id_=message.id)
                if recovered and not self.closing:
                    # the response and the missed events in one write
                    hub.replay(
                        self, topic.name, filters, missed, first=Frame(self.encode(response))
                    )
                else:
                    self.reply(response)
            except ProtocolError:
                raise
            except Exception:
                hub.unsubscribe(self, topic.name)
                logger.exception("could not read the history of %s", topic.name)
                raise ProtocolError(
                    ErrorCode.SERVICE_UNAVAILABLE,
                    "The channel's history cannot be read right now; subscribe again later",
                    channel="subscription",
                    id_=message.id,
                    requested_channel=topic.name,
                ) from None
            finally:
                hub.release(self, topic.name, head)
        # Figures counted over some hosts are not on the channel's stream: a resumed
        # subscription gets them now, as a new one does.
        scoped = topic.scoped_figures and self.host_scope is not None
        provider = (
            snapshot_provider(topic.name)
            if topic.sends_initial_state and (not recovered or scoped)
            else None
        )
        if provider is not None:
            await self._send_snapshot(provider, topic, filters, message)

    async def _send_snapshot(
        self, provider: SnapshotProvider, topic: Topic, filters: Filters, message: ClientMessage
    ) -> None:
        """Send the current state of a subscription as this socket's user sees it.  Read
        again if a recheck changed the hosts the socket sees while it was read; nothing
        if the subscription ended meanwhile (a right or its host taken away)."""
        hub = self.hub
        assert hub is not None
        for _ in range(3):
            viewer = Viewer(self.user_id, self.rights, self.host_scope)
            state = await database_sync_to_async(provider)(filters, viewer)
            if hub.subscriptions[topic.name].get(self) is not filters:
                return
            if viewer.scope == self.host_scope and viewer.rights == self.rights:
                self.reply(envelope(MessageType.STATUS, topic.name, state, id_=message.id))
                return

    def _subscribe_all_hosts(self, topic: Topic, filters: Filters, message: ClientMessage) -> None:
        """Subscribe to the summary of every host (``sysmanage.summary``).  It has no place
        on the channel's stream, so it is not resumable: a ``since`` is answered
        ``recovered: false``.  The latest report of every host follows as the ``status``."""
        hub = self.hub
        assert hub is not None
        hub.subscribe(self, topic.name, filters)
        answer: dict[str, Any] = {
            "action": "subscribe",
            "status": "subscribed",
            "channel": topic.name,
            "filters": _jsonable(filters),
        }
        if message.since is not None:
            answer["recovered"] = False
        self.reply(envelope(MessageType.RESPONSE, topic.name, answer, id_=message.id))
        snapshot = hub.summaries[topic.name].snapshot(
            filters,
            max_hosts=settings.WS_FLEET_METRICS_MAX_HOSTS,
            max_bytes=settings.WS_FLEET_METRICS_MAX_BYTES,
            id_=message.id,
        )
        self.send_text(snapshot.text)

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

    async def on_refresh(self, message: ClientMessage) -> None:
        """Take a new access token of the same user without reconnecting; any other
        token -- invalid, expired, revoked, another user's -- closes the socket (4001)."""
        if self.auth_via == "session":
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE,
                "This connection is authenticated by its session; nothing to refresh",
                id_=message.id,
            )
        raw = refresh_token_of(message)
        read_at = time.monotonic()
        credentials = await database_sync_to_async(token_credentials)(raw, self.auth_via)
        if self.closing:
            return
        if credentials.user is None or str(credentials.user.pk) != self.user_id:
            why = credentials.error or "The new access token belongs to another user"
            logger.info("refused a token refresh on a socket of user %s: %s", self.user_id, why)
            await self._close_with(CloseCode.AUTH_FAILED, auth_failed_envelope(why, id_=message.id))
            return
        self._take_token(credentials, read_at)
        self.reply(
            envelope(
                MessageType.RESPONSE,
                message.channel or "system",
                {
                    "action": "refresh",
                    "status": "refreshed",
                    "expires_at": _iso_epoch(self.expires_at),
                },
                id_=message.id,
            )
        )

    #: by message type (``parse_client_message`` lets through only the types below)
    HANDLERS: ClassVar[
        dict[str, Callable[[ClientConsumer, ClientMessage], Coroutine[Any, Any, None]]]
    ] = {
        MessageType.PING: on_ping,
        MessageType.SUBSCRIBE: on_subscribe,
        MessageType.UNSUBSCRIBE: on_unsubscribe,
        MessageType.COMMAND: on_command,
        MessageType.REFRESH: on_refresh,
    }


def _authorize_now(
    topic: Topic, user: Any, filters: Filters | None
) -> tuple[str | None, frozenset[str] | None, permissions.HostScope, str | None]:
    """Whether the user, as the database has it now, may subscribe to ``topic`` (None, or
    why not), the user's socket rights and the hosts they see now (rights None if the
    user is gone), and what the database says of ``filters``
    (:func:`~sysmanage.topics.filter_problem`; None if they are fine or were not valid to
    begin with).  A host the user does not see is answered as one that does not exist."""
    now = permissions.fresh(user)
    denied = topic.authorize(now)
    rights = permissions.socket_rights(now) if now is not None else None
    scope = permissions.host_scope(now) if now is not None else frozenset()
    problem = filter_problem(filters, now) if filters is not None and denied is None else None
    if problem is None and filters is not None and denied is None:
        host_id = filters.get("host_id")
        if host_id != ALL_HOSTS and not permissions.in_scope(scope, host_id):
            problem = f"Filter 'host_id': no host with id {host_id}"
    return denied, rights, scope, problem


def _still_allowed(
    topic: Topic, filters: Filters, rights: frozenset[str], scope: permissions.HostScope
) -> tuple[str | None, str | None]:
    """Whether a socket with ``rights`` that sees ``scope`` may keep a subscription to
    ``topic`` with ``filters``: (why not for lack of the channel's right, why not for
    its host).  The rights its filters need are checked apart, with their own words
    (:func:`~sysmanage.permissions.filters_denied_reason`)."""
    if permissions.subscription_lost(topic.name, {}, rights):
        return f"Insufficient permissions for channel '{topic.name}'", None
    host_id = filters.get("host_id")
    if host_id != ALL_HOSTS and not permissions.in_scope(scope, host_id):
        return None, f"Filter 'host_id': no host with id {host_id}"
    return None, None


def _subscription_error(
    code: ErrorCode, why: str, message: ClientMessage, topic: Topic
) -> ProtocolError:
    """The refusal of a subscribe."""
    return ProtocolError(
        code, why, channel="subscription", id_=message.id, requested_channel=topic.name
    )


def _iso_epoch(seconds: float | None) -> str | None:
    """Epoch seconds as the protocol's ISO-8601 UTC timestamp."""
    return iso(datetime.fromtimestamp(seconds, UTC)) if seconds is not None else None


def _jsonable(filters: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in filters.items()}
