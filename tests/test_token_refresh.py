"""Tokens on open sockets: the expiry warning, the grace after expiry, and the in-band
``refresh`` that hands a socket a new access token (through the consumer, in-process)."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from datetime import UTC, datetime

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.test import Client

from sysmanage import control, recheck
from sysmanage.auth import warning_lead
from sysmanage.control import CloseSession
from sysmanage.credentials import (
    FINGERPRINT_CLAIM,
    REVOKED_MESSAGE,
    SESSION_CLAIM,
    FingerprintedAccessToken,
    FingerprintedRefreshToken,
)
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.node import Node
from sysmanage.protocol import MAX_TOKEN_LENGTH
from sysmanage.services import token_session_tag
from tests.conftest import PASSWORD
from tests.wsutil import expect_close, open_socket, request, subscribe

pytestmark = pytest.mark.django_db(transaction=True)

User = get_user_model()
READER = ("activity.view_useractivity",)


def access(user, seconds: float = 60, **claims) -> FingerprintedAccessToken:
    """An access token of ``user`` that expires in ``seconds`` or up to a second more
    (``exp`` is whole seconds), with extra ``claims``."""
    token = FingerprintedAccessToken.for_user(user)
    token["exp"] = math.ceil(time.time() + seconds)
    for name, value in claims.items():
        token[name] = value
    return token


def iso_exp(token: FingerprintedAccessToken) -> str:
    exp = datetime.fromtimestamp(token["exp"], UTC)
    return exp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def refresh(comm, token, id_="r1", **extra):
    return await request(
        comm, {"type": "refresh", "data": {"token": str(token)}, "id": id_, **extra}
    )


async def expect_refused(comm, message: str, id_="r1"):
    error = await comm.receive_json_from(timeout=3)
    assert error["type"] == "error", error
    assert error["channel"] == "system"
    assert error["id"] == id_
    assert error["data"] == {
        "code": "AUTH_FAILED",
        "message": message,
        "action": "reconnect_with_valid_token",
    }
    assert await expect_close(comm) == 4001


async def expect_invalid(comm, message: dict, fragment: str):
    reply = await request(comm, message)
    assert reply["type"] == "error", reply
    assert reply["data"]["code"] == "INVALID_MESSAGE"
    assert fragment in reply["data"]["message"]
    assert reply["id"] == message["id"]
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"  # still open


async def without_periodic_recheck(settings, token: str):
    """A socket opened with ``token`` once the periodic recheck has made its first run
    (at the node's start) and waits an hour for the next: changes made unseen then stay
    unseen until the test asks."""
    settings.WS_RECHECK_SECONDS = 3600
    comm = await open_socket("/ws", token=token)
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"
    await asyncio.sleep(0.2)
    return comm


# -- when the warning comes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "lifetime", "issued", "lead"),
    [
        (60, 900, True, 60),  # the setting
        (60, 3, True, 1.5),  # half of a short lifetime
        (60, 900, False, 60),  # no iat: the time left
        (60, 10, False, 5),
        (0, 900, True, 0),  # off
    ],
)
def test_warning_lead(settings, setting, lifetime, issued, lead):
    settings.WS_TOKEN_WARNING_SECONDS = setting
    now = 1_000_000.0
    assert warning_lead(now + lifetime, now if issued else None, now) == lead


def test_warning_lead_counts_the_lifetime_from_the_token_issue(settings):
    settings.WS_TOKEN_WARNING_SECONDS = 60
    # a 900 s token used with 10 s left: warned at once (the lead exceeds what is left)
    assert warning_lead(1000.0, 100.0, 990.0) == 60


# -- expiry: the warning, the grace, the close ---------------------------------------------


async def test_a_token_is_warned_about_then_closed_after_the_grace(make_user, settings):
    settings.WS_TOKEN_WARNING_SECONDS = 60
    settings.WS_TOKEN_GRACE_SECONDS = 0.6
    user = await database_sync_to_async(make_user)()
    token = access(user, seconds=2)
    comm = await open_socket("/ws", token=str(token))
    warning = await comm.receive_json_from(timeout=3)
    warned_at = time.time()
    assert warning["type"] == "status"
    assert warning["channel"] == "system"
    assert "id" not in warning
    data = warning["data"]
    assert data["event"] == "token_expiring"
    assert data["expires_at"] == iso_exp(token)
    assert data["seconds_left"] == 1  # half of the 2 s lifetime
    assert "refresh" in data["message"]
    assert token["exp"] - warned_at > 0.5
    error = await comm.receive_json_from(timeout=4)
    closed_at = time.time()
    assert error["data"] == {
        "code": "AUTH_FAILED",
        "message": "JWT token expired",
        "action": "reconnect_with_valid_token",
    }
    assert await expect_close(comm) == 4001
    assert closed_at >= token["exp"] + 0.6 - 0.05  # not before the grace ended


async def test_in_the_grace_subscribe_and_command_are_refused_until_a_refresh(make_user, settings):
    settings.WS_TOKEN_WARNING_SECONDS = 0
    settings.WS_TOKEN_GRACE_SECONDS = 10
    user = await database_sync_to_async(make_user)("boss", staff=True, perms=READER)
    token = access(user, seconds=1)
    comm = await open_socket("/ws", token=str(token))
    await subscribe(comm, "user_activity")
    await asyncio.sleep(max(0.0, token["exp"] - time.time()) + 0.2)
    refusals = [
        await request(comm, {"type": "subscribe", "channel": "system_alerts", "id": "s2"}),
        await request(
            comm,
            {
                "type": "command",
                "channel": "command_execution",
                "id": "c1",
                "data": {"host_id": str(uuid.uuid4()), "command": "uptime"},
            },
        ),
    ]
    for reply, id_ in zip(refusals, ["s2", "c1"], strict=True):
        assert reply["type"] == "error", reply
        assert reply["channel"] == "system"
        assert reply["id"] == id_
        data = reply["data"]
        assert data["code"] == "TOKEN_EXPIRED"
        assert data["action"] == "refresh"
        ends = datetime.fromisoformat(data["grace_ends_at"].replace("Z", "+00:00"))
        assert abs(ends.timestamp() - (token["exp"] + 10)) < 0.01
    hub = Node.current().hub
    assert hub.subscriber_count("system_alerts") == 0
    assert hub.subscriber_count("user_activity") == 1  # kept through the grace
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"
    reply = await request(comm, {"type": "unsubscribe", "channel": "user_activity"})
    assert reply["data"]["was_subscribed"] is True  # giving up rights is allowed

    fresh = access(user, seconds=60)
    reply = await refresh(comm, fresh)
    assert reply["type"] == "response", reply
    await subscribe(comm, "system_alerts")
    await comm.disconnect()


# -- refresh -------------------------------------------------------------------------------


async def test_refresh_replaces_the_token_and_the_socket_outlives_the_first(make_user, settings):
    settings.WS_TOKEN_GRACE_SECONDS = 0
    user = await database_sync_to_async(make_user)()
    first = access(user, seconds=1.5)
    comm = await open_socket("/ws", token=str(first))
    second = access(user, seconds=60)
    reply = await refresh(comm, second, id_=42)
    assert reply == {
        "type": "response",
        "channel": "system",
        "data": {"action": "refresh", "status": "refreshed", "expires_at": iso_exp(second)},
        "timestamp": reply["timestamp"],
        "id": 42,
    }
    await asyncio.sleep(max(0.0, first["exp"] - time.time()) + 0.3)
    # past the first token's expiry: no warning of it, no close, requests answered
    assert await comm.receive_nothing(timeout=0.2)
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"
    await comm.disconnect()


async def test_refresh_echoes_its_channel(make_user, token_for):
    user = await database_sync_to_async(make_user)()
    comm = await open_socket("/ws", token=token_for(user))
    reply = await refresh(comm, access(user), channel="host_status")
    assert reply["channel"] == "host_status"
    assert reply["data"]["status"] == "refreshed"
    await comm.disconnect()


async def test_the_warning_comes_once_per_token(make_user, settings):
    settings.WS_TOKEN_WARNING_SECONDS = 60
    settings.WS_TOKEN_GRACE_SECONDS = 10
    user = await database_sync_to_async(make_user)()
    first = access(user, seconds=1.2)
    comm = await open_socket("/ws", token=str(first))
    warning = await comm.receive_json_from(timeout=3)
    assert warning["data"]["event"] == "token_expiring"
    # handing over the same token again does not bring the warning back
    assert (await refresh(comm, first))["data"]["status"] == "refreshed"
    assert await comm.receive_nothing(timeout=max(0.0, first["exp"] - time.time()) + 0.2)
    # a new token gets its own warning
    second = access(user, seconds=1.2)
    assert (await refresh(comm, second, id_="r2"))["data"]["expires_at"] == iso_exp(second)
    warning = await comm.receive_json_from(timeout=3)
    assert warning["data"]["event"] == "token_expiring"
    assert warning["data"]["expires_at"] == iso_exp(second)
    await comm.disconnect()


async def test_a_token_of_another_user_closes_the_socket(make_user, token_for):
    user = await database_sync_to_async(make_user)("alice")
    other = await database_sync_to_async(make_user)("mallory")
    comm = await open_socket("/ws", token=token_for(user))
    await comm.send_json_to({"type": "refresh", "data": {"token": token_for(other)}, "id": "r1"})
    await expect_refused(comm, "The new access token belongs to another user")


@pytest.mark.parametrize("case", ["garbage", "expired", "revoked", "refresh-token", "disabled"])
async def test_a_bad_token_closes_the_socket(make_user, token_for, settings, case):
    user = await database_sync_to_async(make_user)("alice")
    comm = await without_periodic_recheck(settings, token_for(user))
    message = "Invalid or expired JWT token"
    if case == "garbage":
        bad = "not.a.jwt"
    elif case == "expired":
        bad = str(access(user, seconds=-5))
    elif case == "revoked":  # issued for other credentials
        bad = str(access(user, **{FINGERPRINT_CLAIM: "0" * 32}))
        message = REVOKED_MESSAGE
    elif case == "refresh-token":
        bad = str(await database_sync_to_async(FingerprintedRefreshToken.for_user)(user))
    else:
        bad = token_for(user)
        # disabled unseen (no signal closes the socket first)
        await database_sync_to_async(User.objects.filter(pk=user.pk).update)(is_active=False)
        message = "User account is disabled"
    await comm.send_json_to({"type": "refresh", "data": {"token": bad}, "id": "r1"})
    await expect_refused(comm, message)


async def test_malformed_refresh_messages_get_an_error_and_the_socket_stays_open(
    make_user, token_for
):
    user = await database_sync_to_async(make_user)()
    comm = await open_socket("/ws", token=token_for(user))
    for index, data in enumerate(
        [None, {}, {"token": 5}, {"token": ["x"]}, {"token": ""}, {"token": "  "}]
    ):
        message = {"type": "refresh", "id": f"m{index}"}
        if data is not None:
            message["data"] = data
        await expect_invalid(comm, message, "data.token")
    await expect_invalid(
        comm,
        {"type": "refresh", "id": "long", "data": {"token": "x" * (MAX_TOKEN_LENGTH + 1)}},
        f"at most {MAX_TOKEN_LENGTH}",
    )
    await comm.disconnect()


async def test_a_session_socket_has_nothing_to_refresh(make_user, token_for):
    user = await database_sync_to_async(make_user)("alice")
    client = Client()
    assert await database_sync_to_async(client.login)(username="alice", password=PASSWORD)
    comm = await open_socket(
        "/ws", headers=[(b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())]
    )
    await expect_invalid(
        comm,
        {"type": "refresh", "id": "r1", "data": {"token": token_for(user)}},
        "authenticated by its session",
    )
    await comm.disconnect()


# -- what the socket's new credentials change --------------------------------------------


async def test_a_refresh_moves_the_socket_to_the_new_sign_in(make_user):
    user = await database_sync_to_async(make_user)()
    first = await database_sync_to_async(FingerprintedRefreshToken.for_user)(user)
    second = await database_sync_to_async(FingerprintedRefreshToken.for_user)(user)
    comm = await open_socket("/ws", token=str(first.access_token))
    assert (await refresh(comm, second.access_token))["data"]["status"] == "refreshed"
    hub = Node.current().hub

    def logout(sign_in) -> None:
        tag = token_session_tag(sign_in[SESSION_CLAIM])
        control.close_session(hub, CloseSession(session=tag, reason="Logged out"))

    logout(first)  # the sign-in the socket left
    assert await comm.receive_nothing(timeout=0.2)
    assert token_session_tag(first[SESSION_CLAIM]) not in hub.by_session
    logout(second)
    error = await comm.receive_json_from(timeout=3)
    assert error["data"]["message"] == "Logged out"
    assert await expect_close(comm) == 4001


async def test_the_recheck_goes_by_the_new_tokens_credentials(make_user, settings):
    user = await database_sync_to_async(make_user)("alice")
    comm = await without_periodic_recheck(settings, str(access(user)))
    # the password changes unseen; a token for the new credentials is handed over
    await database_sync_to_async(User.objects.filter(pk=user.pk).update)(
        password=make_password("a new password")
    )
    changed = await database_sync_to_async(User.objects.get)(pk=user.pk)
    assert (await refresh(comm, access(changed)))["data"]["status"] == "refreshed"
    await recheck.recheck(Node.current().hub)
    assert await comm.receive_nothing(timeout=0.2)
    # and a later change is still caught
    await database_sync_to_async(User.objects.filter(pk=user.pk).update)(is_active=False)
    await recheck.recheck(Node.current().hub)
    error = await comm.receive_json_from(timeout=3)
    assert error["data"]["message"] == recheck.DISABLED
    assert await expect_close(comm) == 4001


async def test_a_refresh_reads_the_rights_again(make_user):
    from tests.test_recheck import _drop_perm_unseen

    user = await database_sync_to_async(make_user)("boss", staff=True, perms=READER)
    comm = await open_socket("/ws", token=str(access(user)))
    await subscribe(comm, "user_activity")
    await database_sync_to_async(_drop_perm_unseen)(user, READER[0])
    await comm.send_json_to({"type": "refresh", "data": {"token": str(access(user))}, "id": "r"})
    revoked = await comm.receive_json_from(timeout=3)
    assert revoked["data"]["code"] == "SUBSCRIPTION_REVOKED"
    reply = await comm.receive_json_from(timeout=3)
    assert reply["data"]["status"] == "refreshed"
    await comm.disconnect()
