"""Rotating the secret key: what was made under a key of SECRET_KEY_FALLBACKS -- JWTs and
their fingerprints, sessions (also over /ws), the agents' connection tokens -- is still
accepted, everything new is made under SECRET_KEY, and without the fallback the old is
refused as any bad credential is (tests/integration/test_secret_key_rotation.py does the
same against real servers)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth import HASH_SESSION_KEY
from django.contrib.sessions.models import Session
from django.core.exceptions import ImproperlyConfigured
from django.test import Client
from rest_framework.test import APIClient
from rest_framework_simplejwt import state
from rest_framework_simplejwt.exceptions import ExpiredTokenError, TokenError
from rest_framework_simplejwt.token_blacklist.models import BlacklistedToken
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken

from hosts.smagent import tokens as connection_tokens
from sysmanage.credentials import FINGERPRINT_CLAIM, fingerprint
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.secretkeys import RotatingTokenBackend, secret_keys
from sysmanage.settings import _secret_key_fallbacks
from tests.conftest import PASSWORD
from tests.test_credentials import rest_status, tokens_of
from tests.wsutil import expect_close, open_socket, request

OLD = "the old secret key " + "o" * 40
NEW = "the new secret key " + "n" * 40
OTHER = "a key this server never had " + "x" * 30


@pytest.fixture
def keys(settings, monkeypatch):
    """``keys(current, *fallbacks)``: the process restarted with that configuration."""

    def restart(current: str, *fallbacks: str) -> None:
        settings.SECRET_KEY = current
        settings.SECRET_KEY_FALLBACKS = list(fallbacks)
        monkeypatch.setattr(state, "token_backend", RotatingTokenBackend("HS256", current))

    restart(OLD)
    return restart


def signed_with(raw: str, key: str) -> bool:
    try:
        RotatingTokenBackend("HS256", key).decode(raw)  # type: ignore[arg-type]
    except Exception:
        return False
    return True


def test_the_fallbacks_setting_is_a_comma_separated_list_without_the_key():
    assert _secret_key_fallbacks("", NEW) == []
    assert _secret_key_fallbacks(f" {OLD} ,, {OTHER},{OLD}", NEW) == [OLD, OTHER]
    with pytest.raises(ImproperlyConfigured, match="holds the current DJANGO_SECRET_KEY"):
        _secret_key_fallbacks(f"{OLD},{NEW}", NEW)


def test_secret_keys_lists_the_current_key_first(keys):
    keys(NEW, OLD, OTHER)
    assert secret_keys() == [NEW, OLD, OTHER]


@pytest.mark.django_db
def test_old_tokens_work_and_refresh_to_new_ones_while_the_old_key_is_a_fallback(keys, make_user):
    alice = make_user("alice")
    old = tokens_of("alice")
    keys(NEW, OLD)
    assert rest_status(old["access"]) == 200
    refreshed = APIClient().post("/api/token/refresh/", {"refresh": old["refresh"]}, format="json")
    assert refreshed.status_code == 200, refreshed.content
    for raw in refreshed.data.values():
        assert signed_with(raw, NEW)
        assert not signed_with(raw, OLD)
        # made again under the new key: the pair outlives the fallback
        assert AccessToken(raw, verify=False)[FINGERPRINT_CLAIM] == fingerprint(alice)
    keys(NEW)
    assert rest_status(refreshed.data["access"]) == 200
    again = APIClient().post(
        "/api/token/refresh/", {"refresh": refreshed.data["refresh"]}, format="json"
    )
    assert again.status_code == 200, again.content


@pytest.mark.django_db
def test_without_the_fallback_old_tokens_are_refused_as_invalid(keys, make_user):
    make_user("alice")
    old = tokens_of("alice")
    keys(NEW)
    assert rest_status(old["access"]) == 401
    refused = APIClient().post("/api/token/refresh/", {"refresh": old["refresh"]}, format="json")
    assert refused.status_code == 401, refused.content
    keys(NEW, OTHER)  # a fallback that did not sign them changes nothing
    assert rest_status(old["access"]) == 401


@pytest.mark.django_db
def test_an_expired_token_of_the_old_key_is_expired_and_unverified_decoding_is_untouched(
    keys, make_user
):
    alice = make_user("alice")
    expired = AccessToken.for_user(alice)
    expired.set_exp(lifetime=-timedelta(seconds=5))
    raw = str(expired)
    keys(NEW, OLD)
    with pytest.raises(ExpiredTokenError):
        AccessToken(raw)
    keys(NEW)
    with pytest.raises(TokenError) as refused:
        AccessToken(raw)
    assert not isinstance(refused.value, ExpiredTokenError)
    assert AccessToken(raw, verify=False)["user_id"] == str(alice.pk)


@pytest.mark.django_db
def test_saving_a_user_during_the_rotation_keeps_its_old_refresh_tokens(keys, make_user):
    alice = make_user("alice")
    old = tokens_of("alice")
    keys(NEW, OLD)
    alice.email = "alice@example.com"
    alice.save()
    assert not BlacklistedToken.objects.exists()
    alice.set_password("a new password for alice")
    alice.save()  # new credentials: revoked, whatever the key
    jti = RefreshToken(old["refresh"], verify=False)["jti"]
    assert BlacklistedToken.objects.get().token.jti == jti


@pytest.mark.django_db(transaction=True)
async def test_old_access_tokens_open_a_socket_and_refresh_it_in_band(keys, make_user):
    await database_sync_to_async(make_user)("alice")
    first = await database_sync_to_async(tokens_of)("alice")
    second = await database_sync_to_async(tokens_of)("alice")
    keys(NEW, OLD)
    comm = await open_socket("/ws", token=first["access"])
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"
    reply = await request(comm, {"type": "refresh", "id": "r", "data": {"token": second["access"]}})
    assert (reply["type"], reply["data"]["status"]) == ("response", "refreshed"), reply
    await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_without_the_fallback_an_old_token_gets_auth_failed_and_4001(keys, make_user):
    await database_sync_to_async(make_user)("alice")
    old = await database_sync_to_async(tokens_of)("alice")
    keys(NEW)
    comm = await open_socket("/ws", token=old["access"])
    error = await comm.receive_json_from(timeout=3)
    assert (error["type"], error["data"]["code"]) == ("error", "AUTH_FAILED"), error
    assert await expect_close(comm) == 4001


def session_of(username: str) -> str:
    client = Client()
    assert client.login(username=username, password=PASSWORD)
    return client.cookies["sessionid"].value


def stored_hash(key: str) -> str:
    return str(Session.objects.get(session_key=key).get_decoded()[HASH_SESSION_KEY])


@pytest.mark.django_db(transaction=True)
async def test_a_socket_keeps_a_session_of_the_old_key_and_brings_it_to_the_new(keys, make_user):
    user = await database_sync_to_async(make_user)("alice")
    key = await database_sync_to_async(session_of)("alice")
    keys(NEW, OLD)
    comm = await open_socket("/ws", headers=[(b"cookie", f"sessionid={key}".encode())])
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"
    await comm.disconnect()
    assert await database_sync_to_async(stored_hash)(key) == user.get_session_auth_hash()
    keys(NEW)  # the old key dropped: the session, brought over, still works
    comm = await open_socket("/ws", headers=[(b"cookie", f"sessionid={key}".encode())])
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"
    await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_without_the_fallback_a_socket_finds_an_old_session_ended(keys, make_user):
    await database_sync_to_async(make_user)("alice")
    key = await database_sync_to_async(session_of)("alice")
    keys(NEW)
    comm = await open_socket("/ws", headers=[(b"cookie", f"sessionid={key}".encode())])
    error = await comm.receive_json_from(timeout=3)
    assert error["data"]["message"] == "Missing JWT token", error
    assert await expect_close(comm) == 4001


def test_agent_connection_tokens_open_under_a_fallback_key(keys):
    sealed = connection_tokens.issue("web-01")
    keys(NEW, OLD)
    opened = connection_tokens.open_token(sealed)
    assert opened is not None
    assert opened.name == "web-01"
    assert connection_tokens.open_token(connection_tokens.issue("web-01")) is not None
    keys(NEW)
    assert connection_tokens.open_token(sealed) is None
