"""
Credential fingerprints: access and refresh tokens that a password change voids.

Every token the server issues carries the claim ``cfp``: a keyed digest of the user's
password hash and active flag, the way Django's session auth hash ties a session to a
password.  Every place that accepts a token -- the socket handshake, the REST API and
``/api/token/refresh/`` -- compares it with the user's fingerprint as it is now.  So a
password change or a deactivation voids every outstanding token at once, however it was
made: the admin, the REST API, ``manage.py shell`` or ``QuerySet.update``, which no
signal sees.  The active flag is part of the digest so that the signal receivers can
tell a deactivation from other saves (and blacklist refresh tokens); enabling the
account again gives back the same fingerprint, so an access token of before that has
not expired works again: change the password to void everything for good.  A token
issued under a former secret key (during a rotation: docs/operations.md) carries the
fingerprint under that key, which matches as long as the key is in
``SECRET_KEY_FALLBACKS``; refreshing it gives a pair fingerprinted under the current key.

Refreshing rotates the refresh token: the old one is blacklisted in the transaction
that records the new one.  A client that sent a refresh and never saw the answer
retries with the token it sent; within ``JWT_REFRESH_REUSE_GRACE_SECONDS`` of the
rotation that token gets a new pair of the same sign-in (the "reuse interval" of Auth0
and Okta), unless the latest token issued for it was spent since -- rotated, logged out,
revoked -- or the user's credentials changed (:class:`~sysmanage.models.RefreshRotation`).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Self, TypeVar

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.utils import timezone
from django.utils.crypto import constant_time_compare, salted_hmac
from django.utils.translation import gettext_lazy as _
from rest_framework.exceptions import AuthenticationFailed
from rest_framework_simplejwt.authentication import AuthUser, JWTAuthentication
from rest_framework_simplejwt.exceptions import TokenError
from rest_framework_simplejwt.serializers import (
    TokenObtainPairSerializer,
    TokenRefreshSerializer,
)
from rest_framework_simplejwt.settings import api_settings
from rest_framework_simplejwt.token_blacklist.models import BlacklistedToken, OutstandingToken
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken, Token
from rest_framework_simplejwt.utils import datetime_from_epoch

from sysmanage.models import RefreshRotation, User
from sysmanage.secretkeys import secret_keys

_T = TypeVar("_T", bound=Token)

#: The claim that carries the fingerprint.
FINGERPRINT_CLAIM = "cfp"
#: The sign-in a token descends from: set on the refresh token issued at login, kept
#: through rotations and copied into every access token made from it, so that a token
#: logout can close the sockets opened with that sign-in's access tokens.
SESSION_CLAIM = "sid"
#: What a client is told when its token was voided by a change of credentials.
REVOKED_MESSAGE = "Token revoked: the account's credentials changed; sign in again"


def _keyed_fingerprint(user: AbstractBaseUser, secret: str) -> str:
    material = f"{user.password}\x00{int(bool(user.is_active))}"
    return salted_hmac(
        "sysmanage.credentials.fingerprint", material, secret=secret, algorithm="sha256"
    ).hexdigest()[:32]


def fingerprint(user: AbstractBaseUser) -> str:
    """The fingerprint of ``user``'s credentials now: it changes with the password hash
    and the active flag, and cannot be computed without SECRET_KEY."""
    return _keyed_fingerprint(user, settings.SECRET_KEY)


def fingerprints(user: AbstractBaseUser) -> list[str]:
    """``user``'s fingerprint under SECRET_KEY, then under each key of
    SECRET_KEY_FALLBACKS: tokens issued before a key rotation carry one of the latter."""
    return [_keyed_fingerprint(user, secret) for secret in secret_keys()]


def fingerprint_matches(claims: Mapping[str, object], user: AbstractBaseUser) -> bool:
    """Whether a token with ``claims`` was issued for ``user``'s current credentials
    (under the secret key or a former one)."""
    claim = claims.get(FINGERPRINT_CLAIM)
    return isinstance(claim, str) and any(
        constant_time_compare(claim, expected) for expected in fingerprints(user)
    )


def decode(token_class: type[_T], raw: str, *, verify: bool = True) -> _T:
    """``raw`` decoded as a ``token_class`` (signature, expiry and blacklist checked unless
    ``verify`` is false); raises ``TokenError``."""
    # simplejwt annotates the encoded token as a Token; at run time it takes the string.
    return token_class(raw, verify=verify)  # type: ignore[arg-type]


class _Fingerprinted(Token):
    """Adds the fingerprint when a token is made for a user (before it is recorded as
    outstanding, so the stored copy carries it too)."""

    @classmethod
    def for_user(cls, user: AuthUser) -> Self:
        """A new token for ``user`` with the fingerprint claim."""
        if not isinstance(user, AbstractBaseUser):  # simplejwt's TokenUser has no password
            raise TypeError("tokens are issued for users of the database only")
        token = super().for_user(user)
        token[FINGERPRINT_CLAIM] = fingerprint(user)
        if isinstance(token, RefreshToken):
            token[SESSION_CLAIM] = uuid.uuid4().hex
        return token


class FingerprintedAccessToken(_Fingerprinted, AccessToken):
    """An access token bound to the user's credentials."""


# simplejwt types RefreshToken.for_user (its BlacklistMixin's) as returning a RefreshToken
# and Token.for_user as returning the class it is called on, which mypy cannot reconcile
# in a subclass of both; the order of the bases is what stores the claim (see above).
class FingerprintedRefreshToken(RefreshToken, _Fingerprinted):  # type: ignore[misc]
    """A refresh token bound to the user's credentials; its access tokens copy the claim."""

    access_token_class = FingerprintedAccessToken


def access_token_for(user: AbstractBaseUser) -> str:
    """An access token for ``user`` (scripts and tests; people use ``/api/token/``)."""
    return str(FingerprintedAccessToken.for_user(user))


class FingerprintTokenObtainPairSerializer(TokenObtainPairSerializer):
    """``POST /api/token/``: the token pair carries the fingerprint."""

    token_class = FingerprintedRefreshToken


class _SpentRefreshToken(FingerprintedRefreshToken):
    """A refresh token decoded with its signature, expiry and type verified as always,
    but not the blacklist: the refresh reads that where it spends the token, and for a
    token known to be spent the reuse grace decides."""

    def check_blacklist(self) -> None:
        """Skipped: the caller reads whether the token was spent (:func:`_spent`)."""


#: What a spent refresh token is refused with (simplejwt's words).
_BLACKLISTED = _("Token is blacklisted")


def _spent(token: Token) -> bool:
    """Whether ``token`` (a refresh token) is on the blacklist."""
    return BlacklistedToken.objects.filter(token__jti=token[api_settings.JTI_CLAIM]).exists()


def token_digest(raw: str) -> str:
    """The SHA-256 (hex) of a token or claim: what the reuse grace stores instead."""
    return hashlib.sha256(raw.encode()).hexdigest()


def _sign_in_digest(token: Token) -> str:
    sid = token.payload.get(SESSION_CLAIM)
    return token_digest(sid) if isinstance(sid, str) else ""


def _outstanding(token: Token, user: User, raw: str) -> OutstandingToken:
    """The outstanding-token row of ``token`` (made if simplejwt has none yet)."""
    row, _ = OutstandingToken.objects.get_or_create(
        jti=token[api_settings.JTI_CLAIM],
        defaults={
            "user": user,
            "created_at": token.current_time,
            "token": raw,
            "expires_at": datetime_from_epoch(token["exp"]),
        },
    )
    return row


class FingerprintTokenRefreshSerializer(TokenRefreshSerializer):
    """``POST /api/token/refresh/``: refuses a refresh token whose user is gone, disabled,
    or whose credentials changed since it was issued; rotates the refresh token; and
    gives a token it rotated within the reuse grace a new pair of the same sign-in."""

    token_class = FingerprintedRefreshToken

    def validate(self, attrs: dict[str, Any]) -> dict[str, str]:
        """Check the user as it is now, then spend the token and issue the new pair in
        one transaction: the old refresh token is spent only if the new one is
        recorded, so a failed write (a busy database) leaves the client with a token
        that still works.  A spent token gets a pair only within its reuse grace.

        Whether the token was spent is read once, in the transaction that spends it (a
        storm of refreshes makes every query count), and before that only for a token
        refused for its user, which a spent token is refused for as one.
        """
        raw = attrs["refresh"]
        refresh = decode(_SpentRefreshToken, raw)  # signature, expiry; spent: below
        user = _current_user(refresh)
        if user is None or not fingerprint_matches(refresh.payload, user):
            if _spent(refresh):
                return self._reissued_or_refused(raw)
            if user is None:
                raise AuthenticationFailed(
                    "No active account found for the given token.", "no_active_account"
                )
            raise AuthenticationFailed(REVOKED_MESSAGE, "token_revoked")
        with transaction.atomic():
            spent = _outstanding(refresh, user, raw)
            _, first = BlacklistedToken.objects.get_or_create(token=spent)
            if not first:  # spent before, or by a concurrent request with the same token
                return self._reissued_or_refused(raw)
            data, successor = _rotate(refresh, user)
            grace = settings.JWT_REFRESH_REUSE_GRACE_SECONDS
            if grace > 0:
                RefreshRotation.objects.create(
                    spent=token_digest(raw),
                    successor=successor,
                    sign_in=_sign_in_digest(refresh),
                    grace_until=timezone.now() + timedelta(seconds=grace),
                )
            return data

    def _reissued_or_refused(self, raw: str) -> dict[str, str]:
        """A new pair for a spent refresh token within its reuse grace, or the refusal
        of a spent token."""
        reissued = self._reissue_within_grace(raw)
        if reissued is None:
            raise TokenError(_BLACKLISTED)
        return reissued

    def _reissue_within_grace(self, raw: str) -> dict[str, str] | None:
        """A new pair for a refresh token this server rotated less than
        ``JWT_REFRESH_REUSE_GRACE_SECONDS`` ago, or None: the grace is off or over, the
        latest token issued for it was spent since, the sign-in was logged out, or the
        user's credentials changed."""
        if settings.JWT_REFRESH_REUSE_GRACE_SECONDS <= 0:
            return None
        try:
            spent = decode(_SpentRefreshToken, raw)
        except TokenError:
            return None
        user = _current_user(spent)
        if user is None or not fingerprint_matches(spent.payload, user):
            return None
        with transaction.atomic():
            rotation = (
                RefreshRotation.objects.select_for_update()
                .filter(spent=token_digest(raw), grace_until__gt=timezone.now())
                .first()
            )
            if rotation is None:
                return None
            if BlacklistedToken.objects.filter(token_id=rotation.successor_id).exists():
                return None
            data, rotation.successor = _rotate(spent, user)
            rotation.save(update_fields=["successor"])
            return data


def _current_user(token: Token) -> User | None:
    """The token's user as the database has it now, if it exists and is active."""
    user_id = token.payload.get(api_settings.USER_ID_CLAIM)
    user = User.objects.filter(pk=user_id).first() if user_id else None
    return user if user is not None and user.is_active else None


def _rotate(refresh: RefreshToken, user: User) -> tuple[dict[str, str], OutstandingToken]:
    """Issue the pair that follows ``refresh`` (same sign-in and claims, a new ``jti``,
    ``iat`` and ``exp``), as simplejwt's rotation does; returns it and the new refresh
    token's outstanding-token row.  The fingerprint, checked already, is made again
    under the current key: one made under a former key would void the pair once that
    key is dropped."""
    refresh[FINGERPRINT_CLAIM] = fingerprint(user)
    access = str(refresh.access_token)
    refresh.set_jti()
    refresh.set_exp()
    refresh.set_iat()
    new = str(refresh)
    # a new jti: recorded without looking for it first (one query instead of four)
    recorded = OutstandingToken.objects.create(
        jti=refresh[api_settings.JTI_CLAIM],
        user=user,
        created_at=refresh.current_time,
        token=new,
        expires_at=datetime_from_epoch(refresh["exp"]),
    )
    return {"access": access, "refresh": new}, recorded


class FingerprintJWTAuthentication(JWTAuthentication):
    """REST authentication by access token that also checks the fingerprint."""

    # simplejwt returns a type variable that no argument binds; these are database users.
    def get_user(self, validated_token: Token) -> AbstractBaseUser:  # type: ignore[override]
        """The token's user, if the token still matches its credentials."""
        try:
            user = super().get_user(validated_token)
        except (ValueError, TypeError, DjangoValidationError):
            # a user id that is no id at all (a list, not a UUID): refused, not a 500
            raise AuthenticationFailed(
                "Token contained no recognizable user identification", code="token_not_valid"
            ) from None
        if not fingerprint_matches(validated_token.payload, user):
            raise AuthenticationFailed(REVOKED_MESSAGE, code="token_revoked")
        return user
