"""
A server whose channel layer (Redis) is unreachable: sockets are refused with
SERVICE_UNAVAILABLE, and the REST API should keep working.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import harness
from tests.integration.client import api, ws_connect
from tests.integration.harness import Deployment
from tests.integration.test_ws_redis_restart import REDIS_SERVER, PrivateRedis

# The server logs the layer's connection errors; that is expected here.
pytestmark = [pytest.mark.integration, pytest.mark.server_errors_expected]


@pytest.fixture(scope="module")
def no_layer(launch_sqlite: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A server that started with its Redis, which is then gone for good (a server does
    not start without one: sysmanage.preflight)."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")
    redis = PrivateRedis(tmp_path_factory.mktemp("layer-down-redis"))
    redis.start()
    try:
        with launch_sqlite(
            "layer-down", REDIS_URL=redis.url, SYSMANAGE_REDIS_PREFIX="sysmanage-it-unreachable"
        ) as deployment:
            redis.kill()
            yield deployment
    finally:
        redis.kill()


_ADMIN_TOKENS: dict[str, str] = {}


def admin_token(d: Deployment) -> str:
    """An access token of ``admin`` made by a shell on the same database: /api/token/
    cannot be used (see test_login_works_while_the_layer_is_down), and a token must
    carry the fingerprint of the user's credentials."""
    if d.env["DATABASE_URL"] not in _ADMIN_TOKENS:
        out = harness.manage_shell(
            d.env,
            (
                "from django.contrib.auth import get_user_model\n"
                "from sysmanage.credentials import access_token_for\n"
                "print('TOKEN', access_token_for(get_user_model().objects.get(username='admin')))"
            ),
        )
        _ADMIN_TOKENS[d.env["DATABASE_URL"]] = out.split("TOKEN ", 1)[1].split()[0]
    return _ADMIN_TOKENS[d.env["DATABASE_URL"]]


async def test_readiness_says_so_before_any_socket_started_the_hub(no_layer: Deployment):
    """A load balancer asks before it sends anyone: the process must not look ready."""
    response = await api("GET", no_layer.server.base_url, "/readyz")
    assert response.status == 503, response
    assert response.body["checks"]["database"] == "ok"
    assert response.body["checks"]["channel_layer"].startswith("unreachable")
    health = await api("GET", no_layer.server.base_url, "/healthz")
    assert health.status == 200  # alive: the process itself is fine


async def test_socket_is_refused_with_service_unavailable(no_layer: Deployment):
    async with ws_connect(no_layer.server.ws_url, token=admin_token(no_layer)) as client:
        closed = await client.expect_closed(timeout=15)
    # docs/websocket-protocol.md: "try again later" is 4503 (Daphne refuses 1013)
    assert closed.code == 4503, closed.code
    assert len(closed.messages) == 1, closed.messages
    error = closed.messages[0]
    assert error["type"] == "error"
    assert error["channel"] == "system"
    assert error["data"]["code"] == "SERVICE_UNAVAILABLE"
    assert "id" not in error


async def test_read_only_rest_api_works_while_the_layer_is_down(no_layer: Deployment):
    response = await api(
        "GET", no_layer.server.base_url, "/api/hosts/", token=admin_token(no_layer)
    )
    assert response.status == 200
    assert response.body["count"] == len(no_layer.seed["hosts"])


async def test_login_works_while_the_layer_is_down(no_layer: Deployment):
    """Events are best effort: recording the login must not fail the login."""
    response = await api(
        "POST",
        no_layer.server.base_url,
        "/api/token/",
        json_body={"username": "viewer", "password": no_layer.password},
    )
    assert response.status == 200, response.status
    assert {"access", "refresh"} <= set(response.body)
    log = await api(
        "GET",
        no_layer.server.base_url,
        "/api/activity/?username=viewer",
        token=admin_token(no_layer),
    )
    assert "login" in [row["action"] for row in log.body["results"]]


async def test_raising_an_alert_while_the_layer_is_down(no_layer: Deployment):
    """A committed write answers success even though its event cannot be delivered."""
    base, token = no_layer.server.base_url, admin_token(no_layer)
    before = (await api("GET", base, "/api/alerts/", token=token)).body["count"]
    response = await api(
        "POST",
        base,
        "/api/alerts/",
        token=token,
        json_body={"severity": "warning", "category": "disk_space", "title": "layer down"},
    )
    assert response.status == 201, response.status
    after = (await api("GET", base, "/api/alerts/", token=token)).body["count"]
    assert after == before + 1
