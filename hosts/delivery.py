"""
How work reaches a host's agent: one delivery policy per agent kind.

Commands and package operations are pending rows until an agent connection takes them
and confirms it (``agent_took``).  How long a request waits for that confirmation, and
what becomes of work no connection confirmed in time, depends on the agent program: the
product's own agent is sent work while it is connected, so unconfirmed work fails; an
agent protocol that keeps a queue of its own registers a policy for its agent kind from
its app's ``ready()``, and settles unconfirmed work itself.  The core's command handling
asks the policy and never names an agent kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from django.conf import settings

from hosts import services

#: What is handed to an agent: a shell command or a package operation.
WorkKind = Literal["command", "operation"]

#: ``(kind, ref, why) -> taken``: called in the database thread for work no connection
#: confirmed in time; fails it with ``why`` unless a connection took it after all, in one
#: transaction, and says whether one did.
SettleUntaken = Callable[[WorkKind, str, str], bool]


@dataclass(frozen=True)
class DeliveryPolicy:
    """How work for the hosts of one agent kind is handed to their agent."""

    #: seconds a request waits for an agent connection to confirm that it took the work
    window: Callable[[], float]
    #: settles work that was not confirmed in time; None: such work was not taken
    settle_untaken: SettleUntaken | None = None


def settle_by_status(kind: WorkKind, ref: str, why: str) -> bool:
    """For work of the product's agent that no connection confirmed in time: taken if
    an agent connection was sent it (it is no longer pending: handing it over and
    failing it here lock the same row), since the confirmation can be lost on its way
    (the channel layer was down) while the agent, nudged from the database, runs the
    work; else it fails with ``why``."""
    if kind == "command":
        return not services.command_fail_pending(execution_id=ref, why=why)
    return not services.package_operation_fail_pending(operation_id=ref, why=why)


#: The product's own agent: work goes out while it is connected, confirmed at once.
CONNECTED_AGENT = DeliveryPolicy(
    window=lambda: float(settings.AGENT_DISPATCH_CONFIRM_SECONDS),
    settle_untaken=settle_by_status,
)

_POLICIES: dict[str, DeliveryPolicy] = {}


def register(agent_kind: str, policy: DeliveryPolicy) -> None:
    """Deliver work for hosts of ``agent_kind`` by ``policy``; refuses a second policy."""
    if agent_kind in _POLICIES and _POLICIES[agent_kind] != policy:
        raise ValueError(f"a delivery policy for {agent_kind!r} is registered already")
    _POLICIES[agent_kind] = policy


def policy_for(agent_kind: str) -> DeliveryPolicy:
    """The policy of ``agent_kind``; the product's agent's for a kind none registered."""
    return _POLICIES.get(agent_kind, CONNECTED_AGENT)
