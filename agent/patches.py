"""Pending updates and whether the host needs a reboot: the ``patch_status`` report.

The updates come from the package manager's own list of upgradable packages, read from
its local package lists (no download: the host's own periodic refresh keeps those lists
current).  Security updates are those offered by a security suite.  Only apt can be
read so far; with another package manager the report says ``updates: null``.
"""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

from agent.packages.managers import PackageManager
from agent.processes import child_environment
from agent.protocol import PatchStatusData, PendingUpdate

log = logging.getLogger(__name__)

#: Seconds a listing of updates may take before it is given up.
LIST_TIMEOUT = 120.0
#: The most updates one report lists (the counts cover them all).
MAX_UPDATES = 1000

#: ``name/suite[,suite…] version arch [upgradable from: version]``
_APT_LINE = re.compile(
    r"^(?P<name>[^/\s]+)/(?P<suites>\S+)\s+(?P<available>\S+)\s+\S+"
    r"\s+\[upgradable from:\s*(?P<current>[^\]\s]+)\]"
)


def parse_apt_upgradable(text: str) -> list[PendingUpdate]:
    """The updates in the output of ``apt list --upgradable`` (other lines are skipped)."""
    updates: list[PendingUpdate] = []
    for line in text.splitlines():
        match = _APT_LINE.match(line.strip())
        if match is None:
            continue
        suites = match["suites"].split(",")
        updates.append(
            {
                "name": match["name"],
                "current": match["current"],
                "available": match["available"],
                "security": any(suite.endswith("-security") for suite in suites),
            }
        )
    return updates


def list_updates(manager: PackageManager | None) -> list[PendingUpdate] | None:
    """The pending updates the package manager lists, or None if it cannot tell."""
    if manager is None or manager.name != "apt":
        return None
    try:
        done = subprocess.run(
            ["apt", "list", "--upgradable"],
            capture_output=True,
            timeout=LIST_TIMEOUT,
            env=child_environment({"LC_ALL": "C"}),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("Cannot list pending updates: %s", exc)
        return None
    if done.returncode != 0:
        log.warning("apt list --upgradable failed with exit code %d", done.returncode)
        return None
    return parse_apt_upgradable(done.stdout.decode("utf-8", "replace"))


def reboot_required(flag_file: Path) -> bool:
    """Whether the package manager asked for a reboot (Debian and Ubuntu create
    ``/var/run/reboot-required`` when an update needs one)."""
    return flag_file.exists()


def collect_patch_status(manager: PackageManager | None, flag_file: Path) -> PatchStatusData:
    """The ``patch_status`` report: pending updates (security ones first) and whether a
    reboot is needed."""
    updates = list_updates(manager)
    if updates is None:
        return {
            "updates": None,
            "update_count": None,
            "security_count": None,
            "reboot_required": reboot_required(flag_file),
        }
    updates.sort(key=lambda u: (not u["security"], u["name"]))
    return {
        "updates": updates[:MAX_UPDATES],
        "update_count": len(updates),
        "security_count": sum(u["security"] for u in updates),
        "reboot_required": reboot_required(flag_file),
    }
