"""Applying updates: which package manager run an ``upgrade`` operation is.

``package`` names what to apply: ``*`` every pending update, ``*security`` only security
updates, or package names separated by spaces (each updated if an update is pending).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from agent.errors import RequestError
from agent.packages.managers import ALL_UPDATES, SECURITY_UPDATES, UPDATE, PackageManager
from agent.packages.validation import PACKAGE_NAME
from agent.patches import list_updates

#: The argument vector of the run, given the status descriptor (apt's progress), if any.
Argv = Callable[[int | None], list[str]]
#: The most package names one ``upgrade`` may name.
MAX_NAMES = 100


def check_target(package: str) -> None:
    """Raise RequestError unless ``package`` is ``*``, ``*security`` or package names."""
    if package in (ALL_UPDATES, SECURITY_UPDATES):
        return
    names = package.split()
    if not names or len(names) > MAX_NAMES:
        raise RequestError(f"'package' must be *, *security or 1 to {MAX_NAMES} package names")
    if not all(PACKAGE_NAME.fullmatch(name) for name in names):
        raise RequestError("invalid package name in 'package'")


def describe(package: str) -> str:
    """What an ``upgrade`` of ``package`` applies, for people."""
    if package == ALL_UPDATES:
        return "apply all pending updates"
    if package == SECURITY_UPDATES:
        return "apply security updates"
    return f"apply updates to {package}"


async def upgrade_argv(manager: PackageManager, package: str) -> Argv | None:
    """How to run the ``upgrade`` of ``package`` with ``manager``; None when there is
    nothing to apply.  Raises RequestError when ``manager`` cannot do it."""
    if package == ALL_UPDATES:
        return _argv(manager, manager.upgrade_all, ())
    if package != SECURITY_UPDATES:
        return _argv(manager, manager.subcommands[UPDATE], tuple(package.split()))
    if manager.upgrade_security:
        return _argv(manager, manager.upgrade_security, ())
    # apt has no security-only upgrade: update the packages a security suite offers
    pending = await asyncio.to_thread(list_updates, manager)
    if pending is None:
        raise RequestError(f"{manager.executable} cannot tell security updates apart here")
    names = tuple(update["name"] for update in pending if update["security"])
    return _argv(manager, manager.subcommands[UPDATE], names) if names else None


def _argv(manager: PackageManager, subcommand: tuple[str, ...], names: tuple[str, ...]) -> Argv:
    if not subcommand:
        raise RequestError(f"{manager.executable} cannot apply every update here")
    return lambda status_fd: manager.command(subcommand, names, status_fd)
