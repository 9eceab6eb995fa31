"""
Access tokens that expire: a server whose JWTs live 3 seconds (JWT_ACCESS_TTL_SECONDS=3),
whose sockets are warned 1 s before their token expires and wait 3 s after it for an
in-band ``refresh`` (WS_TOKEN_WARNING_SECONDS=1, WS_TOKEN_GRACE_SECONDS=3).
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.integration.client import WsClient, api, next_id, obtain_tokens, ws_connect
from tests.integration.harness import REPO_ROOT, Deployment
from tests.integration.tokens import forge_access_token

pytestmark = pytest.mark.integration

TTL = 3
WARNING = 1
GRACE = 3
INVALID = "Invalid or expired JWT token"


@pytest.fixture(scope="module")
def short_lived(launch_sqlite: Any) -> Iterator[Deployment]:
    with launch_sqlite(
        "short-ttl",
        JWT_ACCESS_TTL_SECONDS=str(TTL),
        WS_TOKEN_WARNING_SECONDS=str(WARNING),
        WS_TOKEN_GRACE_SECONDS=str(GRACE),
    ) as deployment:
        yield deployment


def expiry_of(token: str) -> int:
    """The ``exp`` claim of a JWT (not verified: the server does that)."""
    payload = token.split(".")[1]
    return int(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


def iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def is_warning(message: dict[str, Any]) -> bool:
    return (
        message["type"] == "status"
        and message["channel"] == "system"
        and message["data"].get("event") == "token_expiring"
    )


def assert_auth_failed(message: dict[str, Any], text: str, id_: str | None = None) -> None:
    expected: dict[str, Any] = {
        "type": "error",
        "channel": "system",
        "data": {"code": "AUTH_FAILED", "message": text, "action": "reconnect_with_valid_token"},
        "timestamp": message["timestamp"],
    }
    if id_ is not None:
        expected["id"] = id_
    assert message == expected


def assert_expired_after_warning(closed: Any, token: str) -> None:
    """The socket was warned about ``token``, then closed when it expired."""
    assert closed.code == 4001, closed
    warning, error = closed.messages  # nothing else
    assert is_warning(warning), warning
    assert warning["data"]["expires_at"] == iso(expiry_of(token))
    assert_auth_failed(error, "JWT token expired")


async def fresh_tokens(deployment: Deployment, username: str = "admin") -> dict[str, str]:
    return await asyncio.to_thread(
        obtain_tokens, deployment.server.base_url, username, deployment.password
    )


async def rotate(deployment: Deployment, tokens: dict[str, str]) -> dict[str, str]:
    """New access and refresh tokens from ``/api/token/refresh/`` (same sign-in)."""
    answer = await api(
        "POST",
        deployment.server.base_url,
        "/api/token/refresh/",
        json_body={"refresh": tokens["refresh"]},
    )
    assert answer.status == 200, answer
    return answer.body


async def send_refresh(client: WsClient, access: str) -> dict[str, Any]:
    """Hand ``access`` to the socket; return the server's answer."""
    reply = await client.request({"type": "refresh", "data": {"token": access}})
    assert reply["type"] == "response", reply
    assert reply["channel"] == "system"
    assert reply["data"] == {
        "action": "refresh",
        "status": "refreshed",
        "expires_at": iso(expiry_of(access)),
    }
    return reply


async def follow_refreshing(
    client: WsClient,
    deployment: Deployment,
    tokens: dict[str, str],
    seconds: float,
    until: Callable[[dict[str, Any]], bool] | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """Read for ``seconds`` (or up to a message matching ``until``) as a client that keeps
    its socket alive would: each ``token_expiring`` is answered with a ``refresh``
    carrying a token from ``/api/token/refresh/``.  Returns how many refreshes the server
    confirmed, and every other message.  A close fails the test (ConnectionClosed)."""
    deadline = time.monotonic() + seconds
    refreshed, others = 0, []
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = await client.recv(timeout=left)
        except TimeoutError:
            break
        if is_warning(message):
            assert 0 <= message["data"]["seconds_left"] <= WARNING, message
            tokens.update(await rotate(deployment, tokens))
            await client.send(
                {"type": "refresh", "data": {"token": tokens["access"]}, "id": next_id("rf")}
            )
        elif message["type"] == "response" and message["data"].get("action") == "refresh":
            assert message["data"]["status"] == "refreshed", message
            refreshed += 1
        else:
            others.append(message)
            if until is not None and until(message):
                break
    return refreshed, others


def user_activity_of(agent: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m["type"] == "event" and m["data"].get("user_agent") == agent


# -- no refresh: warned, then closed after the grace --------------------------------------


async def test_token_expiring_while_connected_then_refused_then_refreshed(short_lived: Deployment):
    base = short_lived.server.base_url
    tokens = await fresh_tokens(short_lived, "viewer")
    expires = expiry_of(tokens["access"])
    async with ws_connect(short_lived.server.ws_url, token=tokens["access"]) as client:
        await client.ping()
        await client.subscribe_with_status("system_alerts")
        # the server closes the socket itself once the token expired and the grace passed
        closed = await client.expect_closed(timeout=TTL + GRACE + 5)
        closed_at = time.time()
    assert_expired_after_warning(closed, tokens["access"])
    assert expires + GRACE - 0.1 <= closed_at <= expires + GRACE + 2, closed_at - expires

    # the same token no longer opens a socket (nor the REST API)
    async with ws_connect(short_lived.server.ws_url, token=tokens["access"]) as client:
        closed = await client.expect_closed()
        assert closed.code == 4001
        [error] = closed.messages
        assert_auth_failed(error, "Invalid or expired JWT token")
    assert (await api("GET", base, "/api/hosts/", token=tokens["access"])).status == 401

    # a refreshed token works again, for its own lifetime
    refreshed = await rotate(short_lived, tokens)
    async with ws_connect(
        short_lived.server.ws_url, subprotocols=["bearer", refreshed["access"]]
    ) as client:
        await client.ping()


async def test_expiry_applies_to_every_token_method(short_lived: Deployment):
    token = (await fresh_tokens(short_lived))["access"]
    url = short_lived.server.ws_url
    async with (
        ws_connect(url, headers={"Authorization": f"Bearer {token}"}) as by_header,
        ws_connect(url, subprotocols=[f"bearer.{token}"]) as by_protocol,
        ws_connect(url, token=token) as by_query,
    ):
        clients = (by_header, by_protocol, by_query)
        for client in clients:
            await client.ping()
        results = await asyncio.gather(*(c.expect_closed(timeout=TTL + GRACE + 5) for c in clients))
    for closed in results:
        assert_expired_after_warning(closed, token)


# -- the warning -------------------------------------------------------------------------


async def test_the_warning_comes_before_expiry_with_the_time_left(short_lived: Deployment):
    tokens = await fresh_tokens(short_lived)
    expires = expiry_of(tokens["access"])
    async with ws_connect(short_lived.server.ws_url, token=tokens["access"]) as client:
        warning = await client.expect(is_warning, timeout=TTL + 1, what="token_expiring")
        warned_at = time.time()
        assert "id" not in warning
        data = warning["data"]
        assert data["expires_at"] == iso(expires)
        assert warned_at < expires
        assert expires - warned_at <= WARNING + 0.5  # not much earlier than asked
        assert data["seconds_left"] == WARNING
        assert "refresh" in data["message"]
        assert client.pending == []  # nothing else arrived
        await client.ping()


# -- in-band refresh ---------------------------------------------------------------------


async def test_a_socket_refreshed_in_band_outlives_its_tokens_and_keeps_its_events(
    short_lived: Deployment,
):
    tokens = await fresh_tokens(short_lived)
    first_expires = expiry_of(tokens["access"])
    async with ws_connect(short_lived.server.ws_url, token=tokens["access"]) as client:
        await client.subscribe("user_activity")
        # well past the first token's expiry and grace: closed by then without refreshes
        seconds = first_expires + GRACE + 1 - time.time()
        refreshed, others = await follow_refreshing(client, short_lived, tokens, seconds)
        assert refreshed >= 2, refreshed
        assert others == []
        assert time.time() > first_expires + GRACE
        # events of the subscription made with the first token still arrive
        agent = f"it-refresh-{uuid.uuid4().hex[:8]}"
        login = asyncio.create_task(
            asyncio.to_thread(
                obtain_tokens, short_lived.server.base_url, "viewer", short_lived.password, agent
            )
        )
        _, others = await follow_refreshing(
            client, short_lived, tokens, 10, until=user_activity_of(agent)
        )
        await login
        assert others, "no event"
        assert user_activity_of(agent)(others[-1]), others
        assert others[-1]["data"]["action"] == "login"
        await client.ping()


@pytest.mark.parametrize("case", ["another-user", "garbage", "expired", "wrong-key", "refresh"])
async def test_refresh_with_a_bad_token_closes_the_socket(short_lived: Deployment, case: str):
    tokens = await fresh_tokens(short_lived)
    admin = short_lived.user_id("admin")
    secret = short_lived.env["DJANGO_SECRET_KEY"]
    bad, why = {
        "another-user": (
            (await fresh_tokens(short_lived, "viewer"))["access"],
            "The new access token belongs to another user",
        ),
        "garbage": ("not.a.jwt", INVALID),
        "expired": (forge_access_token(secret, admin, lifetime=-60), INVALID),
        "wrong-key": (forge_access_token("k" * 64, admin), INVALID),
        "refresh": (tokens["refresh"], INVALID),
    }[case]
    async with ws_connect(short_lived.server.ws_url, token=tokens["access"]) as client:
        await client.ping()
        await client.send({"type": "refresh", "data": {"token": bad}, "id": "bad-refresh"})
        closed = await client.expect_closed()
    assert closed.code == 4001, closed
    [error] = closed.messages
    assert_auth_failed(error, why, "bad-refresh")


async def test_in_the_grace_subscribe_is_refused_events_flow_and_refresh_restores(
    short_lived: Deployment,
):
    tokens = await fresh_tokens(short_lived)
    expires = expiry_of(tokens["access"])
    async with ws_connect(short_lived.server.ws_url, token=tokens["access"]) as client:
        await client.subscribe("user_activity")
        await asyncio.sleep(max(0.0, expires - time.time()) + 0.2)
        assert time.time() < expires + GRACE - 1

        refused = await client.request({"type": "subscribe", "channel": "system_alerts"})
        assert refused["type"] == "error", refused
        assert refused["channel"] == "system"
        assert refused["data"]["code"] == "TOKEN_EXPIRED"
        assert refused["data"]["action"] == "refresh"
        assert refused["data"]["grace_ends_at"] == iso(expires + GRACE)
        await client.ping()  # still open

        # the subscription made before expiry still delivers
        agent = f"it-grace-{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(
            obtain_tokens, short_lived.server.base_url, "viewer", short_lived.password, agent
        )
        await client.expect(user_activity_of(agent), timeout=GRACE)

        renewed = await rotate(short_lived, tokens)
        assert time.time() < expires + GRACE
        await send_refresh(client, renewed["access"])
        await client.subscribe("system_alerts")
        await asyncio.sleep(max(0.0, expires + GRACE - time.time()) + 0.5)
        await client.ping()  # the first token's grace is over: the socket lives on
        assert not [m for m in client.pending if m["type"] == "error"], client.pending


# -- ws_watch.py ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["password", "refresh-token"])
async def test_ws_watch_refreshes_in_band(short_lived: Deployment, how: str, tmp_path: Path):
    base = short_lived.server.base_url
    if how == "password":
        secret_file = tmp_path / "password"
        secret_file.write_text(short_lived.password + "\n")
        credentials = ["--username", "admin", "--password-file", str(secret_file)]
    else:
        tokens = await fresh_tokens(short_lived)
        credentials = ["--token", tokens["access"], "--refresh-token", tokens["refresh"]]
    watcher = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO_ROOT / "scripts" / "ws_watch.py"),
        "--url",
        base,
        *credentials,
        "--channel",
        "user_activity",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert watcher.stdout is not None
    messages: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        async with asyncio.timeout(3 * TTL + GRACE + 10):
            # two in-band refreshes: the connection outlived two tokens
            while sum(m["type"] == "response" and m["channel"] == "system" for m in messages) < 2:
                line = await watcher.stdout.readline()
                assert line, "ws_watch.py stopped"
                messages.append(json.loads(line))
    finally:
        if watcher.returncode is None:
            watcher.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            _, notes = await watcher.communicate()
    assert watcher.returncode == 0, notes
    assert time.monotonic() - started > TTL
    refreshes = [m for m in messages if m["channel"] == "system" and m["type"] == "response"]
    assert [m["data"]["status"] for m in refreshes] == ["refreshed", "refreshed"]
    assert sum(is_warning(m) for m in messages) == 2
    assert not [m for m in messages if m["type"] == "error"], messages
    text = notes.decode()
    assert text.count("connected to") == 1, text  # never reconnected
    assert text.count("handed the connection a new access token") >= 2, text
