"""
The link from the server to hosts' agents.

Agents connect on their own endpoint; each server process records here which hosts
have an agent connected to it.  A host with no live link cannot take commands, and
the caller reports ``COMMAND_FAILED`` at once instead of waiting.
"""
from __future__ import annotations

from typing import Any, Protocol


class AgentConnection(Protocol):
    """What the command path needs of a connected agent."""

    async def run_command(self, execution: Any) -> None:
        """Send ``execution`` to the agent; its result arrives through the services."""

    async def run_package_operation(self, operation: Any) -> None:
        """Send a package operation to the agent; progress arrives through the services."""


_LINKS: dict[str, AgentConnection] = {}


def attach(host_id: str, connection: AgentConnection) -> None:
    """Record that ``host_id``'s agent is connected to this process."""
    _LINKS[str(host_id)] = connection


def detach(host_id: str, connection: AgentConnection) -> None:
    """Forget ``host_id``'s agent connection if it is still ``connection``."""
    if _LINKS.get(str(host_id)) is connection:
        del _LINKS[str(host_id)]


def connection_for(host_id: str) -> AgentConnection | None:
    """The live agent connection of ``host_id`` in this process, if any."""
    return _LINKS.get(str(host_id))
