"""
``python -m sysmanage.serve [daphne options] sysmanage.asgi:application``: Daphne, with
an access log that never carries a credential.

Daphne writes its access log itself (``daphne.access.AccessLogGenerator``, to stdout at
the default verbosity or to ``--access-log``), not through :mod:`logging`, so the
redacting filter of the settings never sees it; and its HTTP lines hold the whole
request URI, query string included: ``GET /ws?token=…`` sent as plain HTTP, or
``/api/agent/connect?token=…``.  This entry point takes Daphne's command line unchanged
and passes every access-log entry's path through :func:`sysmanage.logfilters.redact`
before Daphne writes it, whatever the verbosity or destination.  ``scripts/serve`` and
the documented production command run the server through it.
"""

from __future__ import annotations

import sys
from typing import Any

from daphne.cli import CommandLineInterface
from daphne.server import Server

from sysmanage.logfilters import redact


class RedactingServer(Server):  # type: ignore[misc]  # daphne ships no type information
    """Daphne's server, redacting the path of each access-log entry."""

    def log_action(self, protocol: str, action: str, details: dict[str, Any]) -> None:
        """Called by Daphne for each access-log entry (HTTP request, WebSocket event)."""
        if details.get("path") is not None:
            details = {**details, "path": redact(str(details["path"]))}
        super().log_action(protocol, action, details)


class RedactingCommandLineInterface(CommandLineInterface):  # type: ignore[misc]  # as above
    """Daphne's command line, serving with :class:`RedactingServer`."""

    server_class = RedactingServer


def main(argv: list[str] | None = None) -> None:
    """Run Daphne with ``argv`` (default: this process's arguments)."""
    RedactingCommandLineInterface().run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
