"""Hand-made JWTs for negative tests (the server's own tokens come from /api/token/).

Built with the standard library so that the tests depend on no JWT package of their own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any


def _segment(value: dict[str, Any]) -> str:
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _claims(user_id: str, lifetime: int, token_type: str) -> dict[str, Any]:
    now = int(time.time())
    return {
        "token_type": token_type,
        "exp": now + lifetime,
        "iat": now,
        "jti": uuid.uuid4().hex,
        "user_id": user_id,
    }


def forge_access_token(
    secret: str,
    user_id: str,
    *,
    lifetime: int = 600,
    token_type: str = "access",  # noqa: S107
    extra: dict[str, Any] | None = None,
) -> str:
    """An HS256 JWT shaped like simplejwt's, signed with ``secret``, with ``extra`` claims."""
    claims = {**_claims(user_id, lifetime, token_type), **(extra or {})}
    signing_input = f"{_segment({'alg': 'HS256', 'typ': 'JWT'})}.{_segment(claims)}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def unsigned_token(user_id: str) -> str:
    """A token with ``alg: none`` and no signature."""
    return f"{_segment({'alg': 'none', 'typ': 'JWT'})}.{_segment(_claims(user_id, 600, 'access'))}."


def claims_of(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (to copy one into a forged token)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def signed_with(token: str, secret: str) -> bool:
    """Whether the HS256 signature of ``token`` is made with ``secret``."""
    signing_input, _, signature = token.rpartition(".")
    expected = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    sent = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    return hmac.compare_digest(expected, sent)
