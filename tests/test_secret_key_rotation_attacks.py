"""Attacks on the rotation of the secret key (sysmanage/secretkeys.py): with a former key
in SECRET_KEY_FALLBACKS, nothing but what that key really signed, unexpired, for the
user's current credentials gets in -- not a token of another key, ``alg: none``, another
HMAC algorithm, an expired or not-yet-valid token, garbage -- and a password change,
a deactivation or a logout still voids what the former key signed.  Without fallbacks
the work per verification is what it was (tests/test_secret_key_rotation.py has the
working cases)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
import time
import uuid
from typing import Any

import pytest
from django.contrib.sessions.backends.db import SessionStore as DatabaseSessionStore
from django.contrib.sessions.models import Session
from django.db import OperationalError
from django.test import Client
from rest_framework.test import APIClient
from rest_framework_simplejwt import state
from rest_framework_simplejwt.exceptions import TokenError
from rest_framework_simplejwt.tokens import AccessToken

from sysmanage import credentials, secretkeys
from sysmanage.dbgate import DatabaseUnavailable
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.secretkeys import RotatingTokenBackend
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


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _json(value: Any) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def forged(claims: dict[str, Any], secret: str, *, alg: str = "HS256", header: Any = None) -> str:
    """A JWT of ``claims`` with ``header`` (``{"alg": alg, "typ": "JWT"}``), signed with
    ``secret`` by ``alg`` (HS256/384/512; ``none``: no signature)."""
    head = header if header is not None else {"alg": alg, "typ": "JWT"}
    signing_input = f"{_json(head)}.{_json(claims)}"
    if alg == "none":
        return f"{signing_input}."
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signature = hmac.new(secret.encode(), signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64(signature)}"


def claims_of(raw: str) -> dict[str, Any]:
    return dict(AccessToken(raw, verify=False).payload)  # type: ignore[arg-type]


def refresh_status(refresh: str) -> int:
    return APIClient().post("/api/token/refresh/", {"refresh": refresh}, format="json").status_code


def logout_status(refresh: str) -> int:
    return APIClient().post("/api/token/logout/", {"refresh": refresh}, format="json").status_code


def attacks_on(access: str, refresh: str) -> dict[str, tuple[str, str]]:
    """Tokens that must be refused under ``keys(NEW, OLD)``: made from the claims of a
    pair ``OLD`` signed, by someone without OLD or NEW, or by OLD but out of date."""
    a, r = claims_of(access), claims_of(refresh)
    past = {"exp": int(time.time()) - 5, "iat": int(time.time()) - 60}
    future = {"nbf": int(time.time()) + 3600}
    sig = {"access": access.rsplit(".", 1)[1], "refresh": refresh.rsplit(".", 1)[1]}
    return {
        "another key": (forged(a, OTHER), forged(r, OTHER)),
        "alg none": (forged(a, "", alg="none"), forged(r, "", alg="none")),
        "alg None": (
            forged(a, "", alg="none", header={"alg": "None"}),
            forged(r, "", alg="none", header={"alg": "None"}),
        ),
        "HS512 with the old key": (forged(a, OLD, alg="HS512"), forged(r, OLD, alg="HS512")),
        "HS384 with the old key": (forged(a, OLD, alg="HS384"), forged(r, OLD, alg="HS384")),
        "expired, the old key": (forged({**a, **past}, OLD), forged({**r, **past}, OLD)),
        "not yet valid, the old key": (forged({**a, **future}, OLD), forged({**r, **future}, OLD)),
        "the old key's signature on other claims": (
            f"{forged({**a, 'exp': a['exp'] + 3600}, OLD).rsplit('.', 1)[0]}.{sig['access']}",
            f"{forged({**r, 'exp': r['exp'] + 3600}, OLD).rsplit('.', 1)[0]}.{sig['refresh']}",
        ),
        "the old key, a fingerprint under another key": (
            forged({**a, "cfp": "0" * 32}, OLD),
            forged({**r, "cfp": "0" * 32}, OLD),
        ),
        "the old key, an access token as refresh": (access, access),
    }


@pytest.mark.django_db
def test_nothing_but_the_old_keys_own_unexpired_tokens_get_in(keys, make_user):
    make_user("alice")
    old = tokens_of("alice")
    keys(NEW, OLD)
    assert rest_status(old["access"]) == 200  # the genuine article works
    for name, (access, refresh) in attacks_on(old["access"], old["refresh"]).items():
        if access != old["access"]:
            assert rest_status(access) == 401, name
        assert refresh_status(refresh) == 401, name
        if "fingerprint" not in name:  # a logout checks the signature, not the fingerprint
            assert logout_status(refresh) in (400, 401), name
    assert refresh_status(old["refresh"]) == 200  # logout above blacklisted nothing real


GARBAGE = [
    "",
    ".",
    "..",
    "a.b.c",
    "x" * 20_000,
    "\u00e9\u00e9.\u00e9.\u00e9",
    f"{_json([1, 2])}.{_json({})}.",
    f"{_json({'alg': 'HS256', 'crit': ['exp']})}.{_json({})}.AAAA",
    f"{_json({'alg': 'HS256', 'b64': False, 'crit': ['b64']})}.x.AAAA",
    f"{_json({'alg': ['HS256']})}.{_json({})}.AAAA",
    f"{_json({'alg': 'HS256'})}.{_b64(b'not json')}.AAAA",
]


@pytest.mark.django_db
@pytest.mark.parametrize("fallbacks", [(), (OLD,)])
def test_garbage_is_refused_cleanly_with_and_without_fallbacks(keys, make_user, fallbacks):
    keys(NEW, *fallbacks)
    for raw in GARBAGE:
        with pytest.raises(TokenError):
            AccessToken(raw)  # type: ignore[arg-type]
        assert rest_status(raw.encode("utf-8").decode("latin-1")) == 401, raw[:40]
        assert refresh_status(raw) in (400, 401), raw[:40]


@pytest.mark.django_db
def test_the_old_key_signed_garbage_is_refused_cleanly(keys, make_user):
    alice = make_user("alice")
    keys(NEW, OLD)
    base = {"token_type": "access", "exp": int(time.time()) + 600, "jti": uuid.uuid4().hex}
    for user_id in (None, 7, str(uuid.uuid4()), "not-a-uuid", ["a", "list"], {"an": "object"}):
        raw = forged({**base, "user_id": user_id, "cfp": credentials.fingerprint(alice)}, OLD)
        assert rest_status(raw) == 401, user_id


@pytest.mark.django_db
@pytest.mark.parametrize("change", ["password", "deactivate"])
def test_credentials_changed_void_the_old_keys_tokens(keys, make_user, change):
    alice = make_user("alice")
    old = tokens_of("alice")
    keys(NEW, OLD)
    if change == "password":
        alice.set_password("a new password for alice")
    else:
        alice.is_active = False
    alice.save()
    assert rest_status(old["access"]) == 401
    assert refresh_status(old["refresh"]) == 401
    if change == "deactivate":  # enabled again: the password still voids them for good
        alice.is_active = True
        alice.set_password("yet another password")
        alice.save()
        assert rest_status(old["access"]) == 401
        assert refresh_status(old["refresh"]) == 401


@pytest.mark.django_db
def test_a_logout_voids_an_old_keys_refresh_token(keys, make_user):
    make_user("alice")
    old = tokens_of("alice")
    keys(NEW, OLD)
    assert logout_status(old["refresh"]) == 200
    assert refresh_status(old["refresh"]) == 401


@pytest.mark.django_db
def test_without_fallbacks_a_verification_costs_what_it_did(keys, make_user, monkeypatch):
    alice = make_user("alice")
    keys(NEW)
    raw = str(credentials.FingerprintedAccessToken.for_user(alice))
    made: list[str] = []
    monkeypatch.setattr(
        RotatingTokenBackend, "_with_key", lambda self, key: made.append(key) or None
    )
    hmacs = 0
    real = credentials.salted_hmac

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal hmacs
        hmacs += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(credentials, "salted_hmac", counting)
    assert rest_status(raw) == 200
    assert rest_status(forged(claims_of(raw), OTHER)) == 401
    assert made == []
    assert hmacs == 1  # the fingerprint of the one accepted token, under the one key
    assert secretkeys.secret_keys() == [NEW]


def session_of(username: str) -> str:
    client = Client()
    assert client.login(username=username, password=PASSWORD)
    return client.cookies["sessionid"].value


def session_row(key: str) -> tuple[str, Any] | None:
    row = Session.objects.filter(session_key=key).first()
    return None if row is None else (row.session_data, row.expire_date)


def logout_session(key: str) -> None:
    client = Client()
    client.cookies["sessionid"] = key
    assert client.post("/logout/").status_code == 302


def set_password(username: str) -> None:
    from sysmanage.models import User

    user = User.objects.get(username=username)
    user.set_password("a new password " + username)
    user.save()


async def socket_refused(key: str) -> None:
    comm = await open_socket("/ws", headers=[(b"cookie", f"sessionid={key}".encode())])
    error = await comm.receive_json_from(timeout=3)
    assert error["data"]["message"] == "Missing JWT token", error
    assert await expect_close(comm) == 4001


@pytest.mark.django_db(transaction=True)
async def test_an_ended_session_of_the_old_key_stays_ended_on_the_socket(keys, make_user):
    for name in ("alice", "bob"):
        await database_sync_to_async(make_user)(name)
    logged_out = await database_sync_to_async(session_of)("alice")
    changed = await database_sync_to_async(session_of)("bob")
    await database_sync_to_async(logout_session)(logged_out)
    await database_sync_to_async(set_password)("bob")
    keys(NEW, OLD)
    for key in (logged_out, changed):
        await socket_refused(key)
        assert await database_sync_to_async(session_row)(key) is None  # nothing brought back


@pytest.mark.django_db(transaction=True)
async def test_without_fallbacks_a_session_socket_writes_nothing(keys, make_user):
    await database_sync_to_async(make_user)("alice")
    key = await database_sync_to_async(session_of)("alice")
    before = await database_sync_to_async(session_row)(key)
    comm = await open_socket("/ws", headers=[(b"cookie", f"sessionid={key}".encode())])
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"
    await comm.disconnect()
    assert await database_sync_to_async(session_row)(key) == before


def _locked() -> OperationalError:
    """``database is locked`` as Django raises it from SQLite's driver."""
    try:
        raise OperationalError("database is locked") from sqlite3.OperationalError(
            "database is locked"
        )
    except OperationalError as exc:
        return exc


async def told_to_retry(key: str) -> None:
    """A socket with session cookie ``key`` is told the database is unavailable and
    closed 4503, as a socket with a token is (no error 500, no traceback)."""
    comm = await open_socket("/ws", headers=[(b"cookie", f"sessionid={key}".encode())])
    error = await comm.receive_json_from(timeout=3)
    assert error["data"]["code"] == "SERVICE_UNAVAILABLE", error
    assert await expect_close(comm) == 4503


@pytest.mark.django_db(transaction=True)
async def test_a_session_socket_meets_an_unreachable_database_with_4503(
    keys, make_user, monkeypatch
):
    await database_sync_to_async(make_user)("alice")
    key = await database_sync_to_async(session_of)("alice")

    def unreachable(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise DatabaseUnavailable("the database is unreachable: connection refused")

    monkeypatch.setattr(DatabaseSessionStore, "load", unreachable)
    await told_to_retry(key)


@pytest.mark.django_db(transaction=True)
async def test_a_busy_database_bringing_a_session_over_ends_no_session(
    keys, make_user, monkeypatch
):
    await database_sync_to_async(make_user)("alice")
    key = await database_sync_to_async(session_of)("alice")
    before = await database_sync_to_async(session_row)(key)
    keys(NEW, OLD)

    def locked(self: Any, *args: Any, **kwargs: Any) -> None:
        raise _locked()

    # the row's own save: Django's session store turns its error into UpdateError
    monkeypatch.setattr(Session, "save", locked)
    await told_to_retry(key)
    assert await database_sync_to_async(session_row)(key) == before  # not flushed
    monkeypatch.setattr(Session, "save", Session.__dict__["save"])
    monkeypatch.undo()
    keys(NEW, OLD)
    comm = await open_socket("/ws", headers=[(b"cookie", f"sessionid={key}".encode())])
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"
    await comm.disconnect()
