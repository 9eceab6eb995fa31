"""The package managers the agent can drive, and how to call each of them."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from agent.processes import child_environment

INSTALL, REMOVE, UPDATE = "install", "remove", "update"
OPERATIONS = (INSTALL, REMOVE, UPDATE)
#: Applying updates (every pending one, security ones, or named packages) and rebooting.
UPGRADE, REBOOT = "upgrade", "reboot"
#: ``package`` of an ``upgrade``: every pending update, or security updates only.
ALL_UPDATES, SECURITY_UPDATES = "*", "*security"

#: Seconds apt waits for another package manager to release its lock.
APT_LOCK_TIMEOUT = 120


@dataclass(frozen=True, slots=True)
class PackageManager:
    """How to run one package manager without a shell and without prompts."""

    name: str
    executable: str
    subcommands: Mapping[str, tuple[str, ...]]
    requires: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    #: Suffix of local package files it can install (``.deb`` for apt).
    local_suffix: str | None = None
    #: Whether it reports progress on a file descriptor (``APT::Status-Fd``).
    status_fd: bool = False
    #: The subcommand that applies every pending update, and the one that applies only
    #: security updates (empty: it cannot tell them apart by itself).
    upgrade_all: tuple[str, ...] = ()
    upgrade_security: tuple[str, ...] = ()

    @property
    def capability(self) -> str:
        """The ``hello`` capability naming this manager, e.g. ``packages:apt``."""
        return f"packages:{self.name}"

    def argv(self, operation: str, target: str, status_fd: int | None = None) -> list[str]:
        """The argument vector for ``operation`` on ``target`` (a name or an absolute path)."""
        status = ["-o", f"APT::Status-Fd={status_fd}"] if status_fd is not None else []
        return [self.executable, *status, *self.options, *self.subcommands[operation], target]

    def command(
        self, subcommand: Sequence[str], targets: Sequence[str], status_fd: int | None = None
    ) -> list[str]:
        """The argument vector for ``subcommand`` on ``targets`` (package names)."""
        status = ["-o", f"APT::Status-Fd={status_fd}"] if status_fd is not None else []
        return [self.executable, *status, *self.options, *subcommand, *targets]

    def env(self) -> dict[str, str]:
        """The environment for the package manager: the agent's plus non-interactive flags."""
        return child_environment(dict(self.environment))


APT = PackageManager(
    name="apt",
    executable="apt-get",
    requires=("apt-get", "dpkg"),
    subcommands={
        INSTALL: ("install", "-y"),
        REMOVE: ("remove", "-y"),
        UPDATE: ("install", "--only-upgrade", "-y"),
    },
    options=(
        "-o",
        f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT}",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
    ),
    environment={
        "DEBIAN_FRONTEND": "noninteractive",
        "APT_LISTCHANGES_FRONTEND": "none",
        "NEEDRESTART_MODE": "a",
    },
    local_suffix=".deb",
    status_fd=True,
    upgrade_all=("upgrade", "--with-new-pkgs", "-y"),
)
DNF = PackageManager(
    name="dnf",
    executable="dnf",
    subcommands={INSTALL: ("install", "-y"), REMOVE: ("remove", "-y"), UPDATE: ("upgrade", "-y")},
    local_suffix=".rpm",
    upgrade_all=("upgrade", "-y"),
    upgrade_security=("upgrade", "--security", "-y"),
)
YUM = PackageManager(
    name="yum",
    executable="yum",
    subcommands={INSTALL: ("install", "-y"), REMOVE: ("remove", "-y"), UPDATE: ("update", "-y")},
    local_suffix=".rpm",
    upgrade_all=("update", "-y"),
    upgrade_security=("update", "--security", "-y"),
)
APK = PackageManager(
    name="apk",
    executable="apk",
    options=("--no-progress",),
    subcommands={INSTALL: ("add",), REMOVE: ("del",), UPDATE: ("add", "--upgrade")},
    upgrade_all=("upgrade",),
)
ZYPPER = PackageManager(
    name="zypper",
    executable="zypper",
    options=("--non-interactive",),
    subcommands={INSTALL: ("install",), REMOVE: ("remove",), UPDATE: ("update",)},
    local_suffix=".rpm",
    upgrade_all=("update",),
    upgrade_security=("patch", "--category", "security"),
)

#: In order of preference.
KNOWN_MANAGERS = (APT, DNF, YUM, APK, ZYPPER)


def detect_manager(which: Callable[[str], str | None] = shutil.which) -> PackageManager | None:
    """The first known package manager whose programs are all on ``PATH``, if any."""
    for manager in KNOWN_MANAGERS:
        if all(which(program) for program in (manager.requires or (manager.executable,))):
            return manager
    return None
