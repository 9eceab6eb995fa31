"""Credential fingerprints in tokens: a password change or a deactivation, however it is
made, voids every token; changes the signals see also blacklist the refresh tokens."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from rest_framework.test import APIClient
from rest_framework_simplejwt.token_blacklist.models import BlacklistedToken, OutstandingToken
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken

from sysmanage.credentials import FINGERPRINT_CLAIM, REVOKED_MESSAGE, fingerprint
from sysmanage.dbthreads import database_sync_to_async
from tests.conftest import PASSWORD
from tests.wsutil import expect_close, open_socket, request

User = get_user_model()


def tokens_of(username: str) -> dict[str, str]:
    response = APIClient().post(
        "/api/token/", {"username": username, "password": PASSWORD}, format="json"
    )
    assert response.status_code == 200, response.content
    return response.data


def rest_status(access: str) -> int:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {access}")
    return client.get("/api/hosts/").status_code


def refresh(token: str):
    return APIClient().post("/api/token/refresh/", {"refresh": token}, format="json")


@pytest.mark.django_db
def test_issued_tokens_carry_the_fingerprint(make_user):
    alice = make_user("alice")
    tokens = tokens_of("alice")
    assert RefreshToken(tokens["refresh"])[FINGERPRINT_CLAIM] == fingerprint(alice)
    assert AccessToken(tokens["access"])[FINGERPRINT_CLAIM] == fingerprint(alice)
    rotated = refresh(tokens["refresh"]).data
    assert AccessToken(rotated["access"])[FINGERPRINT_CLAIM] == fingerprint(alice)
    # the stored (outstanding) copy carries it too
    stored = OutstandingToken.objects.get(jti=RefreshToken(tokens["refresh"], verify=False)["jti"])
    assert RefreshToken(stored.token, verify=False)[FINGERPRINT_CLAIM] == fingerprint(alice)


@pytest.mark.django_db
def test_fingerprint_changes_with_password_and_active_flag_only(make_user):
    alice, bob = make_user("alice"), make_user("bob")
    before = fingerprint(alice)
    assert fingerprint(bob) != before  # salted hashes differ
    alice.is_staff, alice.email = True, "new@example.com"
    assert fingerprint(alice) == before
    alice.is_active = False
    assert fingerprint(alice) != before
    alice.is_active = True
    alice.set_password("another password entirely")
    assert fingerprint(alice) != before


@pytest.mark.django_db
def test_password_changed_by_queryset_update_voids_access_and_refresh_tokens(make_user):
    make_user("alice")
    tokens = tokens_of("alice")
    assert rest_status(tokens["access"]) == 200
    User.objects.filter(username="alice").update(password=make_password("changed elsewhere"))
    response = APIClient()
    response.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens['access']}")
    refused = response.get("/api/hosts/")
    assert refused.status_code == 401
    assert refused.data["detail"] == REVOKED_MESSAGE
    again = refresh(tokens["refresh"])
    assert again.status_code == 401
    assert again.data["detail"] == REVOKED_MESSAGE


@pytest.mark.django_db
def test_tokens_of_a_user_deactivated_by_queryset_update_are_refused(make_user):
    make_user("alice")
    tokens = tokens_of("alice")
    User.objects.filter(username="alice").update(is_active=False)
    assert rest_status(tokens["access"]) == 401
    assert refresh(tokens["refresh"]).status_code == 401


@pytest.mark.django_db
def test_deactivation_by_save_keeps_refresh_tokens_revoked_after_reactivation(make_user):
    alice = make_user("alice")
    tokens = tokens_of("alice")
    alice.is_active = False
    alice.save()
    alice.is_active = True
    alice.save()
    assert refresh(tokens["refresh"]).status_code == 401
    assert rest_status(tokens_of("alice")["access"]) == 200  # a new sign-in works


@pytest.mark.django_db
def test_tokens_without_the_claim_are_refused(make_user):
    alice = make_user("alice")
    assert rest_status(str(AccessToken.for_user(alice))) == 401
    assert refresh(str(RefreshToken.for_user(alice))).status_code == 401


@pytest.mark.django_db
def test_refresh_token_of_a_deleted_user_is_refused_cleanly(make_user):
    make_user("alice")
    tokens = tokens_of("alice")
    User.objects.filter(username="alice").delete()
    assert refresh(tokens["refresh"]).status_code == 401


def jti(token: str) -> str:
    return RefreshToken(token, verify=False)["jti"]


def blacklisted() -> set[str]:
    return set(BlacklistedToken.objects.values_list("token__jti", flat=True))


@pytest.mark.django_db
def test_password_change_seen_by_the_signal_blacklists_refresh_tokens(make_user):
    alice = make_user("alice")
    make_user("bob")
    alices = [tokens_of("alice")["refresh"] for _ in range(2)]
    bobs = tokens_of("bob")["refresh"]
    alice.set_password("a new password for alice")
    alice.save()
    assert blacklisted() == {jti(t) for t in alices}
    # tokens issued for the new password survive saves that change no credential
    response = APIClient().post(
        "/api/token/", {"username": "alice", "password": "a new password for alice"}, format="json"
    )
    alice.first_name = "Alice"
    alice.save()
    assert jti(response.data["refresh"]) not in blacklisted()
    assert refresh(response.data["refresh"]).status_code == 200
    assert refresh(bobs).status_code == 200


@pytest.mark.django_db
def test_deactivation_and_deletion_blacklist_refresh_tokens(make_user):
    alice, bob = make_user("alice"), make_user("bob")
    alices, bobs = tokens_of("alice")["refresh"], tokens_of("bob")["refresh"]
    alice.is_active = False
    alice.save()
    assert blacklisted() == {jti(alices)}
    bob.delete()
    assert blacklisted() == {jti(alices), jti(bobs)}


@pytest.mark.django_db(transaction=True)
async def test_socket_handshake_checks_the_fingerprint(make_user, token_for):
    alice = await database_sync_to_async(make_user)("alice")
    token = token_for(alice)
    comm = await open_socket("/ws", token=token)
    assert (await request(comm, {"type": "ping"}))["type"] == "pong"
    await comm.disconnect()
    await database_sync_to_async(User.objects.filter(pk=alice.pk).update)(
        password=make_password("changed")
    )
    comm = await open_socket("/ws", token=token)
    error = await comm.receive_json_from(timeout=3)
    assert error["data"]["code"] == "AUTH_FAILED"
    assert error["data"]["message"] == REVOKED_MESSAGE
    assert await expect_close(comm) == 4001
