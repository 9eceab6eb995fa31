"""
Rotating the secret key on a real server (docs/operations.md, "Rotating the secret
key"): a server with key K1 hands out tokens, browser sessions and agent connection
tokens; restarted with K2 and ``DJANGO_SECRET_KEY_FALLBACKS=K1`` it still takes all of
them -- REST, ``/ws``, in-band ``refresh``, ``/api/token/refresh/``, the session cookie,
both kinds of agent -- and issues only K2 tokens; restarted with K2 alone it refuses
what was made under K1 the way it refuses any bad credential (401, ``AUTH_FAILED`` and
4001), never with a 500 or a traceback, while what was renewed under K2 keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.compat.fake_sysmanage_agent import FakeSysManageAgent
from tests.integration import harness
from tests.integration.client import (
    Session,
    WsClient,
    browser_login,
    http_request,
    obtain_tokens,
    ws_connect,
)
from tests.integration.smagent import close_and_settle, enrolled, error_of
from tests.integration.test_agent_e2e import AGENT_SETTINGS, AgentProcess, register, wait_status
from tests.integration.tokens import signed_with

pytestmark = pytest.mark.integration

K2 = harness.new_secret()
AGENT_WAIT = 20.0


def restart(d: harness.Deployment, work: Path, name: str, **settings: str | None) -> None:
    """Stop the server and start it again on its port with ``settings`` changed (None
    unsets one), as a rolling restart does to each process; check the stopped one's log."""
    old = d.servers[0]
    old.stop()
    check_log(old)
    env = dict(d.env)
    for key, value in settings.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    server = harness.DaphneServer(name, env, work / f"{name}.log", port=old.port)
    d.servers[0] = server.start().wait_ready()
    d.env = env
    d.tokens.clear()  # the tokens the helpers use come from the new server


def check_log(server: harness.DaphneServer) -> None:
    """No traceback and no answer 500 in ``server``'s log."""
    log = server.log()
    assert "Traceback (most recent call last)" not in log, log[-20_000:]
    answered_500 = [line for line in log.splitlines() if re.search(r'"\s+500\s', line)]
    assert not answered_500, answered_500


def rest(base: str, **kwargs: Any) -> int:
    """The status of ``GET /api/hosts/`` with these credentials."""
    return http_request("GET", f"{base}/api/hosts/", **kwargs).status


def refreshed(base: str, refresh: str) -> tuple[int, Any]:
    response = http_request("POST", f"{base}/api/token/refresh/", json_body={"refresh": refresh})
    return response.status, response.body


def session_cookie(session: Session) -> str:
    """The browser's ``sessionid`` as its cookie jar has it now (Django renews the key
    of a session it brings over to the new secret key)."""
    for handler in session.opener.handlers:
        if isinstance(handler, urllib.request.HTTPCookieProcessor):
            jar: http.cookiejar.CookieJar = handler.cookiejar
            return next(c.value or "" for c in jar if c.name == "sessionid")
    raise AssertionError("the session's opener keeps no cookies")


@contextlib.asynccontextmanager
async def session_socket(d: harness.Deployment, sessionid: str) -> Any:
    """``/ws`` as the dashboard opens it: same origin, the session cookie, no token."""
    base = d.server.base_url
    async with ws_connect(
        d.server.ws_url, origin=base, headers={"Cookie": f"sessionid={sessionid}"}
    ) as client:
        yield client


async def assert_refused(client: WsClient, message: str) -> None:
    """One ``AUTH_FAILED`` error saying ``message``, then close 4001."""
    closed = await client.expect_closed()
    assert closed.code == 4001, closed
    assert [m["data"]["code"] for m in closed.messages] == ["AUTH_FAILED"], closed.messages
    assert closed.messages[0]["data"]["message"] == message, closed.messages


async def in_band_refresh(client: WsClient, access: str) -> dict[str, Any]:
    return await client.request({"type": "refresh", "data": {"token": access}})


def agent_sockets(d: harness.Deployment) -> float:
    """Open sockets of the agent program on the server (``/metrics``)."""
    text = http_request("GET", f"{d.server.base_url}/metrics", headers={"Accept": "text/plain"})
    found = re.findall(r"^sysmanage_sockets_open\{([^}]*)\} (\S+)$", text.body, re.MULTILINE)
    return sum(float(value) for labels, value in found if 'kind="agent"' in labels)


async def agent_reconnected(d: harness.Deployment, host_id: str) -> None:
    """The agent program (its token is stored as a digest: no key involved) is connected
    to the restarted server and its host online."""
    deadline = time.monotonic() + AGENT_WAIT
    while await asyncio.to_thread(agent_sockets, d) < 1:
        assert time.monotonic() < deadline, "the agent did not reconnect"
        await asyncio.sleep(0.2)
    await wait_status(d, host_id, "online")


async def sysmanage_agent_connects(
    d: harness.Deployment, agent: FakeSysManageAgent, token: str | None = None
) -> None:
    """The SysManage agent connects (with ``token``, or a fresh one from
    ``/api/agent/auth``) and proves who it is: its heartbeat is acknowledged."""
    agent.received.clear()
    await agent.connect(token)
    ack = await agent.send_acked("heartbeat", agent.heartbeat_data())
    assert ack["data"]["status"] == "received", ack
    await close_and_settle(d, agent)


async def test_rotating_the_secret_key_logs_nobody_out_and_keeps_the_agents(
    launch_sqlite: Any, tmp_path: Path
) -> None:
    with launch_sqlite("keyrot", **AGENT_SETTINGS) as d:
        await rotate(d, tmp_path)


async def rotate(d: harness.Deployment, work: Path) -> None:
    # -- K1: what clients and agents hold when the key changes -----------------------
    k1 = d.env["DJANGO_SECRET_KEY"]
    base = d.server.base_url
    first, second = (obtain_tokens(base, "admin", d.password) for _ in range(2))
    assert signed_with(first["access"], k1)
    browsing, socket_only, idle = [
        await asyncio.to_thread(browser_login, base, "admin", d.password) for _ in range(3)
    ]
    enrolled_host = register(d, "keyrot-agent")
    agent_program = AgentProcess(
        base, enrolled_host["token"], work / "agent-state", work / "agent.log"
    ).start()
    try:
        await wait_status(d, enrolled_host["host_id"], "online")
        sysmanage_agent = await enrolled(d, "keyrot")
        sealed_under_k1 = await asyncio.to_thread(sysmanage_agent.auth)
        await sysmanage_agent_connects(d, sysmanage_agent, sealed_under_k1)

        # -- K2 with K1 as a fallback: everything of before still works -------------
        restart(d, work, "keyrot-k2-k1", DJANGO_SECRET_KEY=K2, DJANGO_SECRET_KEY_FALLBACKS=k1)
        assert rest(base, token=first["access"]) == 200
        async with ws_connect(d.server.ws_url, token=first["access"]) as client:
            await client.ping()
            reply = await in_band_refresh(client, second["access"])
            assert reply["data"]["status"] == "refreshed", reply
            status, renewed = refreshed(base, first["refresh"])
            assert status == 200, renewed
            for token in renewed.values():
                assert signed_with(token, K2)
                assert not signed_with(token, k1)
            reply = await in_band_refresh(client, renewed["access"])
            assert reply["data"]["status"] == "refreshed", reply
        # a page whose socket reconnects before it loads a page again
        async with session_socket(d, socket_only.sessionid) as client:
            await client.ping()
        assert rest(base, opener=browsing.opener) == 200  # a page loaded
        async with session_socket(d, session_cookie(browsing)) as client:
            await client.ping()
        await agent_reconnected(d, enrolled_host["host_id"])
        await sysmanage_agent_connects(d, sysmanage_agent, sealed_under_k1)
        await sysmanage_agent_connects(d, sysmanage_agent)

        # -- K2 alone: what was made under K1 is refused cleanly, the renewed works --
        restart(d, work, "keyrot-k2", DJANGO_SECRET_KEY=K2, DJANGO_SECRET_KEY_FALLBACKS=None)
        assert rest(base, token=second["access"]) == 401
        assert refreshed(base, second["refresh"])[0] == 401
        async with ws_connect(d.server.ws_url, token=second["access"]) as client:
            await assert_refused(client, "Invalid or expired JWT token")
        status, again = refreshed(base, renewed["refresh"])
        assert status == 200, again
        assert rest(base, token=again["access"]) == 200
        async with ws_connect(d.server.ws_url, token=again["access"]) as client:
            await client.ping()
            await client.send({"type": "refresh", "id": "r", "data": {"token": second["access"]}})
            await assert_refused(client, "Invalid or expired JWT token")
        for kept in (browsing, socket_only):
            async with session_socket(d, session_cookie(kept)) as client:
                await client.ping()
            assert rest(base, opener=kept.opener) == 200
        async with session_socket(d, idle.sessionid) as client:
            await assert_refused(client, "Missing JWT token")
        assert rest(base, opener=idle.opener) in (401, 403)
        await agent_reconnected(d, enrolled_host["host_id"])
        sysmanage_agent.received.clear()
        await sysmanage_agent.connect(sealed_under_k1)
        error_of(await sysmanage_agent.wait_type("error"), "invalid_token")
        assert await sysmanage_agent.wait_closed() == 4001
        await sysmanage_agent_connects(d, sysmanage_agent)
        check_log(d.server)
    finally:
        agent_program.stop()
