"""Login lockout: one normalization, pair locks, address locks and the account slow-down.

In-process tests of ``activity/lockout.py`` through the token endpoint and the login
forms; ``tests/integration/test_security_http.py`` performs the same attacks against a
real server.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from activity.lockout import (
    account_key,
    address_key,
    login_attempt_begin,
    login_attempt_end,
    login_username_normalize,
)
from activity.models import LoginCounter, UserActivity
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db

ATTACKER, OWNER = "198.51.100.7", "203.0.113.9"
#: Spellings of "alice" that Django's login forms turn into "alice".
VARIANTS = [
    "alice ",
    " alice",
    "\talice",
    "alice\n",
    "\u3000alice",
    "ａｌｉｃｅ",
    "\u00a0alice\u2003",
]


def token_login(username, password=PASSWORD, address=ATTACKER):
    return APIClient().post(
        "/api/token/",
        {"username": username, "password": password},
        format="json",
        REMOTE_ADDR=address,
    )


def form_login(client, path, username, password=PASSWORD, address=ATTACKER):
    return client.post(path, {"username": username, "password": password}, REMOTE_ADDR=address)


def lock_alice(settings, make_user, address=ATTACKER):
    settings.LOGIN_LOCKOUT_THRESHOLD = 3
    make_user("alice", staff=True)
    for _ in range(3):
        assert token_login("alice", "wrong", address).status_code == 401
    assert token_login("alice", address=address).status_code == 429


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_spelling_of_a_name_normalizes_and_counts_as_one_account(variant):
    assert login_username_normalize(variant) == "alice"
    assert account_key(login_username_normalize(variant)) == account_key("Alice")


def test_non_strings_and_blank_names_are_no_username():
    assert login_username_normalize(123) is None
    assert login_username_normalize(["alice"]) is None
    assert login_username_normalize(" \t\n") is None
    assert login_username_normalize("ali\x00ce") is None


def test_ipv6_addresses_count_by_their_64_and_mapped_ipv4_as_ipv4():
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_of_a_locked_name_are_refused_at_the_token_endpoint(variant, settings, make_user):
    lock_alice(settings, make_user)
    response = token_login(variant)
    assert response.status_code == 429, response.data
    assert response.data["code"] == "login_locked"


@pytest.mark.parametrize("path", ["/login/", "/admin/login/"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_of_a_locked_name_are_refused_by_the_login_forms(
    variant, path, client, settings, make_user
):
    lock_alice(settings, make_user)
    response = form_login(client, path, variant)
    assert response.status_code == 200
    assert b"Too many failed logins" in response.content
    assert "_auth_user_id" not in client.session


def test_full_width_name_logs_in_at_the_token_endpoint_as_at_the_forms(make_user):
    make_user("alice")
    assert token_login("ａｌｉｃｅ").status_code == 200


def test_the_owner_gets_in_from_another_address_while_the_attackers_is_locked(settings, make_user):
    lock_alice(settings, make_user)
    assert token_login("alice", address=OWNER).status_code == 200
    assert token_login("alice", address=ATTACKER).status_code == 429


def test_a_right_password_gives_its_reservation_back(settings, make_user):
    settings.LOGIN_LOCKOUT_THRESHOLD = 2
    settings.LOGIN_LOCKOUT_ADDRESS_THRESHOLD = 2
    settings.LOGIN_THROTTLE_THRESHOLD = 2
    make_user("alice")
    for _ in range(6):
        assert token_login("alice").status_code == 200
    assert set(LoginCounter.objects.values_list("failures", flat=True)) == {0}


def test_a_right_password_clears_its_pairs_failures(settings, make_user):
    settings.LOGIN_LOCKOUT_THRESHOLD = 3
    make_user("alice")
    for _ in range(2):
        token_login("alice", "wrong")
    assert token_login("alice").status_code == 200
    for _ in range(2):
        assert token_login("alice", "wrong").status_code == 401
    assert token_login("alice").status_code == 200


def test_malformed_login_bodies_are_400_and_check_no_password(make_user):
    make_user("alice")
    for body in (
        {"username": 123, "password": PASSWORD},
        {"username": ["alice"]},
        {"username": "  ", "password": "x"},
        ["alice", PASSWORD],
        {"username": "ali\x00ce", "password": PASSWORD},
    ):
        response = APIClient().post("/api/token/", body, format="json")
        assert response.status_code == 400, (body, response.data)
        assert isinstance(response.data["detail"], str) or response.data
    assert not UserActivity.objects.filter(action="login_failed").exists()


def test_an_account_failing_from_many_addresses_is_slowed_not_locked(settings, make_user):
    settings.LOGIN_THROTTLE_THRESHOLD = 4
    settings.LOGIN_THROTTLE_MAX_SECONDS = 30
    make_user("alice")
    assert token_login("alice", address=OWNER).status_code == 200  # a familiar address
    for n in range(4):
        assert token_login("alice", "wrong", f"192.0.2.{n + 1}").status_code == 401
    slowed = token_login("alice", address="192.0.2.200")
    assert slowed.status_code == 429
    assert slowed.data["code"] == "login_throttled"
    assert 1 <= slowed.data["retry_after"] <= 30
    # the owner at an address it logged in from is not slowed down, and its login
    # does not lengthen the delay for anyone
    delay_ends = LoginCounter.objects.get(scope="account").blocked_until
    assert token_login("alice", address=OWNER).status_code == 200
    assert LoginCounter.objects.get(scope="account").blocked_until == delay_ends
    # once the delay passed, an attempt from anywhere is checked again
    LoginCounter.objects.filter(scope="account").update(
        blocked_until=timezone.now() - timedelta(seconds=1)
    )
    assert token_login("alice", address="192.0.2.201").status_code == 200


def test_the_slow_down_doubles_up_to_its_maximum(settings, make_user):
    settings.LOGIN_THROTTLE_THRESHOLD = 1
    settings.LOGIN_THROTTLE_MAX_SECONDS = 5
    delays = []
    for n in range(6):
        attempt = login_attempt_begin(username="alice", ip_address=f"192.0.2.{n}")
        login_attempt_end(attempt, outcome="failed")
        counter = LoginCounter.objects.get(scope="account")
        delays.append(round((counter.blocked_until - timezone.now()).total_seconds()))
        counter.blocked_until = timezone.now()
        counter.save()
    assert delays == [1, 2, 4, 5, 5, 5]


def test_failures_outside_the_window_are_forgotten(settings, make_user):
    settings.LOGIN_LOCKOUT_THRESHOLD = 3
    make_user("alice")
    for _ in range(2):
        token_login("alice", "wrong")
    LoginCounter.objects.update(window_started=timezone.now() - timedelta(hours=1))
    for _ in range(2):
        assert token_login("alice", "wrong").status_code == 401
    assert token_login("alice").status_code == 200


def test_zero_thresholds_turn_the_limits_off(settings, make_user):
    settings.LOGIN_LOCKOUT_THRESHOLD = 0
    settings.LOGIN_LOCKOUT_ADDRESS_THRESHOLD = 0
    settings.LOGIN_THROTTLE_THRESHOLD = 0
    make_user("alice")
    for _ in range(30):
        token_login("alice", "wrong")
    assert token_login("alice").status_code == 200
    assert not LoginCounter.objects.exists()


def test_refusals_are_recorded_with_the_limit_that_refused(settings, make_user):
    lock_alice(settings, make_user)
    record = UserActivity.objects.get(action="login_locked")
    assert (record.username, record.details["via"], record.details["limit"]) == (
        "alice",
        "token",
        "pair",
    )


def test_a_deleted_users_refresh_token_is_401(make_user):
    user = make_user("alice")
    refresh = token_login("alice").data["refresh"]
    user.delete()
    response = APIClient().post("/api/token/refresh/", {"refresh": refresh}, format="json")
    assert response.status_code == 401
    # (deleting a user also blacklists its refresh tokens: either refusal is clear)
    assert response.data["detail"] in (
        "No active account found for the given token.",
        "Token is blacklisted",
    )


def test_a_deactivated_users_refresh_token_is_401(make_user):
    user = make_user("alice")
    refresh = token_login("alice").data["refresh"]
    user.is_active = False
    user.save()
    response = APIClient().post("/api/token/refresh/", {"refresh": refresh}, format="json")
    assert response.status_code == 401


def test_refresh_still_rotates_for_an_active_user(make_user, settings):
    settings.JWT_REFRESH_REUSE_GRACE_SECONDS = 0  # the grace: tests/test_refresh_reuse.py
    make_user("alice")
    refresh = token_login("alice").data["refresh"]
    response = APIClient().post("/api/token/refresh/", {"refresh": refresh}, format="json")
    assert response.status_code == 200
    assert response.data["refresh"] != refresh
    again = APIClient().post("/api/token/refresh/", {"refresh": refresh}, format="json")
    assert again.status_code == 401  # the old one was blacklisted
