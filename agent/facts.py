"""What the agent tells the server about its host in ``hello``."""

from __future__ import annotations

import ipaddress
import os
import platform
import socket

import psutil

from agent import __version__
from agent.protocol import HelloData

_ADDRESS_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def collect_facts(hostname: str | None, capabilities: list[str]) -> HelloData:
    """Return the ``hello`` data: identity, addresses, OS, hardware and capabilities."""
    os_name, os_version = os_release()
    return {
        "hostname": hostname or socket.gethostname(),
        "fqdn": socket.getfqdn(),
        "ip_addresses": ip_addresses(),
        "os_name": os_name,
        "os_version": os_version,
        "kernel": platform.release(),
        "architecture": platform.machine(),
        "cpu_count": psutil.cpu_count() or os.cpu_count() or 1,
        "memory_total": int(psutil.virtual_memory().total),
        "agent_version": __version__,
        "capabilities": list(capabilities),
    }


def ip_addresses() -> list[str]:
    """The host's IPv4 and IPv6 addresses, without loopback and link-local ones."""
    found: list[str] = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family not in _ADDRESS_FAMILIES:
                continue
            text = address.address.split("%", 1)[0]
            if _is_reportable(text) and text not in found:
                found.append(text)
    return found


def _is_reportable(text: str) -> bool:
    """Whether ``text`` is an address worth reporting."""
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        return False
    return not (parsed.is_loopback or parsed.is_link_local or parsed.is_unspecified)


def os_release() -> tuple[str, str]:
    """The OS name and version: from os-release on Linux, from ``platform`` elsewhere."""
    try:
        info = platform.freedesktop_os_release()
    except OSError:
        info = {}
    name = info.get("NAME") or platform.system()
    version = info.get("VERSION_ID") or info.get("VERSION") or platform.version()
    return name, version
