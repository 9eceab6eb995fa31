"""
Access tokens that expire: a server whose JWTs live 3 seconds (JWT_ACCESS_TTL_SECONDS=3).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.client import api, obtain_tokens, ws_connect
from tests.integration.harness import Deployment

pytestmark = pytest.mark.integration

TTL = 3


@pytest.fixture(scope="module")
def short_lived(launch_sqlite: Any) -> Iterator[Deployment]:
    with launch_sqlite("short-ttl", JWT_ACCESS_TTL_SECONDS=str(TTL)) as deployment:
        yield deployment


def assert_auth_failed(closed: Any, message: str) -> None:
    assert closed.code == 4001, closed
    assert len(closed.messages) == 1, closed.messages
    assert closed.messages[0] == {
        "type": "error",
        "channel": "system",
        "data": {"code": "AUTH_FAILED", "message": message, "action": "reconnect_with_valid_token"},
        "timestamp": closed.messages[0]["timestamp"],
    }


async def test_token_expiring_while_connected_then_refused_then_refreshed(short_lived: Deployment):
    base = short_lived.server.base_url
    issued = time.time()
    tokens = await asyncio.to_thread(obtain_tokens, base, "viewer", short_lived.password)
    async with ws_connect(short_lived.server.ws_url, token=tokens["access"]) as client:
        await client.ping()
        await client.subscribe("system_alerts")
        # the server closes the socket itself when the token runs out
        closed = await client.expect_closed(timeout=TTL + 5)
        elapsed = time.time() - issued
    assert_auth_failed(closed, "JWT token expired")
    assert TTL - 1.5 <= elapsed <= TTL + 3, elapsed

    # the same token no longer opens a socket (nor the REST API)
    async with ws_connect(short_lived.server.ws_url, token=tokens["access"]) as client:
        assert_auth_failed(await client.expect_closed(), "Invalid or expired JWT token")
    assert (await api("GET", base, "/api/hosts/", token=tokens["access"])).status == 401

    # a refreshed token works again, for its own lifetime
    refreshed = await api(
        "POST", base, "/api/token/refresh/", json_body={"refresh": tokens["refresh"]}
    )
    assert refreshed.status == 200, refreshed
    async with ws_connect(
        short_lived.server.ws_url, subprotocols=["bearer", refreshed.body["access"]]
    ) as client:
        await client.ping()


async def test_expiry_applies_to_every_token_method(short_lived: Deployment):
    token = (
        await asyncio.to_thread(
            obtain_tokens, short_lived.server.base_url, "admin", short_lived.password
        )
    )["access"]
    url = short_lived.server.ws_url
    async with (
        ws_connect(url, headers={"Authorization": f"Bearer {token}"}) as by_header,
        ws_connect(url, subprotocols=[f"bearer.{token}"]) as by_protocol,
        ws_connect(url, token=token) as by_query,
    ):
        clients = (by_header, by_protocol, by_query)
        for client in clients:
            await client.ping()
        results = await asyncio.gather(*(c.expect_closed(timeout=TTL + 5) for c in clients))
    for closed in results:
        assert_auth_failed(closed, "JWT token expired")
