"""Agent tokens: random, shown once, stored only as a SHA-256 digest.

The tokens carry 256 bits of randomness, so a fast digest is enough: there is nothing
to brute-force, and lookups stay a single indexed query.
"""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "smat_"  # noqa: S105 - a label, not a secret


def new_token() -> str:
    """A fresh agent token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """The digest stored for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
