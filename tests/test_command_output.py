"""Who sees a command's text and output: the requester, holders of
``hosts.view_command_output`` and superusers; everyone else learns only that it ran.
The same rule in REST, on ``command_execution``, and in the admin."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from hosts import services as host_services
from hosts.models import ExecutionStatus, OperationStatus
from sysmanage import recheck
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.node import Node
from tests.conftest import PASSWORD
from tests.wsutil import next_event, open_socket, subscribe

SECRET = "mysql -p'hunter2' -e 'select 1'"
OUTPUT = "password accepted: hunter2"
PRIVATE = ("command", "stdout", "stderr", "error")
#: A list carries lengths and previews of the outputs instead (the detail has them whole).
LIST_PRIVATE = (
    "command",
    "stdout_preview",
    "stderr_preview",
    "stdout_length",
    "stderr_length",
    "error",
)


def ran_command(user, host=None):
    host = host or host_services.host_create(hostname="web-01")
    execution = host_services.command_create(host=host, command=SECRET, timeout=5, user=user)
    return host_services.command_finish(
        execution=execution,
        status=ExecutionStatus.COMPLETED,
        exit_code=0,
        stdout=OUTPUT,
        stderr="warn hunter2",
        execution_time=0.1,
    )


def rest(username: str) -> APIClient:
    client = APIClient()
    response = client.post(
        "/api/token/", {"username": username, "password": PASSWORD}, format="json"
    )
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {response.data['access']}")
    return client


@pytest.mark.django_db
def test_rest_shows_text_and_output_to_those_who_may_see_them(make_user):
    requester = make_user("alice", perms=["sysmanage.run_command"])
    make_user("bob")
    make_user("auditor", perms=["hosts.view_command_output"])
    make_user("root", superuser=True)
    execution = ran_command(requester)
    for username, visible in (("alice", True), ("auditor", True), ("root", True), ("bob", False)):
        detail = rest(username).get(f"/api/commands/{execution.id}/").data
        listed = rest(username).get("/api/commands/").data["results"][0]
        for row, output, private in (
            (detail, "stdout", PRIVATE),
            (listed, "stdout_preview", LIST_PRIVATE),
        ):
            assert row["redacted"] is (not visible), username
            assert row["status"] == "completed"
            assert row["requested_by"] == "alice"
            if visible:
                assert (row["command"], row[output]) == (SECRET, OUTPUT)
            else:
                assert all(row[field] is None for field in private), row
                assert "hunter2" not in str(row)


@pytest.mark.django_db
def test_rest_hides_package_operation_output_the_same_way(make_user):
    requester = make_user("alice")
    make_user("bob")
    host = host_services.host_create(hostname="web-01")
    operation = host_services.package_operation_create(
        host=host, operation="install", package="nginx", user=requester
    )
    host_services.package_operation_update(
        operation=operation,
        status=OperationStatus.COMPLETED,
        progress=100,
        message="Installed",
        output="db_password=hunter2",
    )
    mine = rest("alice").get(f"/api/package-operations/{operation.id}/").data
    theirs = rest("bob").get(f"/api/package-operations/{operation.id}/").data
    assert (mine["output"], mine["redacted"]) == ("db_password=hunter2", False)
    assert (theirs["output"], theirs["redacted"]) == (None, True)
    assert theirs["message"] == "Installed"
    assert theirs["package"] == "nginx"
    [listed] = rest("bob").get("/api/package-operations/").data["results"]
    assert (listed["output_preview"], listed["output_length"], listed["redacted"]) == (
        None,
        None,
        True,
    )
    [own] = rest("alice").get("/api/package-operations/").data["results"]
    assert (own["output_preview"], own["redacted"]) == ("db_password=hunter2", False)


@pytest.mark.django_db(transaction=True)
async def test_command_execution_events_carry_output_only_for_those_who_may_see_it(
    make_user, token_for
):
    alice = await database_sync_to_async(make_user)("alice")
    bob = await database_sync_to_async(make_user)("bob")
    auditor = await database_sync_to_async(make_user)(
        "auditor", perms=["hosts.view_command_output"]
    )
    sockets = {}
    for user in (alice, bob, auditor):
        sockets[user.username] = comm = await open_socket("/ws", token=token_for(user))
        await subscribe(comm, "command_execution")
    await database_sync_to_async(ran_command)(alice)
    for username, visible in (("alice", True), ("auditor", True), ("bob", False)):
        events = [await next_event(sockets[username], "command_execution") for _ in range(2)]
        assert [e["data"]["status"] for e in events] == ["pending", "completed"]
        for event in events:
            data = event["data"]
            assert "requested_by_id" not in data
            assert data["requested_by"] == "alice"
            assert data["redacted"] is (not visible)
            if visible:
                assert data["command"] == SECRET
            else:
                assert all(data[field] is None for field in PRIVATE), data
                assert "hunter2" not in str(event)
        assert events[1]["data"]["stdout"] == (OUTPUT if visible else None)
    # three subscribers in one bucket, two audiences: two frames per event
    assert Node.current().hub.stats["frames"] == 4
    for comm in sockets.values():
        await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_losing_the_permission_hides_output_from_the_next_events(make_user, token_for):
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    alice = await database_sync_to_async(make_user)("alice")
    auditor = await database_sync_to_async(make_user)(
        "auditor", perms=["hosts.view_command_output"]
    )
    comm = await open_socket("/ws", token=token_for(auditor))
    await subscribe(comm, "command_execution")
    through = get_user_model().user_permissions.through
    await database_sync_to_async(
        through.objects.filter(
            user_id=auditor.pk,
            permission__in=Permission.objects.filter(codename="view_command_output"),
        ).delete
    )()  # no signal: the recheck finds it
    await recheck.recheck(Node.current().hub)
    await database_sync_to_async(ran_command)(alice)
    event = await next_event(comm, "command_execution")
    assert event["data"]["redacted"] is True
    assert event["data"]["command"] is None
    await comm.disconnect()


@pytest.mark.django_db
def test_admin_hides_text_and_output_from_staff_without_the_permission(client, make_user):
    alice = make_user("alice")
    execution = ran_command(alice)
    make_user("clerk", staff=True, perms=["hosts.view_commandexecution"])
    assert client.login(username="clerk", password=PASSWORD)
    listing = client.get("/admin/hosts/commandexecution/").content.decode()
    assert "(hidden)" in listing
    assert "hunter2" not in listing
    detail = client.get(f"/admin/hosts/commandexecution/{execution.id}/change/")
    assert detail.status_code == 200
    assert "hunter2" not in detail.content.decode()
    # searching for the text finds nothing (and so reveals nothing)
    assert "(hidden)" in client.get("/admin/hosts/commandexecution/?q=web-01").content.decode()
    assert "(hidden)" not in client.get("/admin/hosts/commandexecution/?q=hunter2").content.decode()
    client.logout()
    make_user(
        "auditor", staff=True, perms=["hosts.view_commandexecution", "hosts.view_command_output"]
    )
    assert client.login(username="auditor", password=PASSWORD)
    detail = client.get(f"/admin/hosts/commandexecution/{execution.id}/change/")
    assert OUTPUT in detail.content.decode()
