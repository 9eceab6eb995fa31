"""Admission limits of /ws: sockets per user, failed authentications per address."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import pytest
from channels.testing import WebsocketCommunicator

from sysmanage import admission, consumers
from sysmanage.admission import AuthFailures, address_key
from sysmanage.asgi import application
from sysmanage.dbthreads import database_sync_to_async
from tests.wsutil import expect_close, request

SETTINGS_FILE = Path(__file__).resolve().parents[1] / "sysmanage" / "settings.py"


def test_defaults_meet_the_documented_bounds(monkeypatch):
    """Read with no WS_* variables set: the defaults docs/configuration.md lists."""
    for name in list(os.environ):
        if name.startswith("WS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DJANGO_SECRET_KEY", "x" * 50)
    values = runpy.run_path(str(SETTINGS_FILE))
    # a change no signal sees is acted on within two rechecks at most: under 10 s
    assert values["WS_RECHECK_SECONDS"] == 5
    assert values["WS_MAX_SOCKETS_PER_USER"] == 50
    assert values["WS_AUTH_FAILURES_PER_ADDRESS"] == 30
    assert values["WS_AUTH_FAILURE_WINDOW_SECONDS"] == 60


@pytest.mark.parametrize(
    ("client", "key"),
    [
        (("192.0.2.7", 5000), "192.0.2.7"),
        (("2001:db8:1:2:aaaa::1", 5000), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:bbbb::9", 5000), "2001:db8:1:2::/64"),  # same /64: one count
        (("::ffff:192.0.2.7", 5000), "192.0.2.7"),
        (("unix-socket", 0), "unix-socket"),
        (None, None),
    ],
)
def test_address_key(client, key):
    assert address_key({"client": client} if client else {}) == key


def test_failures_block_an_address_for_the_rest_of_the_window(settings):
    settings.WS_AUTH_FAILURES_PER_ADDRESS = 3
    settings.WS_AUTH_FAILURE_WINDOW_SECONDS = 60
    failures = AuthFailures()
    for second in (0, 10, 20):
        assert failures.blocked_for("a", now=second) == 0
        failures.record("a", now=second)
    assert failures.blocked_for("a", now=21) == pytest.approx(39)  # until 0 + 60
    assert failures.blocked_for("b", now=21) == 0  # other addresses are not affected
    assert failures.blocked_for("a", now=60.5) == 0  # the first failure left the window
    failures.record("a", now=61)
    assert failures.blocked_for("a", now=62) == pytest.approx(8)  # 10 + 60
    settings.WS_AUTH_FAILURES_PER_ADDRESS = 0
    assert failures.blocked_for("a", now=62) == 0  # 0 turns the limit off


def test_tracked_addresses_are_bounded(settings):
    settings.WS_AUTH_FAILURES_PER_ADDRESS = 1
    failures = AuthFailures(max_addresses=3)
    for i in range(5):
        failures.record(f"10.0.0.{i}", now=1)
    assert failures.blocked_for("10.0.0.0", now=2) == 0  # forgotten, oldest first
    assert failures.blocked_for("10.0.0.4", now=2) > 0


# -- through the consumer --------------------------------------------------------------------


async def connect(token=None, address="203.0.113.9", **kwargs):
    path = f"/ws?token={token}" if token is not None else "/ws"
    comm = WebsocketCommunicator(application, path, **kwargs)
    comm.scope["client"] = (address, 40000)
    connected, _ = await comm.connect()
    assert connected
    return comm


async def expect_refusal(comm, code, close_code):
    error = await comm.receive_json_from(timeout=3)
    assert error["type"] == "error"
    assert error["channel"] == "system"
    assert error["data"]["code"] == code, error
    assert await expect_close(comm) == close_code
    return error["data"]


@pytest.mark.django_db(transaction=True)
async def test_one_user_may_not_hold_more_sockets_than_the_limit(make_user, token_for, settings):
    settings.WS_MAX_SOCKETS_PER_USER = 3
    alice = await database_sync_to_async(make_user)("alice")
    bob = await database_sync_to_async(make_user)("bob")
    held = [await connect(token_for(alice)) for _ in range(3)]
    for comm in held:
        assert (await request(comm, {"type": "ping"}))["type"] == "pong"
    refused = await connect(token_for(alice))
    data = await expect_refusal(refused, "TOO_MANY_CONNECTIONS", 4429)
    assert data["limit"] == 3
    assert "at most 3" in data["message"]
    other = await connect(token_for(bob))  # another user is not affected
    assert (await request(other, {"type": "ping"}))["type"] == "pong"
    await held.pop().disconnect()
    again = await connect(token_for(alice))  # a freed place can be taken
    assert (await request(again, {"type": "ping"}))["type"] == "pong"
    for comm in (*held, other, again):
        await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_an_address_with_too_many_failed_handshakes_is_cut_off(
    make_user, token_for, settings, monkeypatch
):
    settings.WS_AUTH_FAILURES_PER_ADDRESS = 3
    alice = await database_sync_to_async(make_user)("alice")
    for bad in ("nope", "a.b.c", None):
        comm = await connect(bad)
        await expect_refusal(comm, "AUTH_FAILED", 4001)
    checked = []
    real = consumers.authenticate_socket

    async def counting(scope):
        checked.append(scope)
        return await real(scope)

    monkeypatch.setattr(consumers, "authenticate_socket", counting)
    blocked = await connect(token_for(alice))  # even a good token, from that address
    data = await expect_refusal(blocked, "TOO_MANY_AUTH_FAILURES", 4403)
    assert 55 <= data["retry_after"] <= 60
    assert checked == []  # refused before any database work
    elsewhere = await connect(token_for(alice), address="198.51.100.1")
    assert (await request(elsewhere, {"type": "ping"}))["type"] == "pong"
    await elsewhere.disconnect()
    admission.AUTH_FAILURES.clear()
    allowed = await connect(token_for(alice))
    assert (await request(allowed, {"type": "ping"}))["type"] == "pong"
    await allowed.disconnect()
