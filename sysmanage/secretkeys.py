"""
Rotation of the secret key: what was signed with a key of ``SECRET_KEY_FALLBACKS`` is
still accepted, and everything new is signed with ``SECRET_KEY``.

Django checks the fallbacks itself for session data, ``django.core.signing`` and
password-reset links.  The rest is here: :func:`secret_keys` for the project's own keyed
digests (the credential fingerprint of tokens, the SysManage agents' connection tokens),
and :class:`RotatingTokenBackend` for the JWTs, which simplejwt verifies with one key
only.  The procedure is in docs/operations.md, "Rotating the secret key".
"""

from __future__ import annotations

from typing import Any

import jwt
from django.conf import settings
from rest_framework_simplejwt import state
from rest_framework_simplejwt.backends import TokenBackend
from rest_framework_simplejwt.exceptions import TokenBackendError
from rest_framework_simplejwt.settings import api_settings
from rest_framework_simplejwt.tokens import Token


def secret_keys() -> list[str]:
    """``SECRET_KEY`` first, then each key of ``SECRET_KEY_FALLBACKS``."""
    return [settings.SECRET_KEY, *settings.SECRET_KEY_FALLBACKS]


def _bad_signature(exc: TokenBackendError) -> bool:
    """Whether simplejwt refused a token for its signature alone (another key may
    verify it; an expired or malformed token stays refused whatever the key)."""
    return isinstance(exc.__cause__, jwt.InvalidSignatureError)


class RotatingTokenBackend(TokenBackend):
    """simplejwt's backend, verifying a token whose signature the signing key refuses
    with each key of ``SECRET_KEY_FALLBACKS`` in turn; tokens are signed with the
    signing key only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fallbacks: dict[str, TokenBackend] = {}

    def decode(self, token: Token, verify: bool = True) -> dict[str, Any]:
        """The token's claims, if the signing key or a fallback key verifies it; raises
        ``TokenBackendError`` as simplejwt does otherwise (the signing key's refusal)."""
        try:
            return super().decode(token, verify=verify)
        except TokenBackendError as exc:
            if not verify or not _bad_signature(exc):
                raise
            refusal = exc
        for key in settings.SECRET_KEY_FALLBACKS:
            try:
                return self._with_key(key).decode(token)
            except TokenBackendError as exc:
                if not _bad_signature(exc):
                    raise  # this key signed it, and it is expired or otherwise invalid
        raise refusal

    def _with_key(self, key: str) -> TokenBackend:
        """A backend like this one that verifies with ``key`` (made once per key)."""
        backend = self._fallbacks.get(key)
        if backend is None:
            backend = self._fallbacks[key] = TokenBackend(
                self.algorithm,
                key,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                json_encoder=self.json_encoder,
            )
        return backend


def token_backend_install() -> None:
    """Make every simplejwt token class sign and verify through a
    :class:`RotatingTokenBackend` of simplejwt's own settings.

    Tokens look their backend up as ``rest_framework_simplejwt.state.token_backend``
    when they are made (simplejwt 5.5 removed its ``TOKEN_BACKEND_CLASS`` setting), so
    replacing that one object covers simplejwt's views and serializers and this
    project's token classes alike.
    """
    state.token_backend = RotatingTokenBackend(
        api_settings.ALGORITHM,
        api_settings.SIGNING_KEY,
        api_settings.VERIFYING_KEY,
        api_settings.AUDIENCE,
        api_settings.ISSUER,
        api_settings.JWK_URL,
        api_settings.LEEWAY,
        api_settings.JSON_ENCODER,
    )
