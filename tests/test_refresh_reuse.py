"""The refresh-token reuse grace: a client that never saw the answer to its refresh may
send the same token again for a short while, and only then, and only for a sign-in that
is still valid."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from sysmanage.credentials import SESSION_CLAIM
from sysmanage.models import RefreshRotation
from sysmanage.services import refresh_rotations_prune
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


def sign_in(username: str = "alice") -> dict[str, str]:
    response = APIClient().post(
        "/api/token/", {"username": username, "password": PASSWORD}, format="json"
    )
    assert response.status_code == 200, response.content
    return response.data


def refresh(token: str):
    return APIClient().post("/api/token/refresh/", {"refresh": token}, format="json")


def logout(token: str) -> int:
    return APIClient().post("/api/token/logout/", {"refresh": token}, format="json").status_code


def works(pair: dict[str, str]) -> bool:
    """Whether the access token is accepted and the refresh token refreshes."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {pair['access']}")
    return (
        client.get("/api/hosts/").status_code == 200 and refresh(pair["refresh"]).status_code == 200
    )


def claims(token: str) -> dict:
    return RefreshToken(token, verify=False).payload


@pytest.fixture
def alice(make_user):
    return make_user("alice")


def test_a_rotated_token_sent_again_within_the_grace_gets_a_new_pair_of_its_sign_in(alice):
    first = sign_in()
    lost = refresh(first["refresh"]).data  # the answer the client never saw
    again = refresh(first["refresh"])
    assert again.status_code == 200, again.data
    assert again.data["refresh"] != lost["refresh"]
    assert claims(again.data["refresh"])[SESSION_CLAIM] == claims(first["refresh"])[SESSION_CLAIM]
    assert works(dict(again.data))


def test_the_token_may_be_sent_again_until_its_latest_successor_is_used(alice):
    first = sign_in()
    refresh(first["refresh"])
    retried = refresh(first["refresh"]).data
    retried_again = refresh(first["refresh"])
    assert retried_again.status_code == 200  # retries of a retry: still the same rotation
    assert refresh(retried_again.data["refresh"]).status_code == 200  # the client moved on
    assert refresh(first["refresh"]).status_code == 401  # the grace ends with it
    assert refresh(retried["refresh"]).status_code == 200  # an earlier retry's own token


def test_a_token_two_rotations_back_is_refused(alice):
    first = sign_in()
    second = refresh(first["refresh"]).data
    assert refresh(second["refresh"]).status_code == 200
    response = refresh(first["refresh"])
    assert response.status_code == 401
    assert response.data["code"] == "token_not_valid"


def test_after_the_grace_the_token_is_refused(alice):
    first = sign_in()
    refresh(first["refresh"])
    RefreshRotation.objects.update(grace_until=timezone.now() - timedelta(seconds=1))
    assert refresh(first["refresh"]).status_code == 401


def test_without_grace_a_rotated_token_is_refused_at_once(alice, settings):
    settings.JWT_REFRESH_REUSE_GRACE_SECONDS = 0
    first = sign_in()
    assert refresh(first["refresh"]).status_code == 200
    assert refresh(first["refresh"]).status_code == 401
    assert not RefreshRotation.objects.exists()


def test_logging_out_ends_the_grace_of_the_whole_sign_in(alice):
    first = sign_in()
    second = refresh(first["refresh"]).data
    assert logout(second["refresh"]) == 200
    assert refresh(first["refresh"]).status_code == 401
    # also when the sign-in logged out with a token the grace had issued
    other = sign_in()
    refresh(other["refresh"])
    retried = refresh(other["refresh"]).data
    assert logout(retried["refresh"]) == 200
    assert refresh(other["refresh"]).status_code == 401


def test_a_token_logged_out_is_never_reused(alice):
    first = sign_in()
    assert logout(first["refresh"]) == 200
    assert refresh(first["refresh"]).status_code == 401


def test_a_password_change_ends_the_grace(alice):
    first = sign_in()
    refresh(first["refresh"])
    alice.set_password("another horse battery staple")
    alice.save()
    assert refresh(first["refresh"]).status_code == 401


def test_a_password_change_no_signal_sees_ends_the_grace(alice):
    first = sign_in()
    refresh(first["refresh"])
    type(alice).objects.filter(pk=alice.pk).update(password="pbkdf2_sha256$1$x$y")
    assert refresh(first["refresh"]).status_code == 401


def test_deactivation_ends_the_grace(alice):
    first = sign_in()
    refresh(first["refresh"])
    alice.is_active = False
    alice.save()
    assert refresh(first["refresh"]).status_code == 401
    alice.is_active = True
    alice.save()
    assert refresh(first["refresh"]).status_code == 401  # its successor stays revoked


def test_only_digests_are_stored(alice):
    first = sign_in()
    second = refresh(first["refresh"]).data
    rotation = RefreshRotation.objects.get()
    assert rotation.spent == hashlib.sha256(first["refresh"].encode()).hexdigest()
    sid = claims(first["refresh"])[SESSION_CLAIM]
    assert rotation.sign_in == hashlib.sha256(sid.encode()).hexdigest()
    stored = " ".join(str(v) for v in RefreshRotation.objects.values().get().values())
    for secret in (first["refresh"], second["refresh"], sid, claims(first["refresh"])["jti"]):
        assert secret not in stored


def test_rotations_past_their_grace_are_pruned(alice):
    first = sign_in()
    refresh(first["refresh"])
    assert refresh_rotations_prune() == 0
    RefreshRotation.objects.update(grace_until=timezone.now() - timedelta(seconds=1))
    assert refresh_rotations_prune() == 1
    assert not RefreshRotation.objects.exists()


@pytest.mark.parametrize(("grace", "status"), [(30, 200), (0, 401)])
def test_a_request_racing_a_rotation_of_its_token_is_a_reuse(
    alice, settings, monkeypatch, grace, status
):
    """Two refreshes with one token at once: the second finds the token spent only when
    it spends it (the blacklist check before passed), and is then judged as a reuse."""
    from sysmanage.credentials import FingerprintedRefreshToken

    settings.JWT_REFRESH_REUSE_GRACE_SECONDS = grace
    first = sign_in()
    assert refresh(first["refresh"]).status_code == 200  # the request that won the race
    monkeypatch.setattr(FingerprintedRefreshToken, "check_blacklist", lambda self: None)
    raced = refresh(first["refresh"])
    assert raced.status_code == status, raced.data
    if status == 200:
        monkeypatch.undo()
        assert works(dict(raced.data))


def test_a_refresh_takes_few_queries(alice, django_assert_max_num_queries):
    """A storm of clients refreshing at once waits on these: the user, the token's
    record, its spending, the new record and the rotation, in one transaction."""
    first = sign_in()
    # the user; the token's record, its spending (looked up, then recorded in a
    # savepoint), the new token's record, the rotation; the transaction's savepoint
    # (the test's transaction around it) -- 14 when each was looked up before it was made
    with django_assert_max_num_queries(10):
        assert refresh(first["refresh"]).status_code == 200


def test_a_spent_token_of_a_disabled_user_is_refused_as_spent(alice):
    """Refused for being spent, as before the refresh read the blacklist only once."""
    first = sign_in()
    refresh(first["refresh"])
    logout(refresh(first["refresh"]).data["refresh"])
    alice.is_active = False
    alice.save()
    answer = refresh(first["refresh"])
    assert answer.status_code == 401
    assert answer.data["code"] == "token_not_valid"
    assert "blacklisted" in str(answer.data["detail"]).lower()
