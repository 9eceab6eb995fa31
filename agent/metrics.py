"""Live metrics: CPU, memory, disk usage per real mount point, load average."""

from __future__ import annotations

import logging
import os

import psutil

from agent.protocol import MetricsData, utc_now_iso

log = logging.getLogger(__name__)

#: File systems that hold no user data worth reporting.
PSEUDO_FILESYSTEMS = frozenset(
    {
        "autofs",
        "binfmt_misc",
        "bpf",
        "cgroup",
        "cgroup2",
        "configfs",
        "debugfs",
        "devpts",
        "devtmpfs",
        "efivarfs",
        "fuse.lxcfs",
        "fuse.snapfuse",
        "fusectl",
        "hugetlbfs",
        "mqueue",
        "nsfs",
        "overlay",
        "proc",
        "pstore",
        "ramfs",
        "rpc_pipefs",
        "securityfs",
        "squashfs",
        "sysfs",
        "tmpfs",
        "tracefs",
    }
)
#: Most mount points reported (the server accepts at most 64).
MAX_MOUNTS = 64
#: Mount points under these directories belong to snaps or the system, not to users.
IGNORED_MOUNT_PREFIXES = ("/snap/", "/var/lib/snapd/", "/proc/", "/sys/", "/dev/", "/run/")


def prime_cpu_usage() -> None:
    """Start CPU accounting so that the first non-blocking reading is meaningful."""
    psutil.cpu_percent(interval=None)


def collect_metrics() -> MetricsData:
    """Return the ``metrics`` data: a timestamp and the current readings."""
    return {
        "timestamp": utc_now_iso(),
        "metrics": {
            "cpu_usage": float(psutil.cpu_percent(interval=None)),
            "memory_usage": float(psutil.virtual_memory().percent),
            "disk_usage": disk_usage(),
            "load_average": load_average(),
        },
    }


def disk_usage() -> dict[str, float]:
    """Percent used of each real, readable mount point."""
    usage: dict[str, float] = {}
    for partition in psutil.disk_partitions(all=False):
        if len(usage) >= MAX_MOUNTS:
            break
        if not is_real_mount(partition.device, partition.mountpoint, partition.fstype):
            continue
        try:
            usage[partition.mountpoint] = float(psutil.disk_usage(partition.mountpoint).percent)
        except OSError as exc:
            log.debug("Skipping unreadable mount point %s: %s", partition.mountpoint, exc)
    return usage


def is_real_mount(device: str, mountpoint: str, fstype: str) -> bool:
    """Whether a mount is a real file system (not pseudo, snap or loop)."""
    if fstype in PSEUDO_FILESYSTEMS or device.startswith("/dev/loop"):
        return False
    return not mountpoint.startswith(IGNORED_MOUNT_PREFIXES)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    try:
        values = os.getloadavg()
    except (AttributeError, OSError):
        values = psutil.getloadavg()
    return [round(float(value), 2) for value in values]
