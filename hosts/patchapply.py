"""
Applying updates and rebooting hosts, for both agents.

Each request is a package operation of its own kind (``upgrade`` or ``reboot``), so that
it travels, is shown and is waited for as every package operation is: this project's
agent gets a ``package_operation`` (``docs/agent-protocol.md``), the SysManage agent its
own ``apply_updates`` or ``reboot_system`` command (``hosts.smagent.deliveries``).

A reboot does not end when the agent says it began: the operation waits, ``in_progress``,
until the host's agent connects again (:func:`hosts.services.host_agent_hello`), and
fails if the host is not back within ``HOST_REBOOT_TIMEOUT_SECONDS``.  Both agents look
at pending updates again when they connect, so the host's patch status is fresh then.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from hosts import services
from hosts.models import Host, PackageOperation, PackageOperationKind, is_package_name
from hosts.patching import PendingUpdate
from sysmanage.audit import Actor

#: ``package`` of an ``upgrade``: every pending update, or only security updates.  Package
#: names never start with ``*``, so these cannot be taken for a list of names.
ALL_UPDATES, SECURITY_UPDATES = "*", "*security"
#: What ``which`` of a request may say.
Which = Literal["all", "security", "packages"]
WHICH: tuple[Which, ...] = ("all", "security", "packages")
#: The most characters the names of one request take together (the operation's
#: ``package`` column).
MAX_NAMES_LENGTH = 255


def updates_to_apply(
    target: str, pending: list[PendingUpdate]
) -> tuple[list[PendingUpdate], list[str]]:
    """The pending updates that an ``upgrade`` operation's ``package`` selects
    (:data:`ALL_UPDATES`, :data:`SECURITY_UPDATES`, or package names separated by
    spaces), and the names it asks for that are not pending."""
    if target == ALL_UPDATES:
        return list(pending), []
    if target == SECURITY_UPDATES:
        return [u for u in pending if u["security"]], []
    names = target.split()
    by_name = {u["name"]: u for u in pending}
    return [by_name[n] for n in names if n in by_name], [n for n in names if n not in by_name]


class PatchRequestError(ValueError):
    """A request to apply updates that cannot be carried out as given."""


@dataclass(frozen=True)
class UpdatesRequest:
    """Which updates to apply: all, security only, or the named packages."""

    which: Which
    packages: tuple[str, ...] = ()

    @property
    def target(self) -> str:
        """The ``package`` of the ``upgrade`` operation that applies them."""
        if self.which == "all":
            return ALL_UPDATES
        if self.which == "security":
            return SECURITY_UPDATES
        return " ".join(self.packages)


def parse_updates_request(data: Mapping[str, Any]) -> UpdatesRequest:
    """``{"which": "all"|"security"|"packages", "packages": [names]}`` checked (``which``
    defaults to all; ``packages`` is needed with, and only with, ``packages``)."""
    which = data.get("which", "all")
    if which not in WHICH:
        raise PatchRequestError("'which' must be one of " + ", ".join(WHICH))
    names = data.get("packages")
    if which != "packages":
        if names not in (None, []):
            raise PatchRequestError("'packages' goes only with 'which': 'packages'")
        return UpdatesRequest(which)
    return UpdatesRequest("packages", _names(names))


def _names(names: object) -> tuple[str, ...]:
    if not isinstance(names, list) or not names:
        raise PatchRequestError("'packages' must be a non-empty list of package names")
    if not all(is_package_name(name) for name in names) or any(n.startswith("*") for n in names):
        raise PatchRequestError("each of 'packages' must be one package name")
    unique = tuple(dict.fromkeys(names))
    if len(" ".join(unique)) > MAX_NAMES_LENGTH:
        raise PatchRequestError(
            f"the package names may take {MAX_NAMES_LENGTH} characters together; "
            "apply them in several requests, or apply all updates"
        )
    return unique


def updates_described(target: str) -> str:
    """What an ``upgrade`` operation's ``package`` means, for people."""
    if target == ALL_UPDATES:
        return "all pending updates"
    if target == SECURITY_UPDATES:
        return "security updates"
    return target


def host_apply_updates(
    *, host: Host, request: UpdatesRequest, user: Any, actor: Actor | None = None
) -> PackageOperation:
    """Ask ``host``'s agent to apply ``request``'s updates (an ``upgrade`` operation).
    Permission is the caller's to check (right ``patch_reboot``)."""
    return services.package_operation_create(
        host=host,
        operation=PackageOperationKind.UPGRADE,
        package=request.target,
        user=user,
        actor=actor,
    )


def host_reboot(*, host: Host, user: Any, actor: Actor | None = None) -> PackageOperation:
    """Ask ``host``'s agent to reboot the host (a ``reboot`` operation, which ends when
    the host is back).  Permission is the caller's to check (right ``patch_reboot``)."""
    return services.package_operation_create(
        host=host, operation=PackageOperationKind.REBOOT, package="", user=user, actor=actor
    )


#: The kinds of package operation that need the right ``patch_reboot`` rather than
#: ``run_package_operation``.
PATCH_KINDS: Sequence[str] = (PackageOperationKind.UPGRADE, PackageOperationKind.REBOOT)
