"""Logging filters: nothing the server logs may carry a credential.

:func:`redact` is applied to every record of the server's handlers (``LOGGING`` in the
settings) and to every line of Daphne's access log (``sysmanage/serve.py``).
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

#: Query or form parameters whose values are credentials, matched in the decoded,
#: lower-cased name (``?token=``, ``?TOKEN=``, ``?t%6Fken=``, ``?access_token=``, ...).
SENSITIVE_NAMES = (
    "token",
    "secret",
    "password",
    "passwd",
    "key",
    "auth",
    "session",
    "signature",
    "jwt",
    "csrf",
    "refresh",
    "access",
    "code",
)

# name=value pairs after ? & or ; (query strings, form bodies).
_PARAMETER = re.compile(
    r"(?P<lead>[?&;]|^)(?P<name>[^=&;?\s\"'#]{1,100})="
    r"(?P<value>[^&;\s\"'#]*)",
    re.MULTILINE,
)
_PATTERNS = [
    # token=... anywhere else in a message
    (re.compile(r"(?i)(token=)[^&\s\"']+"), r"\1[redacted]"),
    # Authorization: Bearer ... in header dumps
    (re.compile(r"(?i)(bearer[ .])[A-Za-z0-9._~+/=-]{8,}"), r"\1[redacted]"),
    # Bare JWTs anywhere (three base64url segments, the first a JSON header)
    (re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"), "[redacted-jwt]"),
    # Django-signed values (the SysManage agents' connection tokens)
    (re.compile(r"eyJ[A-Za-z0-9_-]+:[A-Za-z0-9_-]+:[A-Za-z0-9_-]+"), "[redacted-signed]"),
    # Host agent tokens and registration keys, by their prefixes
    (re.compile(r"\b(smat|smrk)_[A-Za-z0-9_-]{8,}"), r"\1_[redacted]"),
]


def _sensitive(name: str) -> bool:
    """Whether parameter ``name`` (as it appears, percent-encoded or not) names a
    credential."""
    decoded = unquote_plus(name).lower()
    return any(word in decoded for word in SENSITIVE_NAMES)


def _redact_parameter(match: re.Match[str]) -> str:
    """One ``name=value`` pair, its value replaced if the name is a credential's."""
    if not match.group("value") or not _sensitive(match.group("name")):
        return match.group(0)
    return f"{match.group('lead')}{match.group('name')}=[redacted]"


def redact(text: str) -> str:
    """Return ``text`` with tokens, credentials in parameters and bearer values replaced."""
    text = _PARAMETER.sub(_redact_parameter, text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactTokensFilter(logging.Filter):
    """Rewrite each record so that no token reaches a log handler: its message, and the
    traceback text a handler would append."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Called for each record: render it once, redacted, and keep it."""
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True
