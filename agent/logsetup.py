"""Logging to stderr, with secrets removed from every line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

REDACTED = "[REDACTED]"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactingFormatter(logging.Formatter):
    """A formatter that replaces each secret in the finished line, tracebacks included."""

    def __init__(self, secrets: Iterable[str], fmt: str = LOG_FORMAT) -> None:
        """Remember the non-empty ``secrets`` to remove."""
        super().__init__(fmt)
        self._secrets = tuple(secret for secret in secrets if secret)

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` as usual, then blank out the secrets."""
        text = super().format(record)
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text


def configure_logging(level: str, secrets: Iterable[str]) -> None:
    """Send all logging to stderr at ``level``, never showing any of ``secrets``.

    The ``websockets`` library logs handshake headers (including ``Authorization``) and
    every frame at DEBUG; it is kept at INFO or above, and redaction covers it anyway.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(secrets))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    numeric = logging.getLevelName(level)
    root.setLevel(numeric)
    logging.getLogger("websockets").setLevel(max(numeric, logging.INFO))
    logging.getLogger("asyncio").setLevel(max(numeric, logging.INFO))
