"""Core services: closing sockets and revoking tokens of users who lose access, and
ending the refresh-token reuse grace of a sign-in."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Collection

from django.contrib.auth.base_user import AbstractBaseUser
from django.utils import timezone
from rest_framework_simplejwt.exceptions import TokenError
from rest_framework_simplejwt.token_blacklist.models import BlacklistedToken, OutstandingToken
from rest_framework_simplejwt.tokens import RefreshToken

from sysmanage.control import CloseSession, CloseUser, RecheckUsers
from sysmanage.credentials import FINGERPRINT_CLAIM, decode, fingerprints, token_digest
from sysmanage.events import publish_control
from sysmanage.models import RefreshRotation


def session_tag(session_key: str) -> str:
    """A name for a Django session that does not reveal its key (keys are credentials)."""
    return hashlib.sha256(session_key.encode()).hexdigest()[:32]


def user_sessions_revoke(*, user_id: str, reason: str) -> None:
    """Close every open WebSocket of ``user_id`` in every server process, after commit."""
    publish_control(CloseUser(user_id=str(user_id), reason=reason))


def token_session_tag(session: str) -> str:
    """The hub's name for the sockets opened with the access tokens of one sign-in."""
    return session_tag(f"jwt:{session}")


def token_session_sockets_close(*, session: str, reason: str) -> None:
    """Close every open WebSocket opened with an access token of this sign-in (its
    ``sid`` claim), in every server process, after commit."""
    publish_control(CloseSession(session=token_session_tag(session), reason=reason))


def session_sockets_close(*, session_key: str, reason: str) -> None:
    """Close every open WebSocket authenticated by this Django session, after commit."""
    publish_control(CloseSession(session=session_tag(session_key), reason=reason))


def _issued_for(stored_token: str) -> str | None:
    """The fingerprint claim of a refresh token as stored (already verified when issued)."""
    try:
        claim = decode(RefreshToken, stored_token, verify=False).payload.get(FINGERPRINT_CLAIM)
    except TokenError:
        return None
    return claim if isinstance(claim, str) else None


def refresh_tokens_revoke(
    *, user_id: uuid.UUID | str, unless_issued_for: Collection[str] | None = None
) -> int:
    """Blacklist ``user_id``'s refresh tokens that are still valid; with
    ``unless_issued_for`` (fingerprints), only those issued for other credentials.
    Returns how many.

    Tokens are void anyway once their fingerprint differs (:mod:`sysmanage.credentials`);
    the blacklist makes that visible (and survives a change back to the old password).
    """
    rows = OutstandingToken.objects.filter(
        user_id=user_id, expires_at__gt=timezone.now(), blacklistedtoken__isnull=True
    )
    stale = [
        row
        for row in rows
        if unless_issued_for is None or _issued_for(row.token) not in unless_issued_for
    ]
    BlacklistedToken.objects.bulk_create(
        [BlacklistedToken(token=row) for row in stale], ignore_conflicts=True
    )
    return len(stale)


def user_credentials_sync(*, user: AbstractBaseUser) -> int:
    """After ``user`` was saved: revoke the refresh tokens issued for credentials it no
    longer has (a new password, a deactivation), under the secret key or a former one.
    Returns how many were revoked."""
    return refresh_tokens_revoke(user_id=user.pk, unless_issued_for=fingerprints(user))


def user_access_recheck(*, user_ids: list[str] | None) -> None:
    """Ask every server process to recheck the open sockets of ``user_ids`` (None: of
    everyone) against the database, after commit: their flags, permissions or groups
    changed."""
    publish_control(
        RecheckUsers(user_ids=None if user_ids is None else tuple(str(u) for u in user_ids))
    )


def token_session_grace_end(*, session: str) -> int:
    """After a sign-in (``sid``) logged out: no refresh token of it may be used again
    within the reuse grace.  Returns how many rotations were forgotten."""
    deleted, _ = RefreshRotation.objects.filter(sign_in=token_digest(session)).delete()
    return deleted


def refresh_rotations_prune() -> int:
    """Forget the rotations whose reuse grace is over.  Returns how many.

    A delete opens a write transaction even when it matches nothing; the check first
    keeps the job, which runs in every process every minute, from taking SQLite's write
    lock for nothing.
    """
    expired = RefreshRotation.objects.filter(grace_until__lte=timezone.now())
    if not expired.exists():
        return 0
    deleted, _ = expired.delete()
    return deleted
