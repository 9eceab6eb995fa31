"""Shared argument handling of the host management commands."""

from __future__ import annotations

import uuid

from django.core.management.base import CommandError

from hosts.models import Host


def find_host(identifier: str) -> Host:
    """The host named by hostname or id, or a CommandError saying there is none."""
    try:
        host = Host.objects.filter(id=uuid.UUID(identifier)).first()
    except ValueError:
        host = None
    host = host or Host.objects.filter(hostname__iexact=identifier).first()
    if host is None:
        raise CommandError(f"No host with hostname or id {identifier!r}")
    return host


def agent_start_hint(what: str, token: str) -> str:
    """How to give ``token`` to the host's agent: through its environment or config file,
    never its command line, where every user of the machine can read it."""
    return (
        f"{what} The token is shown only now. Give it to the agent through its environment "
        "or its config file, not its command line (other users can read that):\n"
        f"  export SYSMANAGE_AGENT_TOKEN='{token}'\n"
        "  python -m agent --server http://SERVER:8000\n"
        f'or token = "{token}" in /etc/sysmanage-agent/agent.toml (chmod 600); '
        "see docs/agent.md."
    )
