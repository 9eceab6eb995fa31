"""User activity: what is recorded, who may read it, and lockout of failed logins."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from activity.models import LoginCounter, UserActivity
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


def token_login(client, username, password=PASSWORD):
    return client.post("/api/token/", {"username": username, "password": password}, format="json")


def test_repeated_failures_lock_the_account_and_say_so(make_user, settings):
    settings.LOGIN_LOCKOUT_THRESHOLD = 3
    make_user("alice")
    client = APIClient()
    for _ in range(3):
        assert token_login(client, "alice", "wrong").status_code == 401
    locked = token_login(client, "alice")  # even the right password is refused now
    assert locked.status_code == 429
    assert "Too many failed logins" in locked.data["detail"]
    assert int(locked["Retry-After"]) > 0
    assert UserActivity.objects.filter(action="login_locked", username="alice").exists()
    # the lock runs out
    LoginCounter.objects.update(blocked_until=timezone.now() - timedelta(seconds=1))
    assert token_login(client, "alice").status_code == 200


def test_other_accounts_are_not_locked_by_one_account(make_user, settings):
    settings.LOGIN_LOCKOUT_THRESHOLD = 2
    make_user("alice")
    make_user("bob")
    client = APIClient()
    for _ in range(2):
        token_login(client, "alice", "wrong")
    assert token_login(client, "bob").status_code == 200


def test_address_lockout(make_user, settings):
    settings.LOGIN_LOCKOUT_ADDRESS_THRESHOLD = 3
    make_user("carol")
    client = APIClient()
    for name in ("x", "y", "z"):
        token_login(client, name, "wrong")
    assert token_login(client, "carol").status_code == 429


def test_admin_login_form_says_the_account_is_locked(client, make_user, settings):
    settings.LOGIN_LOCKOUT_THRESHOLD = 2
    make_user("root", superuser=True)
    for _ in range(2):
        client.post("/admin/login/", {"username": "root", "password": "wrong"})
    response = client.post("/admin/login/", {"username": "root", "password": PASSWORD})
    assert response.status_code == 200  # the form again, not a redirect
    assert b"Too many failed logins" in response.content


def test_admin_logout_is_recorded(client, make_user):
    make_user("root", superuser=True)
    client.login(username="root", password=PASSWORD)
    client.post("/admin/logout/")
    assert UserActivity.objects.filter(username="root", action="logout").exists()


def test_activity_filters_by_time(make_user):
    make_user("boss", staff=True, perms=["activity.view_useractivity"])
    client = APIClient()
    access = token_login(client, "boss").data["access"]
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {access}")
    assert client.get("/api/activity/?since=2000-01-01T00:00:00Z").data["count"] >= 1
    assert client.get("/api/activity/?until=2000-01-01T00:00:00Z").data["count"] == 0
