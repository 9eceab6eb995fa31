"""The REST API: tokens (with activity), hosts, alerts, activity, commands, schema."""

from __future__ import annotations

import sqlite3

import pytest
from rest_framework.test import APIClient

from activity.models import UserActivity
from alerts import services as alert_services
from alerts.models import Alert, AlertStatus
from hosts import services as host_services
from sysmanage.protocol import iso
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


@pytest.fixture
def client():
    return APIClient()


def login(client, username):
    response = client.post(
        "/api/token/",
        {"username": username, "password": PASSWORD},
        format="json",
        HTTP_USER_AGENT="pytest-agent",
    )
    assert response.status_code == 200, response.content
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {response.data['access']}")
    return response.data


def test_token_login_is_recorded(client, make_user, published):
    make_user("alice")
    tokens = published.run(login, client, "alice")
    assert set(tokens) == {"access", "refresh"}
    record = UserActivity.objects.get(action="login")
    assert (record.username, record.ip_address, record.user_agent) == (
        "alice",
        "127.0.0.1",
        "pytest-agent",
    )
    assert record.details == {"via": "token"}
    assert published.events("user.activity")[0]["data"]["action"] == "login"


def test_failed_login_is_recorded_and_refused(client, make_user):
    make_user("alice")
    response = client.post("/api/token/", {"username": "alice", "password": "wrong"}, format="json")
    assert response.status_code == 401
    assert UserActivity.objects.filter(action="login_failed", username="alice").count() == 1


def test_refresh_and_logout(client, make_user):
    make_user("alice")
    tokens = login(client, "alice")
    refreshed = client.post("/api/token/refresh/", {"refresh": tokens["refresh"]}, format="json")
    assert refreshed.status_code == 200
    assert "access" in refreshed.data
    response = client.post(
        "/api/token/logout/", {"refresh": refreshed.data["refresh"]}, format="json"
    )
    assert response.status_code == 200
    assert UserActivity.objects.filter(action="logout", username="alice").exists()
    again = client.post(
        "/api/token/refresh/", {"refresh": refreshed.data["refresh"]}, format="json"
    )
    assert again.status_code == 401


def test_everything_needs_authentication(client):
    for path in (
        "/api/hosts/",
        "/api/alerts/",
        "/api/activity/",
        "/api/commands/",
        "/api/package-operations/",
    ):
        assert client.get(path).status_code == 401, path


def test_hosts_list_and_search(client, make_user):
    make_user("viewer")
    login(client, "viewer")
    host_services.host_create(hostname="web-01", fqdn="web-01.example.com")
    host_services.host_create(hostname="db-01")
    names = [h["hostname"] for h in client.get("/api/hosts/").data["results"]]
    assert names == ["db-01", "web-01"]
    found = client.get("/api/hosts/?search=example").data["results"]
    assert [h["hostname"] for h in found] == ["web-01"]
    assert client.post("/api/hosts/", {"hostname": "x"}).status_code == 405


def test_alerts_raise_acknowledge_resolve(client, make_user, published):
    make_user("ops", perms=["alerts.add_alert", "alerts.change_alert"])
    login(client, "ops")
    host = host_services.host_create(hostname="web-01")
    response = published.run(
        client.post,
        "/api/alerts/",
        {
            "severity": "critical",
            "category": "disk_space",
            "title": "Disk full",
            "message": "/ is 99%",
            "host": str(host.id),
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    alert_id = response.data["id"]
    assert response.data["hostname"] == "web-01"
    ack = published.run(client.post, f"/api/alerts/{alert_id}/acknowledge/")
    assert ack.status_code == 200
    assert ack.data["status"] == "acknowledged"
    assert client.post(f"/api/alerts/{alert_id}/acknowledge/").status_code == 409
    resolved = published.run(client.post, f"/api/alerts/{alert_id}/resolve/")
    assert resolved.data["status"] == "resolved"
    assert Alert.objects.get(id=alert_id).status == AlertStatus.RESOLVED
    assert [e["data"]["action"] for e in published.events("alert.changed")] == [
        "raised",
        "acknowledged",
        "resolved",
    ]
    critical = client.get("/api/alerts/?severity=critical&status=resolved").data["results"]
    assert [a["id"] for a in critical] == [alert_id]


def test_alert_changes_need_permission(client, make_user):
    make_user("viewer")
    login(client, "viewer")
    alert = alert_services.alert_raise(severity="info", category="x", title="t")
    assert client.post(f"/api/alerts/{alert.id}/acknowledge/").status_code == 403
    assert (
        client.post(
            "/api/alerts/", {"severity": "info", "category": "x", "title": "t"}, format="json"
        ).status_code
        == 403
    )
    assert client.get("/api/alerts/").data["count"] == 1


def test_activity_is_staff_only_and_filterable(client, make_user):
    make_user("viewer")
    make_user("clerk", staff=True)
    make_user("boss", staff=True, perms=["activity.view_useractivity"])
    login(client, "viewer")
    assert client.get("/api/activity/").status_code == 403
    login(client, "clerk")  # the staff flag alone is not the admin's view permission
    assert client.get("/api/activity/").status_code == 403
    login(client, "boss")
    logins = client.get("/api/activity/?action=login").data["results"]
    assert {r["username"] for r in logins} == {"viewer", "clerk", "boss"}
    assert [
        r["username"] for r in client.get("/api/activity/?username=viewer").data["results"]
    ] == ["viewer"]


def test_commands_and_package_operations_are_listed(client, make_user):
    user = make_user("ops", superuser=True)
    login(client, "ops")
    host = host_services.host_create(hostname="web-01")
    host_services.command_create(host=host, command="uptime", timeout=5, user=user)
    host_services.package_operation_create(
        host=host, operation="install", package="nginx", user=user
    )
    commands = client.get(f"/api/commands/?host={host.id}").data["results"]
    assert [(c["command"], c["requested_by"], c["hostname"]) for c in commands] == [
        ("uptime", "ops", "web-01")
    ]
    operations = client.get("/api/package-operations/?status=pending").data["results"]
    assert [(o["operation"], o["package"]) for o in operations] == [("install", "nginx")]


def test_schema_is_served(client, make_user):
    make_user("viewer")
    login(client, "viewer")
    response = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    import json

    paths = json.loads(response.content)["paths"]
    for path in (
        "/api/hosts/",
        "/api/alerts/{id}/acknowledge/",
        "/api/activity/",
        "/api/commands/",
        "/api/package-operations/",
        "/api/host-groups/",
        "/api/host-groups/{id}/",
        "/api/token/",
    ):
        assert path in paths, path


def test_a_refresh_that_fails_to_record_its_new_token_does_not_spend_the_old_one(
    client, make_user, monkeypatch
):
    from django.db import OperationalError
    from rest_framework_simplejwt.token_blacklist.models import OutstandingToken

    make_user("alice")
    tokens = login(client, "alice")
    real_create = OutstandingToken.objects.create

    def busy(**kwargs):
        # as Django's wrapper raises SQLite's error when the lock outlasts the timeout
        raise OperationalError("database is locked") from sqlite3.OperationalError(
            "database is locked"
        )

    # the new refresh token's record is the refresh's last write (credentials._rotate)
    monkeypatch.setattr(OutstandingToken.objects, "create", busy)
    client.raise_request_exception = False
    failed = client.post("/api/token/refresh/", {"refresh": tokens["refresh"]}, format="json")
    assert failed.status_code == 503  # busy: retry
    assert failed["Retry-After"]
    monkeypatch.setattr(OutstandingToken.objects, "create", real_create)
    retried = client.post("/api/token/refresh/", {"refresh": tokens["refresh"]}, format="json")
    assert retried.status_code == 200, retried.data  # the client is not logged out for good


def _metric_minutes(host, *minutes):
    """One stored metrics minute per datetime, its CPU the minute of the hour."""
    from hosts.models import MetricSample

    for minute in minutes:
        MetricSample.objects.create(host=host, minute=minute, samples=6, cpu_usage=minute.minute)


def test_metrics_history_of_the_last_minutes(client, make_user):
    from datetime import timedelta

    from django.utils import timezone

    make_user("viewer")
    login(client, "viewer")
    host = host_services.host_create(hostname="web-01")
    now = timezone.now().replace(second=0, microsecond=0)
    _metric_minutes(host, now - timedelta(minutes=90), now - timedelta(minutes=5), now)
    answer = client.get(f"/api/hosts/{host.pk}/metrics/").data
    assert (answer["minutes"], answer["until"]) == (60, None)
    assert [s["cpu_usage"] for s in answer["samples"]] == [
        (now - timedelta(minutes=5)).minute,
        now.minute,
    ]
    wider = client.get(f"/api/hosts/{host.pk}/metrics/?minutes=120").data
    assert len(wider["samples"]) == 3
    bad = client.get(f"/api/hosts/{host.pk}/metrics/?minutes=soon")
    assert (bad.status_code, bad.data) == (400, {"detail": "minutes must be an integer"})


def test_metrics_history_between_two_times(client, make_user):
    """``since``/``until`` give the minutes that overlap a gap (a page back-filling its
    charts after a reconnect): from the minute holding ``since`` to the one holding ``until``."""
    from datetime import timedelta

    from django.utils import timezone

    make_user("viewer")
    login(client, "viewer")
    host = host_services.host_create(hostname="web-01")
    start = timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=30)
    _metric_minutes(host, *(start + timedelta(minutes=n) for n in range(10)))
    since = (start + timedelta(minutes=2, seconds=40)).isoformat()
    until = (start + timedelta(minutes=5, seconds=10)).isoformat()
    answer = client.get(f"/api/hosts/{host.pk}/metrics/", {"since": since, "until": until}).data
    assert [s["minute"] for s in answer["samples"]] == [
        iso(start + timedelta(minutes=n)) for n in (2, 3, 4, 5)
    ]
    assert (answer["minutes"], answer["since"]) == (None, iso(start + timedelta(minutes=2)))
    assert answer["until"] == iso(start + timedelta(minutes=5, seconds=10))
    open_ended = client.get(f"/api/hosts/{host.pk}/metrics/", {"since": since}).data
    assert len(open_ended["samples"]) == 8


def test_metrics_history_range_is_checked_and_bounded(client, make_user):
    from datetime import timedelta

    from django.utils import timezone

    make_user("viewer")
    login(client, "viewer")
    host = host_services.host_create(hostname="web-01")
    now = timezone.now().replace(second=0, microsecond=0)
    _metric_minutes(host, now - timedelta(days=8), now - timedelta(days=6))
    url = f"/api/hosts/{host.pk}/metrics/"
    bad = client.get(url, {"since": "yesterday"})
    assert bad.status_code == 400
    assert bad.data["detail"].startswith("Invalid query parameters: since: ")
    reversed_range = client.get(
        url, {"since": now.isoformat(), "until": (now - timedelta(hours=1)).isoformat()}
    )
    assert reversed_range.status_code == 400
    assert "since must not be after until" in reversed_range.data["detail"]
    old = client.get(url, {"since": (now - timedelta(days=30)).isoformat()}).data
    assert len(old["samples"]) == 1  # a week back at most
