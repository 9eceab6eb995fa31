"""
Connection tokens of SysManage agents: opaque, short-lived, and worth nothing alone.

``POST /api/agent/auth`` hands a token to whoever names a host (that is the agent's
protocol), so a token must neither reveal anything nor grant anything.  It is the name
it was issued for, a time and random bytes, sealed with AES-GCM under a key derived
from ``SECRET_KEY``: without the key it cannot be read or forged, and it carries no
host id.  What a connection may do is decided by what it proves afterwards (a message
carrying a host's ``host_id`` and ``host_token``, for a host of that name), never by the
token (see :mod:`hosts.smagent.session`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings
from django.utils.crypto import salted_hmac

from sysmanage.secretkeys import secret_keys

KEY_SALT = "sysmanage.agent-connection-token"
#: Bound to this use: a sealed blob of another purpose never opens as a token.
ASSOCIATED_DATA = b"sysmanage agent connection token v1"
NONCE_BYTES = 12
MAX_TOKEN_CHARS = 512


@dataclass(frozen=True)
class ConnectionToken:
    """What an opened token says: the (lower-case) name it was issued for, and when."""

    name: str
    issued_at: float


def _key(secret: str) -> bytes:
    return salted_hmac(KEY_SALT, "aes-256-gcm", secret=secret, algorithm="sha256").digest()


def _keys() -> list[bytes]:
    """The current key first, then keys of ``SECRET_KEY_FALLBACKS`` (key rotation)."""
    return [_key(secret) for secret in secret_keys()]


def normalize_name(name: str) -> str:
    """Host names compare without regard to case."""
    return name.strip().lower()


def issue(name: str) -> str:
    """A sealed token for one connection (or one poll) of the agent called ``name``."""
    payload = json.dumps(
        {"n": normalize_name(name), "t": round(time.time(), 3)}, separators=(",", ":")
    ).encode()
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(_keys()[0]).encrypt(nonce, payload, ASSOCIATED_DATA)
    return base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")


def open_token(token: str) -> ConnectionToken | None:
    """The contents of a valid, unexpired token; None for anything else."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        return None
    try:
        blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    nonce, sealed = blob[:NONCE_BYTES], blob[NONCE_BYTES:]
    for key in _keys():
        try:
            payload = json.loads(AESGCM(key).decrypt(nonce, sealed, ASSOCIATED_DATA))
            opened = ConnectionToken(name=str(payload["n"]), issued_at=float(payload["t"]))
        except (InvalidTag, ValueError, KeyError, TypeError):
            continue
        age = time.time() - opened.issued_at
        return opened if -60 <= age <= settings.SYSMANAGE_AGENT_TOKEN_SECONDS else None
    return None
