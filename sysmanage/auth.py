"""
Authentication of WebSocket connections.

A client proves who it is with an access JWT in one of three places: the ``token``
query parameter (as the seed document shows), a ``Sec-WebSocket-Protocol`` offer
(``["bearer", TOKEN]`` or ``"bearer.TOKEN"``, for clients that keep tokens out of URLs),
or an ``Authorization: Bearer`` header (non-browser clients).  Without a token, a
logged-in Django session authenticates same-origin pages.  A token that is present but
bad never falls back to the session.  A token must also carry the fingerprint of its
user's current credentials (:mod:`sysmanage.credentials`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast
from urllib.parse import parse_qs, urlsplit

from asgiref.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from channels.auth import UserLazyObject
from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser
from django.contrib.sessions.backends.base import SessionBase, UpdateError
from django.core.exceptions import ValidationError
from django.db import InterfaceError, OperationalError
from django.http import parse_cookie
from django.utils.crypto import constant_time_compare
from django.utils.functional import LazyObject
from rest_framework_simplejwt.exceptions import TokenError
from rest_framework_simplejwt.settings import api_settings
from rest_framework_simplejwt.tokens import AccessToken

from sysmanage import dbgate, permissions
from sysmanage.credentials import (
    REVOKED_MESSAGE,
    SESSION_CLAIM,
    decode,
    fingerprint,
    fingerprint_matches,
)
from sysmanage.dbthreads import database_sync_to_async

if TYPE_CHECKING:
    from sysmanage.models import User

#: The subprotocol the server selects when a client offered a bearer token that way.
BEARER_SUBPROTOCOL = "bearer"

#: Where a socket's credentials came from.
TokenSource = Literal["query", "subprotocol", "header", "session"]
#: An ASGI connection scope as this module reads it: the keys of the ASGI specification
#: plus those that servers and middleware add (``user``, ``session``).
ScopeView = Mapping[str, Any]
#: What the routes wrap: an ASGI application.  Any, because channels' stubs type their
#: middleware stacks as a union that includes ASGI 2 (single-callable) applications,
#: which nothing here could call with ``(scope, receive, send)``.
ASGIApp = Any

#: Refuses a handshake with HTTP 403 (channels' denier, as an ASGI application).
_deny = WebsocketDenier.as_asgi()
#: The scope key of a database fault met reading (or bringing over to the current secret
#: key) the handshake's session: :func:`authenticate_socket` raises it for a socket that
#: has no token, so that the consumer answers it as it answers any database fault.
SESSION_FAULT = "sysmanage.session_fault"


@dataclass(frozen=True)
class SocketCredentials:
    """Who a connection belongs to, or why it does not belong to anyone.

    ``fingerprint`` is the credential fingerprint the socket was opened with (the
    token's claim, or the session user's); the periodic recheck closes the socket when
    the user's fingerprint no longer matches it.
    """

    user: User | None = None
    via: TokenSource | None = None
    expires_at: float | None = None
    subprotocol: str | None = None
    error: str | None = None
    fingerprint: str | None = None
    rights: frozenset[str] = frozenset()
    #: the hosts the user sees (None: every host)
    scope: permissions.HostScope = None
    #: the sign-in the access token descends from (closed by a token logout)
    token_session: str | None = None
    #: when the access token was issued (its ``iat``, epoch seconds)
    issued_at: float | None = None


def _header(scope: ScopeView, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _offered_subprotocols(scope: ScopeView) -> list[str]:
    return [p.strip() for p in scope.get("subprotocols", ()) if p and p.strip()]


def find_token(scope: ScopeView) -> tuple[str | None, TokenSource | None, str | None]:
    """Return ``(token, where, subprotocol_to_select)``; token None when none was sent."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get("token"):
        return query["token"][0], "query", None
    offered = _offered_subprotocols(scope)
    for index, proto in enumerate(offered):
        if proto.lower().startswith(BEARER_SUBPROTOCOL + "."):
            return proto[len(BEARER_SUBPROTOCOL) + 1 :], "subprotocol", proto
        if proto.lower() == BEARER_SUBPROTOCOL and index + 1 < len(offered):
            return offered[index + 1], "subprotocol", BEARER_SUBPROTOCOL
    authorization = _header(scope, b"authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip(), "header", None
        return "", "header", None
    return None, None, None


def bearer_token(scope: ScopeView) -> str | None:
    """The token of an ``Authorization: Bearer`` header (agents), or None."""
    authorization = _header(scope, b"authorization")
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    return credentials.strip() or None if scheme.lower() == "bearer" else None


class AccessCheck(NamedTuple):
    """What an access JWT proved: a user (and when the token expires), or why not."""

    user: User | None
    expires_at: float | None = None
    error: str | None = None
    #: the sign-in the token descends from (``SESSION_CLAIM``), if it was made from one
    session: str | None = None
    issued_at: float | None = None


def user_for_access_token(raw: str) -> AccessCheck:
    """Validate an access JWT: the user it names, as they are now, or why it is refused."""
    invalid = AccessCheck(None, error="Invalid or expired JWT token")
    try:
        token = decode(AccessToken, raw)
    except TokenError:
        return invalid
    claim = str(api_settings.USER_ID_CLAIM)
    user_id = token.payload.get(claim)
    user_model = get_user_model()
    if not isinstance(user_id, str):
        return invalid
    try:
        user = user_model.objects.get(pk=user_id)
    except (user_model.DoesNotExist, ValueError, TypeError):
        return invalid
    if not user.is_active:
        return AccessCheck(None, error="User account is disabled")
    if not fingerprint_matches(token.payload, user):
        return AccessCheck(None, error=REVOKED_MESSAGE)
    exp = token.payload.get("exp")
    iat = token.payload.get("iat")
    session = token.payload.get(SESSION_CLAIM)
    return AccessCheck(
        user,
        expires_at=float(exp) if exp is not None else None,
        session=session if isinstance(session, str) else None,
        issued_at=float(iat) if isinstance(iat, int | float) else None,
    )


def token_credentials(
    raw: str, via: TokenSource | None, subprotocol: str | None = None
) -> SocketCredentials:
    """What an access JWT gives a socket, checked as :func:`user_for_access_token` does
    (database thread): at the handshake, and for an in-band ``refresh``."""
    check = user_for_access_token(raw)
    if check.user is None:
        return SocketCredentials(via=via, subprotocol=subprotocol, error=check.error)
    rights = permissions.socket_rights(check.user)
    scope = permissions.host_scope(check.user)
    permissions.forget_permissions(check.user)  # the socket keeps the user, not these
    return SocketCredentials(
        user=check.user,
        via=via,
        expires_at=check.expires_at,
        subprotocol=subprotocol,
        fingerprint=fingerprint(check.user),
        rights=rights,
        scope=scope,
        token_session=check.session,
        issued_at=check.issued_at,
    )


@database_sync_to_async
def authenticate_socket(scope: ScopeView) -> SocketCredentials:
    """Resolve the credentials of a connecting socket (runs in the database thread)."""
    raw, via, subprotocol = find_token(scope)
    if raw is not None:
        if not raw:
            return SocketCredentials(
                via=via, subprotocol=subprotocol, error="Malformed Authorization header"
            )
        return token_credentials(raw, via, subprotocol)
    fault = scope.get(SESSION_FAULT)
    if fault is not None:
        raise fault
    user = scope.get("user")
    if user is not None:
        user = getattr(user, "_wrapped", user)  # resolve channels' lazy user
    if user is not None and user.is_authenticated and user.is_active:
        rights = permissions.socket_rights(user)
        hosts = permissions.host_scope(user)
        permissions.forget_permissions(user)  # the socket keeps the user, not these
        return SocketCredentials(
            user=user, via="session", fingerprint=fingerprint(user), rights=rights, scope=hosts
        )
    return SocketCredentials(error="Missing JWT token")


def _session_hash_verified(session: SessionBase, user: AbstractBaseUser) -> bool:
    """Whether ``session`` holds ``user``'s session hash under the secret key or a former
    one; one under a former key is replaced by the current one and saved (a socket
    cannot cycle the session key as Django does over HTTP: no cookie goes back)."""
    stored = session.get(HASH_SESSION_KEY)
    if not stored:
        return False
    current = user.get_session_auth_hash()
    if constant_time_compare(stored, current):
        return True
    if not any(constant_time_compare(stored, h) for h in user.get_session_auth_fallback_hash()):
        return False
    session[HASH_SESSION_KEY] = current
    try:
        session.save()
    except UpdateError as exc:
        # Django's database store says UpdateError for any error of the write, too: a
        # fault of the database (busy, unreachable) is raised as such, and the session
        # left as it is, so that the client retries; the session ended meanwhile otherwise.
        fault = exc.__context__
        if isinstance(fault, OperationalError | InterfaceError):
            raise fault from fault.__cause__
        return False
    return True


@database_sync_to_async
def session_user(session: SessionBase) -> AbstractBaseUser | AnonymousUser:
    """The user of the Django session a socket's cookie names, as Django's ``get_user``
    decides over HTTP, in a database thread.

    Channels' own ``get_user`` knows no ``SECRET_KEY_FALLBACKS``: after a key rotation
    it ended (flushed) the session of every page whose socket reconnected before it
    loaded a page again.
    """
    try:
        user_id = get_user_model()._meta.pk.to_python(session[SESSION_KEY])
        backend_path = session[BACKEND_SESSION_KEY]
    except (KeyError, ValidationError):
        return AnonymousUser()
    if backend_path not in settings.AUTHENTICATION_BACKENDS:
        return AnonymousUser()
    user = load_backend(backend_path).get_user(user_id)
    if user is None:
        return AnonymousUser()
    if not _session_hash_verified(session, user):
        session.flush()
        return AnonymousUser()
    return user


def warning_lead(expires_at: float, issued_at: float | None, now: float) -> float:
    """How long before ``expires_at`` a socket is warned that its token expires:
    ``WS_TOKEN_WARNING_SECONDS``, or half the token's lifetime if that is shorter (the
    time it had left at ``now`` when it carries no ``iat``); 0 when warnings are off."""
    lifetime = expires_at - (issued_at if issued_at is not None else now)
    return max(0.0, min(settings.WS_TOKEN_WARNING_SECONDS, lifetime / 2))


def origin_allowed(origin: str, scope: ScopeView) -> bool:
    """Whether a browser at ``origin`` may open a socket to this server.

    Same-origin pages (the ``Origin`` names the host and port the request was sent to)
    are allowed; any other origin must be listed exactly in ``WS_ALLOWED_ORIGINS``.
    Matching host names alone would let a page on another port of the same machine ride
    a logged-in user's session.
    """
    if origin == "null":
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    host_header = _header(scope, b"host")
    if host_header and host_header.lower() == parts.netloc.lower():
        return True
    return origin.rstrip("/").lower() in {o.lower() for o in settings.WS_ALLOWED_ORIGINS}


class RefuseBrowsers:
    """Refuse handshakes that carry an ``Origin`` header: only agents may use this route."""

    def __init__(self, application: ASGIApp) -> None:
        self.application = application

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Called per connection: browsers always send Origin, agents never do."""
        if _header(scope, b"origin") is not None:
            await _deny(scope, receive, send)
            return
        await self.application(scope, receive, send)


class ClientSocketScope:
    """What ``/ws`` does before its consumer, in one step and one copy of the scope.

    - A browser page of a foreign origin is refused with HTTP 403 (:func:`origin_allowed`);
      clients that send no ``Origin`` pass.
    - The scope gets ``cookies``, ``session`` and ``user`` as channels'
      ``AuthMiddlewareStack`` gives them: the handshake's cookies, the Django session its
      session cookie names, and that session's user (``AnonymousUser`` without one),
      read in a database thread by :func:`session_user`, which also accepts a session
      of a former secret key.  :func:`authenticate_socket` falls back to that user when
      the socket carries no token, and raises a database fault met reading the session
      (``SESSION_FAULT``) so that the consumer answers it with 4503, as it answers the
      faults of its own reads.

    Channels' stack does the last part in three middlewares, each holding a copy of the
    scope and a suspended coroutine for as long as the socket is open, about 4 KB per
    idle socket (docs/benchmarks.md, "Memory per idle socket").  Its session middleware
    also wraps ``send`` to save a modified session with an HTTP response, which a
    WebSocket never sends; here the consumer gets the server's own ``send``, which
    :class:`~sysmanage.transport.Outbound` needs to write event frames directly.
    """

    def __init__(self, application: ASGIApp) -> None:
        self.application = application

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Called per connection: deny it with HTTP 403, or pass it on with its session."""
        origin = _header(scope, b"origin")
        if origin is not None and not origin_allowed(origin, scope):
            await _deny(scope, receive, send)
            return
        cookie = _header(scope, b"cookie")
        cookies = parse_cookie(cookie) if cookie is not None else {}
        store = import_module(settings.SESSION_ENGINE).SessionStore(
            cookies.get(settings.SESSION_COOKIE_NAME)
        )
        session: LazyObject[Any] = LazyObject()
        session._wrapped = store
        # ASGI lets middleware add keys to the scope; asgiref's TypedDicts do not list them.
        inner: dict[str, Any] = {**scope, "cookies": cookies, "session": session}
        user = inner["user"] = UserLazyObject()
        # Without a session (token clients) there is no user to read: no database trip.
        if store.session_key is None:
            user._wrapped = AnonymousUser()
        else:
            try:
                user._wrapped = await session_user(store)
            except Exception as exc:
                if dbgate.unavailable(exc) is None:
                    raise
                user._wrapped, inner[SESSION_FAULT] = AnonymousUser(), exc
        await self.application(cast("Scope", inner), receive, send)
