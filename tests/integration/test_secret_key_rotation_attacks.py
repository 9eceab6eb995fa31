"""
Attacks on a real server in the middle of a key rotation (docs/operations.md, "Rotating
the secret key"): restarted with K2 and ``DJANGO_SECRET_KEY_FALLBACKS=K1``, it takes
nothing but what K1 really signed, unexpired, for the user's current credentials --
over REST, ``/ws`` (query and subprotocol), an in-band ``refresh``,
``/api/token/refresh/`` and ``/api/token/logout/`` -- and a password change, a
deactivation or a logout made under K1 or K2 still ends what K1 signed, open sockets
included; nothing of it makes an error 500 or a traceback
(tests/test_secret_key_rotation_attacks.py has the same attacks in one process).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration import harness
from tests.integration.client import (
    WsClient,
    browser_login,
    http_request,
    obtain_tokens,
    ws_connect,
)
from tests.integration.test_secret_key_rotation import (
    assert_refused,
    check_log,
    in_band_refresh,
    refreshed,
    rest,
    restart,
    session_socket,
)
from tests.integration.tokens import claims_of

pytestmark = pytest.mark.integration

K2 = harness.new_secret()
K3 = harness.new_secret()  # a key the server never had
INVALID = "Invalid or expired JWT token"
REVOKED = "Token revoked: the account's credentials changed; sign in again"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _json(value: Any) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def forged(claims: dict[str, Any], secret: str, alg: str = "HS256") -> str:
    """A JWT of ``claims`` signed with ``secret`` by ``alg`` (``none``: unsigned)."""
    signing_input = f"{_json({'alg': alg, 'typ': 'JWT'})}.{_json(claims)}"
    if alg == "none":
        return f"{signing_input}."
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signature = hmac.new(secret.encode(), signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64(signature)}"


def attacks(k1: str, pair: dict[str, str]) -> dict[str, tuple[str, str]]:
    """(access, refresh) made from the claims of a pair K1 signed, by someone without
    K1 or K2, or by K1 but expired."""
    a, r = claims_of(pair["access"]), claims_of(pair["refresh"])
    past = {"exp": int(time.time()) - 5, "iat": int(time.time()) - 60}
    signature = {t: pair[t].rsplit(".", 1)[1] for t in pair}
    return {
        "another key": (forged(a, K3), forged(r, K3)),
        "the new key's name in the old key's place": (forged(a, K2 + "x"), forged(r, K2 + "x")),
        "alg none": (forged(a, "", "none"), forged(r, "", "none")),
        "HS512 with K1": (forged(a, k1, "HS512"), forged(r, k1, "HS512")),
        "HS384 with K1": (forged(a, k1, "HS384"), forged(r, k1, "HS384")),
        "expired, K1": (forged({**a, **past}, k1), forged({**r, **past}, k1)),
        "K1's signature on longer-lived claims": (
            f"{forged({**a, 'exp': a['exp'] + 9999}, K3).rsplit('.', 1)[0]}.{signature['access']}",
            f"{forged({**r, 'exp': r['exp'] + 9999}, K3).rsplit('.', 1)[0]}.{signature['refresh']}",
        ),
        "garbage": ("x" * 8000, "a.b.c"),
    }


async def refused_socket(d: harness.Deployment, message: str = INVALID, **kwargs: Any) -> None:
    async with ws_connect(d.server.ws_url, **kwargs) as client:
        await assert_refused(client, message)


async def closed_4001(client: WsClient) -> None:
    closed = await client.expect_closed(timeout=10)
    assert closed.code == 4001, closed


def shell(d: harness.Deployment, code: str) -> None:
    harness.manage_shell(
        d.env, "from django.contrib.auth import get_user_model\nUser = get_user_model()\n" + code
    )


async def test_a_rotating_server_takes_only_what_the_old_key_really_signed(
    launch_sqlite: Any, tmp_path: Path
) -> None:
    with launch_sqlite("keyrot-attacks", WS_RECHECK_SECONDS="1") as d:
        base, k1 = d.server.base_url, d.env["DJANGO_SECRET_KEY"]
        admin = obtain_tokens(base, "admin", d.password)
        spare = obtain_tokens(base, "admin", d.password)
        await asyncio.to_thread(
            shell, d, f"User.objects.create_user('staffer', password={d.password!r}, is_staff=True)"
        )
        viewer = obtain_tokens(base, "staffer", d.password)
        doomed = obtain_tokens(base, "doomed", d.password)
        logged_out = obtain_tokens(base, "admin", d.password)
        viewer_page = await asyncio.to_thread(browser_login, base, "staffer", d.password)
        gone_page = await asyncio.to_thread(browser_login, base, "admin", d.password)
        assert await asyncio.to_thread(gone_page.logout) in (200, 302)
        restart(
            d,
            tmp_path,
            "keyrot-attacks-k2-k1",
            DJANGO_SECRET_KEY=K2,
            DJANGO_SECRET_KEY_FALLBACKS=k1,
        )

        assert rest(base, token=admin["access"]) == 200  # what K1 signed works
        async with ws_connect(d.server.ws_url, token=admin["access"]) as victim:
            await victim.ping()
            for name, (access, refresh) in attacks(k1, admin).items():
                assert rest(base, token=access) == 401, name
                await refused_socket(d, token=access)
                if not name.startswith("garbage"):
                    await refused_socket(d, subprotocols=["bearer", access])
                assert refreshed(base, refresh)[0] == 401, name
                status = http_request(
                    "POST", f"{base}/api/token/logout/", json_body={"refresh": refresh}
                ).status
                assert status == 401, (name, status)
            await victim.ping()  # none of it touched the open socket
            async with ws_connect(d.server.ws_url, token=spare["access"]) as other:
                await other.ping()
                forged_refresh = attacks(k1, spare)["another key"][0]
                await other.send({"type": "refresh", "id": "r", "data": {"token": forged_refresh}})
                await assert_refused(other, INVALID)
            reply = await in_band_refresh(victim, spare["access"])
            assert reply["data"]["status"] == "refreshed", reply
        assert refreshed(base, admin["refresh"])[0] == 200  # no forged logout spent it

        # a token logout of a K1 refresh token under K2: spent for good
        logout = http_request(
            "POST", f"{base}/api/token/logout/", json_body={"refresh": logged_out["refresh"]}
        )
        assert logout.status == 200, logout
        assert refreshed(base, logged_out["refresh"])[0] == 401
        # a session logged out under K1 does not come back through the fallback
        async with session_socket(d, gone_page.sessionid) as client:
            await assert_refused(client, "Missing JWT token")

        # credentials changed under K2: what K1 signed for the old ones ends, open or not
        async with (
            ws_connect(d.server.ws_url, token=viewer["access"]) as viewer_socket,
            ws_connect(d.server.ws_url, token=doomed["access"]) as doomed_socket,
            session_socket(d, viewer_page.sessionid) as viewer_session_socket,
        ):
            for client in (viewer_socket, doomed_socket, viewer_session_socket):
                await client.ping()
            await asyncio.to_thread(
                shell,
                d,
                "v = User.objects.get(username='staffer')\n"
                "v.set_password('new pw 4242')\n"
                "v.save()\n"
                "User.objects.filter(username='doomed').update(is_active=False)\n",
            )
            await asyncio.gather(
                closed_4001(viewer_socket),
                closed_4001(doomed_socket),
                closed_4001(viewer_session_socket),
            )
        for pair, why in ((viewer, REVOKED), (doomed, "User account is disabled")):
            assert rest(base, token=pair["access"]) == 401
            assert refreshed(base, pair["refresh"])[0] == 401
            await refused_socket(d, why, token=pair["access"])
        async with session_socket(d, viewer_page.sessionid) as client:
            await assert_refused(client, "Missing JWT token")
        check_log(d.server)


LOCK_TIMEOUT = 1.0  # DB_SQLITE_LOCK_TIMEOUT of the server below
LOCK_HELD = 1.5  # past the timeout of the session's re-save, within that of a flush after


async def test_a_busy_database_while_a_socket_brings_a_session_over_ends_no_session(
    launch_sqlite: Any, tmp_path: Path
) -> None:
    """The socket is told to retry (4503) and the session kept, never flushed: a write
    that failed is no sign that the session ended."""
    with launch_sqlite("keyrot-busy", DB_SQLITE_LOCK_TIMEOUT=str(int(LOCK_TIMEOUT))) as d:
        k1 = d.env["DJANGO_SECRET_KEY"]
        page = await asyncio.to_thread(browser_login, d.server.base_url, "admin", d.password)
        restart(
            d, tmp_path, "keyrot-busy-k2-k1", DJANGO_SECRET_KEY=K2, DJANGO_SECRET_KEY_FALLBACKS=k1
        )
        database = d.env["DATABASE_URL"].removeprefix("sqlite:///")
        writer = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        try:
            writer.execute("BEGIN IMMEDIATE")  # another writer holds the lock a while
            release = asyncio.get_running_loop().call_later(
                LOCK_HELD, lambda: writer.execute("ROLLBACK")
            )
            async with session_socket(d, page.sessionid) as client:
                closed = await client.expect_closed(timeout=10)
            assert closed.code == 4503, closed
            assert [m["data"]["code"] for m in closed.messages] == ["SERVICE_UNAVAILABLE"]
            await asyncio.sleep(max(0.0, release.when() - asyncio.get_running_loop().time()))
        finally:
            await asyncio.sleep(0.1)
            writer.close()
        async with session_socket(d, page.sessionid) as client:  # the retry gets in
            await client.ping()
        assert rest(d.server.base_url, opener=page.opener) == 200
        check_log(d.server)
