"""Open sockets act on rights as they are now: fresh checks on privileged actions, and the
recheck that closes sockets and ends subscriptions (through the consumer, in-process)."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import Group, Permission
from django.contrib.sessions.models import Session
from django.test import Client
from django.utils import timezone

from sysmanage import recheck, selectors
from sysmanage.control import RecheckUsers
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.node import Node
from tests.conftest import PASSWORD
from tests.wsutil import expect_close, open_socket, request, subscribe

pytestmark = pytest.mark.django_db(transaction=True)

User = get_user_model()
READER = ("activity.view_useractivity",)


def _perm(perm: str) -> Permission:
    app_label, codename = perm.split(".")
    return Permission.objects.get(content_type__app_label=app_label, codename=codename)


def _drop_perm_unseen(user, perm: str) -> None:
    """Remove a permission without any signal (as raw SQL or a bulk delete would)."""
    User.user_permissions.through.objects.filter(user_id=user.pk, permission=_perm(perm)).delete()


async def command(comm, channel="command_execution", id_="c1"):
    data = (
        {"host_id": str(uuid.uuid4()), "command": "uptime"}
        if channel == "command_execution"
        else {"action": "acknowledge", "alert_id": str(uuid.uuid4())}
    )
    return await request(comm, {"type": "command", "channel": channel, "id": id_, "data": data})


async def run_recheck() -> None:
    await recheck.recheck(Node.current().hub)


async def expect_revoked(comm, channel="user_activity"):
    error = await comm.receive_json_from(timeout=3)
    assert error["type"] == "error", error
    assert error["channel"] == channel
    assert error["data"]["code"] == "SUBSCRIPTION_REVOKED"
    assert error["data"]["requested_channel"] == channel
    return error


async def expect_closed_with(comm, message):
    error = await comm.receive_json_from(timeout=3)
    assert error["data"] == {
        "code": "AUTH_FAILED",
        "message": message,
        "action": "reconnect_with_valid_token",
    }
    assert await expect_close(comm) == 4001


# -- privileged actions check the database at once --------------------------------------------


@pytest.mark.parametrize(
    ("perm", "channel"),
    [
        ("sysmanage.run_command", "command_execution"),
        ("sysmanage.run_command", "package_operations"),
        ("alerts.change_alert", "system_alerts"),
    ],
)
async def test_a_right_removed_unseen_is_refused_at_the_next_command(
    make_user, token_for, perm, channel
):
    user = await database_sync_to_async(make_user)("ops", perms=[perm])
    comm = await open_socket("/ws", token=token_for(user))

    async def attempt(id_):
        if channel == "package_operations":
            return await request(
                comm,
                {
                    "type": "command",
                    "channel": channel,
                    "id": id_,
                    "data": {"host_id": str(uuid.uuid4()), "operation": "install", "package": "x"},
                },
            )
        return await command(comm, channel, id_)

    allowed = await attempt("before")
    assert allowed["data"]["code"] == "COMMAND_FAILED", allowed  # past the permission
    await database_sync_to_async(_drop_perm_unseen)(user, perm)
    refused = await attempt("after")
    assert refused["data"]["code"] == "PERMISSION_DENIED", refused
    assert refused["id"] == "after"
    await comm.disconnect()


async def test_superuser_status_removed_unseen_is_refused_at_once(make_user, token_for):
    user = await database_sync_to_async(make_user)("root", superuser=True)
    comm = await open_socket("/ws", token=token_for(user))
    assert (await command(comm))["data"]["code"] == "COMMAND_FAILED"
    await database_sync_to_async(User.objects.filter(pk=user.pk).update)(is_superuser=False)
    assert (await command(comm, id_="c2"))["data"]["code"] == "PERMISSION_DENIED"
    await comm.disconnect()


async def test_subscribing_asks_the_database_too(make_user, token_for):
    user = await database_sync_to_async(make_user)("boss", staff=True, perms=READER)
    comm = await open_socket("/ws", token=token_for(user))
    await database_sync_to_async(User.objects.filter(pk=user.pk).update)(is_staff=False)
    reply = await request(comm, {"type": "subscribe", "channel": "user_activity", "id": "s"})
    assert reply["data"]["code"] == "SUBSCRIPTION_FAILED"
    await comm.disconnect()


# -- the recheck: subscriptions that lose their right ----------------------------------------


async def test_recheck_ends_a_subscription_whose_right_was_lost_unseen(make_user, token_for):
    user = await database_sync_to_async(make_user)("boss", staff=True, perms=READER)
    comm = await open_socket("/ws", token=token_for(user))
    await subscribe(comm, "user_activity")
    await subscribe(comm, "host_status")
    await comm.receive_json_from(timeout=3)  # the host_status snapshot
    await database_sync_to_async(User.objects.filter(pk=user.pk).update)(is_staff=False)
    await run_recheck()
    error = await expect_revoked(comm)
    assert "no longer have permission" in error["data"]["message"]
    assert Node.current().hub.subscriber_count("user_activity") == 0
    assert Node.current().hub.subscriber_count("host_status") == 1  # needs no right: kept
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"  # socket stays open
    await comm.disconnect()


@pytest.mark.parametrize(
    "how",
    [
        "staff-flag-saved",
        "permission-removed",
        "group-removed",
        "group-permission-removed",
        "group-deleted",
    ],
)
async def test_signalled_changes_end_the_subscription_at_once(make_user, token_for, how):
    group = await database_sync_to_async(Group.objects.create)(name="readers")

    def setup():
        user = make_user("boss", staff=True, perms=() if how.startswith("group") else READER)
        if how.startswith("group"):
            group.permissions.add(_perm(READER[0]))
            user.groups.add(group)
        return user

    user = await database_sync_to_async(setup)()
    comm = await open_socket("/ws", token=token_for(user))
    await subscribe(comm, "user_activity")

    def change():
        if how == "staff-flag-saved":
            user.is_staff = False
            user.save()
        elif how == "permission-removed":
            user.user_permissions.remove(_perm(READER[0]))
        elif how == "group-removed":
            group.user_set.remove(user)
        elif how == "group-permission-removed":
            group.permissions.clear()
        else:
            group.delete()

    await database_sync_to_async(change)()
    # no periodic run is due (its first run was at connect, the next in 5 s)
    await expect_revoked(comm)
    await comm.disconnect()


# -- the recheck: sockets that must close -----------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"password": make_password("changed elsewhere")}, recheck.CREDENTIALS_CHANGED),
        ({"is_active": False}, recheck.DISABLED),
    ],
)
async def test_recheck_closes_sockets_after_unseen_changes(make_user, token_for, change, message):
    user = await database_sync_to_async(make_user)("alice")
    other = await database_sync_to_async(make_user)("bob")
    comm = await open_socket("/ws", token=token_for(user))
    bystander = await open_socket("/ws", token=token_for(other))
    await database_sync_to_async(User.objects.filter(pk=user.pk).update)(**change)
    await run_recheck()
    await expect_closed_with(comm, message)
    assert (await request(bystander, {"type": "ping"}))["type"] == "pong"
    await bystander.disconnect()


async def test_recheck_closes_sockets_of_a_user_deleted_unseen(make_user, token_for):
    # no permission rows: a raw delete leaves none behind to break a foreign key
    user = await database_sync_to_async(make_user)("alice", every_host=False)
    comm = await open_socket("/ws", token=token_for(user))
    # a raw delete: no signal, as from another program sharing the database
    await database_sync_to_async(User.objects.filter(pk=user.pk)._raw_delete)("default")
    await run_recheck()
    await expect_closed_with(comm, recheck.DELETED)


async def test_password_saved_closes_sockets_at_once(make_user, token_for):
    user = await database_sync_to_async(make_user)("alice")
    comm = await open_socket("/ws", token=token_for(user))

    def change():
        user.set_password("a new password for alice")
        user.save()

    await database_sync_to_async(change)()
    await expect_closed_with(comm, recheck.CREDENTIALS_CHANGED)


async def session_socket(username: str):
    client = Client()
    assert await database_sync_to_async(client.login)(username=username, password=PASSWORD)
    key = client.cookies["sessionid"].value
    comm = await open_socket("/ws", headers=[(b"cookie", f"sessionid={key}".encode())])
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"
    return comm, key


@pytest.mark.parametrize("how", ["deleted", "expired", "other-user"])
async def test_recheck_closes_a_session_socket_whose_session_ended(make_user, how):
    await database_sync_to_async(make_user)("alice")
    comm, key = await session_socket("alice")
    rows = Session.objects.filter(session_key=key)
    if how == "deleted":
        await database_sync_to_async(rows.delete)()
    elif how == "expired":
        await database_sync_to_async(rows.update)(expire_date=timezone.now() - timedelta(seconds=1))
    else:
        other = await database_sync_to_async(make_user)("mallory")

        def swap():
            session = Session.objects.get(session_key=key)
            data = session.get_decoded()
            data["_auth_user_id"] = str(other.pk)
            Session.objects.filter(session_key=key).update(
                session_data=Session.objects.encode(data)
            )

        await database_sync_to_async(swap)()
    await run_recheck()
    await expect_closed_with(comm, recheck.SESSION_ENDED)


async def test_recheck_leaves_unchanged_sockets_alone(make_user, token_for):
    user = await database_sync_to_async(make_user)("boss", staff=True, perms=READER)
    comm = await open_socket("/ws", token=token_for(user))
    session_comm, _ = await session_socket("boss")
    await subscribe(comm, "user_activity")
    assert await recheck.recheck(Node.current().hub) == 2
    assert await comm.receive_nothing(timeout=0.2)
    assert await session_comm.receive_nothing(timeout=0.1)
    assert Node.current().hub.subscriber_count("user_activity") == 1
    await comm.disconnect()
    await session_comm.disconnect()


async def test_the_periodic_recheck_runs_by_itself(make_user, token_for, settings):
    settings.WS_RECHECK_SECONDS = 0.3
    user = await database_sync_to_async(make_user)("alice")
    comm = await open_socket("/ws", token=token_for(user))
    await database_sync_to_async(User.objects.filter(pk=user.pk).update)(is_active=False)
    started = time.monotonic()
    await expect_closed_with(comm, recheck.DISABLED)
    assert time.monotonic() - started < 2


async def test_an_older_reading_of_rights_does_not_override_a_newer_one(make_user, token_for):
    user = await database_sync_to_async(make_user)("boss", staff=True, perms=READER)
    comm = await open_socket("/ws", token=token_for(user))
    await subscribe(comm, "user_activity")
    [conn] = Node.current().hub.by_user[str(user.pk)]
    conn.update_rights(frozenset(), read_at=conn.rights_read_at - 1, scope=None)  # stale: ignored
    assert await comm.receive_nothing(timeout=0.2)
    conn.update_rights(frozenset(), read_at=time.monotonic(), scope=None)
    await expect_revoked(comm)
    await comm.disconnect()


# -- the reads are a fixed number of queries ---------------------------------------------


@pytest.mark.parametrize("count", [1, 8])
def test_users_with_permissions_is_two_queries(make_user, django_assert_num_queries, count):
    users = [make_user(f"u{i}", perms=READER) for i in range(count)]
    group = Group.objects.create(name="g")
    group.permissions.add(_perm("alerts.change_alert"))
    users[0].groups.add(group)
    with django_assert_num_queries(2):
        found = selectors.users_with_permissions(
            user_ids=[str(u.pk) for u in users] + [str(uuid.uuid4())]
        )
        assert set(found) == {str(u.pk) for u in users}
        assert found[str(users[0].pk)].has_perm("alerts.change_alert")
        assert all(u.has_perm(READER[0]) for u in found.values())
        assert not found[str(users[-1].pk)].has_perm("hosts.change_host")


def test_live_sessions_is_one_query(make_user, django_assert_num_queries):
    make_user("alice")
    keys = []
    for _ in range(3):
        client = Client()
        client.login(username="alice", password=PASSWORD)
        keys.append(client.cookies["sessionid"].value)
    Session.objects.filter(session_key=keys[0]).update(
        expire_date=timezone.now() - timedelta(seconds=1)
    )
    with django_assert_num_queries(1):
        live = selectors.live_sessions(session_keys=[*keys, "missing"])
    assert set(live) == set(keys[1:])


async def test_rechecker_merges_requests_made_while_it_runs(make_user, token_for, monkeypatch):
    user = await database_sync_to_async(make_user)("alice")
    comm = await open_socket("/ws", token=token_for(user))
    runs: list[object] = []
    real = recheck.recheck

    async def counting(hub, ids=None):
        runs.append(ids)
        await asyncio.sleep(0.05)
        return await real(hub, ids)

    monkeypatch.setattr(recheck, "recheck", counting)
    for _ in range(10):
        recheck.on_recheck_users(Node.current().hub, RecheckUsers(user_ids=(str(user.pk),)))
    await asyncio.sleep(0.3)
    # one run for the ten requests (None: a periodic run that may fall in between)
    assert [ids for ids in runs if ids is not None] == [{str(user.pk)}]
    await comm.disconnect()
