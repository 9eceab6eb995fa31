"""
A server whose PostgreSQL goes away and comes back, without a restart.

The machine's PostgreSQL is shared, so it is never stopped: the server reaches it
through a relay (:class:`~tests.integration.relay.CuttableRelay`) that the tests cut,
either refusing connections (a stopped database) or accepting them and never answering
(a dead host, which is what makes clients hang).  While it is cut, everything that needs
the database is refused at once and explained: HTTP 503 with ``Retry-After``, sockets
closed with 4503 and a SERVICE_UNAVAILABLE error, ``/readyz`` 503, while ``/metrics`` is
still served and says ``sysmanage_database_up 0``; service is back within moments of the
database.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
import websockets

from tests.compat.fake_sysmanage_agent import FakeSysManageAgent
from tests.integration import harness
from tests.integration.client import (
    HttpResponse,
    Session,
    WsClient,
    api,
    browser_login,
    http_request,
    obtain_tokens,
    ws_connect,
)
from tests.integration.conftest import POSTGRES_ADMIN_URL, require_postgres
from tests.integration.relay import CuttableRelay
from tests.integration.test_metrics import sample

pytestmark = [pytest.mark.integration, pytest.mark.postgres_redis]

#: How long an answer may take while the database is away (the aim is a second or two;
#: the margin is for a busy machine).
ANSWER_BOUND = 3.0
#: How long after the database is back the first request may still fail.
RECOVERY_BOUND = 3.0
#: Seconds the fleet figures of ``/metrics`` are served from what was last read.
FIGURES_TTL = 5.0


@dataclass
class Outage:
    """The server, the relay in front of its database, and credentials made beforehand."""

    deployment: harness.Deployment
    relay: CuttableRelay
    access: str
    session: Session
    host_token: str
    agent: FakeSysManageAgent

    @property
    def server(self) -> harness.DaphneServer:
        return self.deployment.server


@pytest.fixture(scope="module", params=["pooled", "unpooled"])
def outage(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Outage]:
    """One server on a fresh PostgreSQL database reached through a relay: with the
    connection pool (the default), or with one persistent connection per thread."""
    require_postgres()
    work = tmp_path_factory.mktemp(f"db-outage-{request.param}")
    database = harness.create_postgres_database(POSTGRES_ADMIN_URL)
    relay = CuttableRelay(urlsplit(POSTGRES_ADMIN_URL).port or 5432)
    servers: list[harness.DaphneServer] = []
    try:
        settings = {
            **harness.COMMON_SETTINGS,
            "DJANGO_SECRET_KEY": harness.new_secret(),
            "SYSMANAGE_VAR_DIR": str(work / "var"),
            "SYSMANAGE_AGENT_AUTO_APPROVE": "true",
            **({"DB_POOL_MAX": "0"} if request.param == "unpooled" else {}),
        }
        direct = harness.with_database(POSTGRES_ADMIN_URL, database)
        seed = harness.seed_database(harness.server_env(DATABASE_URL=direct, **settings))
        relayed = urlsplit(direct)._replace(netloc=f"postgres@127.0.0.1:{relay.start()}")
        env = harness.server_env(DATABASE_URL=relayed.geturl(), **settings)
        servers = harness.start_servers([(f"db-outage-{request.param}", env)], work)
        deployment = harness.Deployment(env=env, seed=seed, servers=servers, work_dir=work)
        base = deployment.server.base_url
        enrolled = json.loads(
            harness.run_python(
                ["manage.py", "register_host", "outage-agent"], env, what="register_host"
            ).stdout.splitlines()[-1]
        )
        agent = FakeSysManageAgent(base, "sm-outage")
        status, body = agent.register()
        assert status in (200, 201), (status, body)
        agent.auth()
        yield Outage(
            deployment=deployment,
            relay=relay,
            access=obtain_tokens(base, "admin", seed["password"])["access"],
            session=browser_login(base, "admin", seed["password"]),
            host_token=enrolled["token"],
            agent=agent,
        )
    finally:
        for server in servers:
            server.stop()
        relay.close()
        harness.drop_postgres_database(POSTGRES_ADMIN_URL, database)


async def timed(call: Awaitable[Any]) -> tuple[Any, float]:
    began = time.monotonic()
    result = await call
    return result, time.monotonic() - began


def rest(o: Outage, path: str = "/api/hosts/") -> Awaitable[HttpResponse]:
    return api("GET", o.server.base_url, path, token=o.access)


def page(o: Outage, path: str = "/hosts/") -> Awaitable[HttpResponse]:
    return asyncio.to_thread(
        http_request,
        "GET",
        o.server.base_url + path,
        opener=o.session.opener,
        headers={"Accept": "text/html"},
    )


def login(o: Outage) -> Awaitable[HttpResponse]:
    return api(
        "POST",
        o.server.base_url,
        "/api/token/",
        json_body={"username": "viewer", "password": o.deployment.password},
    )


def assert_unavailable(response: HttpResponse, *, api_format: bool) -> None:
    assert response.status == 503, response
    assert int(response.headers["Retry-After"]) >= 1, response.headers
    if api_format:
        assert response.headers["Content-Type"].startswith("application/json"), response.headers
        assert response.body["code"] == "service_unavailable", response.body
        assert "database" in response.body["detail"], response.body
    else:
        assert response.headers["Content-Type"].startswith("text/html"), response.headers
        assert "try again" in response.body.lower(), response.body


async def client_socket_refused(o: Outage, path: str = "/ws", **kwargs: Any) -> dict[str, Any]:
    """Open a socket; it must be accepted, told SERVICE_UNAVAILABLE and closed (4503)."""
    async with ws_connect(o.server.base_url.replace("http", "ws") + path, **kwargs) as client:
        closed = await client.expect_closed(timeout=10)
    assert closed.code == 4503, closed
    assert len(closed.messages) == 1, closed.messages
    error = closed.messages[0]
    assert (error["type"], error["channel"]) == ("error", "system"), error
    assert error["data"]["code"] == "SERVICE_UNAVAILABLE", error
    return error


async def sysmanage_agent_refused(o: Outage) -> dict[str, Any]:
    """The SysManage agent's socket: refused with 4503 and its own error message."""
    async with websockets.connect(
        o.agent.connect_url(o.agent.connection_token), open_timeout=5, proxy=None
    ) as ws:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 4503, ws.close_code
    assert message["message_type"] == "error", message
    assert message["error_type"] == "server_busy", message
    return message


async def readiness(o: Outage) -> HttpResponse:
    return await api("GET", o.server.base_url, "/readyz")


async def until_served(call: Callable[[], Awaitable[HttpResponse]], bound: float) -> float:
    """Seconds until ``call`` answers 200 (polling); fail after ``bound`` seconds."""
    began = time.monotonic()
    while True:
        response = await call()
        if response.status == 200:
            return time.monotonic() - began
        assert response.status == 503, response
        if time.monotonic() - began > bound:
            raise AssertionError(f"still {response.status} {response.body} after {bound}s")
        await asyncio.sleep(0.05)


async def scrape(o: Outage) -> str:
    """``GET /metrics`` (served to loopback): it must answer whether or not the database does."""
    response = await asyncio.to_thread(
        http_request, "GET", f"{o.server.base_url}/metrics", headers={"Accept": "text/plain"}
    )
    assert response.status == 200, response
    assert isinstance(response.body, str), response.body
    return response.body


async def all_served(o: Outage) -> None:
    assert (await rest(o)).status == 200
    assert (await page(o)).status == 200
    assert (await readiness(o)).status == 200
    async with ws_connect(o.server.ws_url, token=o.access) as client:
        await client.subscribe("host_status")


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
async def test_everything_needing_the_database_is_refused_at_once_and_comes_back(outage, mode):
    o = outage
    await all_served(o)
    assert sample(await scrape(o), "sysmanage_database_up") == 1
    log_from = o.server.log_size()
    async with ws_connect(o.server.ws_url, token=o.access) as open_before:
        await open_before.subscribe("host_status")
        o.relay.cut(mode)
        try:
            await refused_while_cut(o, mode, open_before)
        finally:
            o.relay.restore()

        back = await until_served(lambda: rest(o), RECOVERY_BOUND)
        print(f"{o.server.name} {mode}: served again {back:.2f}s after the database came back")
        metrics = await scrape(o)
        assert sample(metrics, "sysmanage_database_up") == 1, metrics
        assert 'sysmanage_hosts{status="online"}' in metrics, metrics  # read again
        # the socket that stayed open through the outage works again
        await open_before.subscribe("host_status")
    await all_served(o)
    log = o.server.log_since(log_from)
    assert log.count("database unreachable") == 1, log
    assert log.count("database reachable again") == 1, log
    assert "django.request" not in log, log  # no line per refused request


async def refused_while_cut(o: Outage, mode: str, open_before: WsClient) -> None:
    answer, took = await timed(rest(o))
    print(f"{o.server.name} {mode}: first REST answer {answer.status} after {took:.2f}s")
    assert_unavailable(answer, api_format=True)
    assert took <= ANSWER_BOUND, took
    for request, api_format in (
        (lambda: rest(o), True),
        (lambda: login(o), True),
        (lambda: page(o), False),
    ):
        answer, took = await timed(request())
        assert_unavailable(answer, api_format=api_format)
        assert took <= ANSWER_BOUND, took
    error, took = await timed(client_socket_refused(o, token=o.access))
    assert "database" in error["data"]["message"], error
    assert took <= ANSWER_BOUND, took
    _, took = await timed(
        client_socket_refused(o, "/ws/agent", headers={"Authorization": f"Bearer {o.host_token}"})
    )
    assert took <= ANSWER_BOUND, took
    _, took = await timed(sysmanage_agent_refused(o))
    assert took <= ANSWER_BOUND, took
    metrics, took = await timed(scrape(o))
    assert "sysmanage_database_up 0.0" in metrics, metrics
    assert took <= ANSWER_BOUND, took
    ready, took = await timed(readiness(o))
    assert ready.status == 503, ready
    assert ready.body["status"] == "unavailable", ready.body
    assert "unreachable" in ready.body["checks"]["database"], ready.body
    assert took <= ANSWER_BOUND, took
    # a socket opened before: told why its request failed, and kept open
    reply = await open_before.request(
        {"type": "subscribe", "channel": "fleet_status", "id": "during"}, timeout=10
    )
    assert reply["type"] == "error", reply
    assert reply["data"]["code"] == "SERVICE_UNAVAILABLE", reply
    assert reply["id"] == "during", reply
    await fleet_figures_left_out(o)


async def fleet_figures_left_out(o: Outage) -> None:
    """Once the figures read before the outage are older than the collector's cache, the
    scrape leaves out those it cannot read, and still answers."""
    began = time.monotonic()
    while True:
        metrics, took = await timed(scrape(o))
        assert "sysmanage_database_up 0.0" in metrics, metrics
        assert took <= ANSWER_BOUND, took
        if "sysmanage_hosts{" not in metrics:
            return
        assert time.monotonic() - began <= FIGURES_TTL + ANSWER_BOUND, metrics
        await asyncio.sleep(0.25)
