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
