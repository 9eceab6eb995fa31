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
not expired works again: change the password to void everything for good.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, Self, TypeVar

from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction
from django.utils.crypto import constant_time_compare, salted_hmac
from rest_framework.exceptions import AuthenticationFailed
from rest_framework_simplejwt.authentication import AuthUser, JWTAuthentication
from rest_framework_simplejwt.serializers import (
    TokenObtainPairSerializer,
    TokenRefreshSerializer,
)
from rest_framework_simplejwt.settings import api_settings
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken, Token

_T = TypeVar("_T", bound=Token)

#: The claim that carries the fingerprint.
FINGERPRINT_CLAIM = "cfp"
#: The sign-in a token descends from: set on the refresh token issued at login, kept
#: through rotations and copied into every access token made from it, so that a token
#: logout can close the sockets opened with that sign-in's access tokens.
SESSION_CLAIM = "sid"
#: What a client is told when its token was voided by a change of credentials.
REVOKED_MESSAGE = "Token revoked: the account's credentials changed; sign in again"


def fingerprint(user: AbstractBaseUser) -> str:
    """The fingerprint of ``user``'s credentials now: it changes with the password hash
    and the active flag, and cannot be computed without SECRET_KEY."""
    material = f"{user.password}\x00{int(bool(user.is_active))}"
    return salted_hmac(
        "sysmanage.credentials.fingerprint", material, algorithm="sha256"
    ).hexdigest()[:32]


def fingerprint_matches(claims: Mapping[str, object], user: AbstractBaseUser) -> bool:
    """Whether a token with ``claims`` was issued for ``user``'s current credentials."""
    claim = claims.get(FINGERPRINT_CLAIM)
    return isinstance(claim, str) and constant_time_compare(claim, fingerprint(user))


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


class FingerprintTokenRefreshSerializer(TokenRefreshSerializer):
    """``POST /api/token/refresh/``: refuses a refresh token whose user is gone, disabled,
    or whose credentials changed since it was issued."""

    token_class = FingerprintedRefreshToken

    def validate(self, attrs: dict[str, Any]) -> dict[str, str]:
        """Check the user as it is now, then refresh (and rotate) in one transaction:
        the old refresh token is spent only if the new one is recorded, so a failed
        write (a busy database) leaves the client with a token that still works."""
        refresh = decode(self.token_class, attrs["refresh"])  # signature, expiry, blacklist
        user_id = refresh.payload.get(api_settings.USER_ID_CLAIM)
        user = get_user_model()._default_manager.filter(pk=user_id).first() if user_id else None
        if user is None or not user.is_active:
            raise AuthenticationFailed(
                "No active account found for the given token.", "no_active_account"
            )
        if not fingerprint_matches(refresh.payload, user):
            raise AuthenticationFailed(REVOKED_MESSAGE, "token_revoked")
        with transaction.atomic():
            return super().validate(attrs)


class FingerprintJWTAuthentication(JWTAuthentication):
    """REST authentication by access token that also checks the fingerprint."""

    # simplejwt returns a type variable that no argument binds; these are database users.
    def get_user(self, validated_token: Token) -> AbstractBaseUser:  # type: ignore[override]
        """The token's user, if the token still matches its credentials."""
        user = super().get_user(validated_token)
        if not fingerprint_matches(validated_token.payload, user):
            raise AuthenticationFailed(REVOKED_MESSAGE, code="token_revoked")
        return user
