"""Logging filters: nothing the server logs may carry a credential."""
from __future__ import annotations

import logging
import re

_PATTERNS = [
    # token=... in query strings and form bodies
    (re.compile(r"(?i)(token=)[^&\s\"']+"), r"\1[redacted]"),
    # Authorization: Bearer ... in header dumps
    (re.compile(r"(?i)(bearer[ .])[A-Za-z0-9._~+/=-]{8,}"), r"\1[redacted]"),
    # Bare JWTs anywhere (three base64url segments, the first a JSON header)
    (re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"), "[redacted-jwt]"),
]


def redact(text: str) -> str:
    """Return ``text`` with tokens and bearer credentials replaced."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactTokensFilter(logging.Filter):
    """Rewrite each record's message so that no token reaches a log handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Called for each record: render it once, redacted, and keep it."""
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        return True
