"""
Run inside a subprocess with the server's environment (DATABASE_URL, ...).

``python tests/integration/_django_helper.py seed`` migrates the database named by
DATABASE_URL and creates the users and hosts the integration tests rely on, then
prints one line ``SEED_JSON: {...}`` describing them.  It never talks to a server.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sysmanage.settings")

import django  # noqa: E402

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.contrib.auth.models import Permission  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.utils import timezone  # noqa: E402

from hosts import services as host_services  # noqa: E402
from hosts.models import Host  # noqa: E402
from sysmanage.protocol import iso  # noqa: E402

PASSWORD = "correct horse battery staple"

#: username -> (is_staff, is_superuser)
USERS = {
    "admin": (True, True),
    "viewer": (False, False),
    "doomed": (False, False),
}

#: hostname -> status the host starts in
HOSTS = {
    "web-01": "offline",
    "db-01": "online",
    "cache-01": "unknown",
    "fleet-01": "offline",
    "fleet-02": "offline",
    "pg-01": "offline",
}


def seed() -> dict:
    call_command("migrate", interactive=False, verbosity=0)
    user_model = get_user_model()
    users = {}
    for username, (staff, superuser) in USERS.items():
        user = user_model.objects.create_user(
            username=username,
            password=PASSWORD,
            is_staff=staff,
            is_superuser=superuser,
            email=f"{username}@example.com",
        )
        if not staff:  # sees every host, as users from before scoped access do
            user.user_permissions.add(
                Permission.objects.get(content_type__app_label="hosts", codename="view_all_hosts")
            )
        users[username] = str(user.pk)
    hosts = {}
    for hostname, status in HOSTS.items():
        host = host_services.host_create(
            hostname=hostname, fqdn=f"{hostname}.example.com", os_name="Debian", os_version="12"
        )
        # online hosts were just heard from, so that no sweep takes them offline
        last_seen = timezone.now() if status == "online" else None
        Host.objects.filter(pk=host.pk).update(status=status, last_seen=last_seen)
        hosts[hostname] = {"id": str(host.pk), "status": status, "last_seen": iso(last_seen)}
    return {"users": users, "hosts": hosts, "password": PASSWORD}


if __name__ == "__main__":
    if sys.argv[1:] != ["seed"]:
        raise SystemExit("usage: _django_helper.py seed")
    print("SEED_JSON: " + json.dumps(seed()), flush=True)
