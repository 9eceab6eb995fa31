"""Authentication and origin checks of the /ws endpoint."""

from __future__ import annotations

from datetime import timedelta

import pytest
from channels.testing import WebsocketCommunicator
from rest_framework_simplejwt.tokens import AccessToken

from sysmanage.asgi import application
from sysmanage.credentials import FingerprintedAccessToken
from sysmanage.dbthreads import database_sync_to_async
from tests.wsutil import expect_close, open_socket, request

pytestmark = pytest.mark.django_db(transaction=True)

AUTH_FAILED_DATA = {
    "code": "AUTH_FAILED",
    "message": "Invalid or expired JWT token",
    "action": "reconnect_with_valid_token",
}


async def assert_refused(comm, message="Invalid or expired JWT token"):
    error = await comm.receive_json_from(timeout=3)
    assert error["type"] == "error"
    assert error["channel"] == "system"
    assert error["data"] == {**AUTH_FAILED_DATA, "message": message}
    assert await expect_close(comm) == 4001


async def test_missing_token_gets_auth_failed_and_4001():
    comm = await open_socket("/ws")
    await assert_refused(comm, "Missing JWT token")


@pytest.mark.parametrize("bad", ["garbage", "a.b.c", ""])
async def test_malformed_token_gets_auth_failed_and_4001(bad):
    comm = await open_socket("/ws", token=bad)
    await assert_refused(comm, "Invalid or expired JWT token" if bad else "Missing JWT token")


async def test_expired_token_gets_auth_failed(make_user):
    user = await database_sync_to_async(make_user)()
    token = AccessToken.for_user(user)
    token.set_exp(lifetime=-timedelta(seconds=5))
    comm = await open_socket("/ws", token=str(token))
    await assert_refused(comm)


async def test_token_of_disabled_user_is_refused(make_user, token_for):
    user = await database_sync_to_async(make_user)(active=False)
    comm = await open_socket("/ws", token=token_for(user))
    await assert_refused(comm, "User account is disabled")


async def test_query_token_authenticates(make_user, token_for):
    user = await database_sync_to_async(make_user)()
    comm = await open_socket("/ws/", token=token_for(user))
    pong = await request(comm, {"type": "ping", "id": "p1"})
    assert pong["type"] == "pong"
    assert pong["id"] == "p1"
    await comm.disconnect()


@pytest.mark.parametrize("style", ["pair", "dotted"])
async def test_subprotocol_token_authenticates_and_selects_bearer(make_user, token_for, style):
    user = await database_sync_to_async(make_user)()
    token = token_for(user)
    offer = ["bearer", token] if style == "pair" else [f"bearer.{token}"]
    comm = WebsocketCommunicator(application, "/ws", subprotocols=offer)
    connected, subprotocol = await comm.connect()
    assert connected
    assert subprotocol == offer[0]
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"
    await comm.disconnect()


async def test_authorization_header_authenticates(make_user, token_for):
    user = await database_sync_to_async(make_user)()
    comm = await open_socket(
        "/ws", headers=[(b"authorization", f"Bearer {token_for(user)}".encode())]
    )
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"
    await comm.disconnect()


async def test_bad_token_does_not_fall_back_to_another_method(make_user, token_for):
    user = await database_sync_to_async(make_user)()
    comm = await open_socket(
        "/ws", token="bad", headers=[(b"authorization", f"Bearer {token_for(user)}".encode())]
    )
    await assert_refused(comm)


async def test_foreign_origin_is_refused(make_user, token_for):
    user = await database_sync_to_async(make_user)()
    comm = WebsocketCommunicator(
        application,
        f"/ws?token={token_for(user)}",
        headers=[(b"origin", b"https://evil.example"), (b"host", b"localhost:8000")],
    )
    connected, _ = await comm.connect()
    assert not connected  # closed before accept: Daphne answers the handshake with 403


async def test_same_origin_is_accepted(make_user, token_for):
    user = await database_sync_to_async(make_user)()
    comm = await open_socket(
        "/ws",
        token=token_for(user),
        headers=[(b"origin", b"http://fleet.internal:8000"), (b"host", b"fleet.internal:8000")],
    )
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"
    await comm.disconnect()


async def test_token_expiring_while_open_closes_the_socket(make_user, settings):
    # no warning, no grace (tests/test_token_refresh.py covers both)
    settings.WS_TOKEN_WARNING_SECONDS = 0
    settings.WS_TOKEN_GRACE_SECONDS = 0
    user = await database_sync_to_async(make_user)()
    token = FingerprintedAccessToken.for_user(user)
    token.set_exp(lifetime=timedelta(seconds=1))
    comm = await open_socket("/ws", token=str(token))
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"
    error = await comm.receive_json_from(timeout=4)
    assert error["data"] == {**AUTH_FAILED_DATA, "message": "JWT token expired"}
    assert await expect_close(comm) == 4001


async def test_deactivating_a_user_closes_its_sockets(make_user, token_for):
    user = await database_sync_to_async(make_user)()
    other = await database_sync_to_async(make_user)("other")
    comm = await open_socket("/ws", token=token_for(user))
    bystander = await open_socket("/ws", token=token_for(other))
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"

    def deactivate():
        user.is_active = False
        user.save()

    await database_sync_to_async(deactivate)()
    error = await comm.receive_json_from(timeout=3)
    assert error["data"]["code"] == "AUTH_FAILED"
    assert error["data"]["action"] == "reconnect_with_valid_token"
    assert await expect_close(comm) == 4001
    assert (await request(bystander, {"type": "ping"}))["type"] == "pong"
    await bystander.disconnect()


async def test_unreachable_channel_layer_is_reported(make_user, token_for, monkeypatch):
    from sysmanage.node import Node

    async def broken_start(self):
        raise ConnectionError("layer down")

    monkeypatch.setattr(Node, "start", broken_start)
    user = await database_sync_to_async(make_user)()
    comm = await open_socket("/ws", token=token_for(user))
    error = await comm.receive_json_from(timeout=3)
    assert error["data"]["code"] == "SERVICE_UNAVAILABLE"
    assert await expect_close(comm) == 4503
    assert Node.current() is None  # the next connection tries again
