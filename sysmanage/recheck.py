"""
Open sockets against the database: who may still be connected, and what they may see.

Each server process rechecks its client sockets every ``WS_RECHECK_SECONDS`` (5 s by
default), and at once when a ``recheck_users`` control message says that users' flags,
permissions or groups changed (:mod:`sysmanage.receivers`).  A socket is closed with
``AUTH_FAILED`` and 4001 when its user was deleted or deactivated, when the user's
credential fingerprint differs from the one the socket was opened with (a password
change, however it was made), or when the session it was opened with ended, expired or
now belongs to other credentials.  Otherwise its rights are refreshed, and each
subscription that needs a right the user lost is ended with ``SUBSCRIPTION_REVOKED``.

A run reads every user with a socket in this process at once (a fixed number of
queries), in the database thread; the snapshot and the verdicts are handled on the
hub's loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY
from django.utils.crypto import constant_time_compare

from sysmanage import dbgate, permissions, selectors
from sysmanage.control import RecheckUsers
from sysmanage.credentials import fingerprint
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.protocol import CloseCode, ServerMessage, auth_failed_envelope

if TYPE_CHECKING:
    from sysmanage.models import User

logger = logging.getLogger(__name__)

DELETED = "User account was deleted"
DISABLED = "User account is disabled"
CREDENTIALS_CHANGED = "The account's credentials changed; sign in again"
SESSION_ENDED = "Session ended or expired"


class CheckedSocket(Protocol):
    """What the recheck needs of a client socket (``sysmanage.consumers.ClientConsumer``)."""

    user_id: str | None

    def close_from_hub(self, code: int, error: ServerMessage) -> None:
        """Send ``error`` and close the socket with ``code``."""

    def update_rights(
        self, rights: frozenset[str], *, read_at: float, scope: permissions.HostScope
    ) -> None:
        """Keep ``rights`` and ``scope`` as the socket's, as read at ``read_at``
        (monotonic)."""


class SocketRegistry(Protocol):
    """What the recheck needs of a hub: its client sockets by user."""

    # The hub holds them as its own Subscriber protocol, which declares less than
    # CheckedSocket; only client sockets are registered by user.
    @property
    def by_user(self) -> Mapping[str, Iterable[Any]]:
        """Open client sockets by user id."""


@dataclass(frozen=True)
class SocketState:
    """What the recheck needs of one socket, read on the hub's loop."""

    conn: CheckedSocket
    user_id: str
    fingerprint: str | None
    session_key: str | None


@dataclass(frozen=True)
class Verdict:
    """Close the socket (``close_reason``), or keep it with these ``rights`` and
    ``scope``."""

    close_reason: str | None = None
    rights: frozenset[str] = frozenset()
    scope: permissions.HostScope = None


def session_problem(session: Mapping[str, Any] | None, user: User) -> str | None:
    """Why a session no longer authenticates ``user`` (as Django's ``get_user`` would
    decide), or None."""
    if session is None or str(session.get(SESSION_KEY)) != str(user.pk):
        return SESSION_ENDED
    stored = str(session.get(HASH_SESSION_KEY, ""))
    hashes = [user.get_session_auth_hash(), *user.get_session_auth_fallback_hash()]
    if not any(constant_time_compare(stored, expected) for expected in hashes):
        return SESSION_ENDED
    return None


def judge_one(
    state: SocketState,
    user: User | None,
    session: Mapping[str, Any] | None,
    scopes: dict[str, permissions.HostScope] | None = None,
) -> Verdict:
    """The verdict on one socket, given its user and session as they are now (and the
    users' host scopes read so far in this run, to read each user's once)."""
    if user is None:
        return Verdict(DELETED)
    if not user.is_active:
        return Verdict(DISABLED)
    if state.fingerprint is None or state.fingerprint != fingerprint(user):
        return Verdict(CREDENTIALS_CHANGED)
    if state.session_key is not None:
        problem = session_problem(session, user)
        if problem:
            return Verdict(problem)
    scopes = {} if scopes is None else scopes
    if state.user_id not in scopes:
        scopes[state.user_id] = permissions.host_scope(user)
    return Verdict(rights=permissions.socket_rights(user), scope=scopes[state.user_id])


def read_and_judge(states: list[SocketState]) -> list[Verdict]:
    """Read the users and sessions of ``states`` (database thread) and judge each."""
    users = selectors.users_with_permissions(user_ids=[s.user_id for s in states])
    sessions = selectors.live_sessions(
        session_keys=[s.session_key for s in states if s.session_key]
    )
    scopes: dict[str, permissions.HostScope] = {}
    return [
        judge_one(
            s,
            users.get(s.user_id),
            sessions.get(s.session_key) if s.session_key else None,
            scopes,
        )
        for s in states
    ]


def _snapshot(hub: SocketRegistry, user_ids: set[str] | None) -> list[SocketState]:
    wanted = (
        hub.by_user
        if user_ids is None
        else {uid: hub.by_user[uid] for uid in user_ids if uid in hub.by_user}
    )
    return [
        SocketState(
            conn, uid, getattr(conn, "fingerprint", None), getattr(conn, "session_key", None)
        )
        for uid, conns in wanted.items()
        for conn in conns
        if not getattr(conn, "closing", False)
    ]


def _apply(conn: CheckedSocket, verdict: Verdict, read_at: float) -> None:
    if verdict.close_reason is not None:
        logger.info("closing a socket of user %s: %s", conn.user_id, verdict.close_reason)
        conn.close_from_hub(CloseCode.AUTH_FAILED, auth_failed_envelope(verdict.close_reason))
    else:
        conn.update_rights(verdict.rights, read_at=read_at, scope=verdict.scope)


async def recheck(hub: SocketRegistry, user_ids: Iterable[str] | None = None) -> int:
    """Recheck this hub's sockets (of ``user_ids``, or all); return how many were read."""
    states = _snapshot(hub, None if user_ids is None else {str(u) for u in user_ids})
    if not states:
        return 0
    read_at = time.monotonic()
    verdicts = await database_sync_to_async(read_and_judge)(states)
    for state, verdict in zip(states, verdicts, strict=True):
        _apply(state.conn, verdict, read_at)
    return len(states)


class Rechecker:
    """Runs one hub's requested rechecks one at a time, merging requests that arrive
    while one runs (a burst of permission changes costs a run or two, not one each)."""

    def __init__(self, hub: SocketRegistry) -> None:
        self.hub = hub
        self.pending: set[str] = set()
        self.everyone = False
        self.task: asyncio.Task[Any] | None = None

    def request(self, user_ids: Iterable[str] | None) -> None:
        """Recheck the sockets of ``user_ids`` (None: every socket) soon."""
        if user_ids is None:
            self.everyone = True
        else:
            self.pending.update(str(u) for u in user_ids)
        if self.task is None or self.task.done():
            # A fresh context, as for the node's own tasks: the run belongs to no request.
            loop = asyncio.get_running_loop()
            self.task = loop.create_task(self._drain(), context=contextvars.Context())

    async def _drain(self) -> None:
        while self.everyone or self.pending:
            ids = None if self.everyone else set(self.pending)
            self.everyone, self.pending = False, set()
            try:
                await recheck(self.hub, ids)
            except Exception:
                dbgate.log_exception(logger, "recheck of open sockets failed")


_RECHECKERS: weakref.WeakKeyDictionary[SocketRegistry, Rechecker] = weakref.WeakKeyDictionary()


def on_recheck_users(hub: SocketRegistry, message: RecheckUsers) -> None:
    """Control message ``recheck_users``: recheck those users' sockets (all if no list)."""
    rechecker = _RECHECKERS.get(hub)
    if rechecker is None:
        rechecker = _RECHECKERS[hub] = Rechecker(hub)
    rechecker.request(message.user_ids)


async def periodic_recheck(hub: SocketRegistry) -> None:
    """The periodic job: recheck every socket of this process (catches what no signal
    sees: ``QuerySet.update``, raw SQL, expired or deleted sessions, other databases'
    processes without a shared layer)."""
    await recheck(hub)
