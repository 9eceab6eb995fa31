"""An upgrade's migrations while the previous release serves, on PostgreSQL.

``manage.py migrate`` runs before the processes restart one by one
(deploy/rolling-restart.sh), so for a while the previous release's code writes to the
new schema.  Here the models of the release before output truncation (hosts 0006:
no truncation flags) create a host, a command and a package operation in a database
migrated to the latest schema, and the current code reads them.  Without the database
defaults of hosts 0008 these inserts fail (NOT NULL), which during a real upgrade is
every command and package operation until the last process restarted.  And the
previous release deletes a host the new one put in a group: without the cascade of
hosts 0010 in the database that delete fails on the membership's foreign key.
tests/test_migrations_rolling.py holds every later migration to the same rule.
"""

from __future__ import annotations

import json

import pytest

from tests.integration import harness
from tests.integration.conftest import POSTGRES_ADMIN_URL, require_postgres

pytestmark = [pytest.mark.integration, pytest.mark.postgres_redis]

#: The schema the previous release's code was written for.
PREVIOUS = ("hosts", "0006_registration_hardening")

OLD_CODE_WRITES = f"""
import json, django
django.setup()
from django.db import connection
from django.db.migrations.loader import MigrationLoader

old = MigrationLoader(connection).project_state({PREVIOUS!r}).apps
Host = old.get_model("hosts", "Host")
Command = old.get_model("hosts", "CommandExecution")
Operation = old.get_model("hosts", "PackageOperation")
host = Host.objects.create(hostname="rolling-1")
command = Command.objects.create(host=host, command="uptime")
operation = Operation.objects.create(host=host, operation="install", package="htop")
Command.objects.filter(pk=command.pk).update(status="completed", stdout="up")

from hosts.models import CommandExecution, Host as NewHost, HostGroup, PackageOperation
new_command = CommandExecution.objects.get(pk=command.pk)
new_operation = PackageOperation.objects.get(pk=operation.pk)

# a host the new release put in a group, deleted by the previous release (which does not
# know the membership table): the membership must go with it
group = HostGroup.objects.create(name="rolling")
NewHost.objects.get(pk=host.pk).groups.add(group)
Host.objects.filter(pk=host.pk).delete()
print(json.dumps({{
    "stdout": new_command.stdout,
    "stdout_truncated": new_command.stdout_truncated,
    "stderr_truncated": new_command.stderr_truncated,
    "output_truncated": new_operation.output_truncated,
    "members_left": group.hosts.count(),
    "hosts_left": NewHost.objects.filter(pk=host.pk).count(),
}}))
"""


def test_the_previous_release_keeps_writing_after_the_migrations():
    require_postgres()
    database = harness.create_postgres_database(POSTGRES_ADMIN_URL)
    try:
        env = harness.server_env(
            DATABASE_URL=harness.with_database(POSTGRES_ADMIN_URL, database),
            DJANGO_SECRET_KEY=harness.new_secret(),
        )
        harness.run_python(["manage.py", "migrate", "--noinput"], env, what="migrate")
        result = harness.run_python(["-c", OLD_CODE_WRITES], env, what="the previous models")
        read = json.loads(result.stdout.splitlines()[-1])
        assert read == {
            "stdout": "up",
            "stdout_truncated": False,
            "stderr_truncated": False,
            "output_truncated": False,
            "members_left": 0,
            "hosts_left": 0,
        }, read
    finally:
        harness.drop_postgres_database(POSTGRES_ADMIN_URL, database)
