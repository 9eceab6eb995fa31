"""Logging filters: nothing the server logs may carry a credential.

:func:`redact` is applied to every record of the server's handlers (``LOGGING`` in the
settings) and to every line of Daphne's access log (``sysmanage/serve.py``).
"""

from __future__ import annotations

import logging
import re
import time
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

# Django's DisallowedHost message: Invalid HTTP_HOST header: 'name'. ...
_DISALLOWED_HOST = re.compile(r"Invalid HTTP_HOST header: '([^']{0,300})'")

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


class DisallowedHostFilter(logging.Filter):
    """Turn Django's report of a request for a host not in ``ALLOWED_HOSTS`` (an error
    with a traceback, per request) into one line that says what to add, logged once per
    host per ``interval`` seconds with the number of requests refused meanwhile."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the first record per host and interval, rewritten; drop the others."""
        exc = record.exc_info[1] if record.exc_info else None
        match = _DISALLOWED_HOST.search(str(exc) if exc is not None else record.getMessage())
        host = match.group(1) if match else "?"
        now = time.monotonic()
        since, refused = self._last.get(host, (-self.interval, 0))
        if now - since < self.interval:
            self._last[host] = (since, refused + 1)
            return False
        if len(self._last) > 1000:  # names chosen by whoever sends requests
            self._last.clear()
        self._last[host] = (now, 0)
        more = f" ({refused} more since the last report)" if refused else ""
        record.msg = (
            "Refused a request for host %r: it is not in DJANGO_ALLOWED_HOSTS; if clients "
            "reach the server by that name, add it there%s"
        )
        record.args = (host, more)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = None
        record.exc_text = None
        return True
