"""The Django admin: every model registered, and changes made there publish events."""

from __future__ import annotations

import pytest
from django.contrib import admin

from activity.models import UserActivity
from alerts import services as alert_services
from alerts.models import Alert, AlertRule
from hosts.models import CommandExecution, Host, HostGroup, PackageOperation
from sysmanage.models import User
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, make_user):
    make_user("root", superuser=True)
    assert client.login(username="root", password=PASSWORD)
    return client


def test_every_model_is_registered():
    for model in (
        User,
        Host,
        HostGroup,
        CommandExecution,
        PackageOperation,
        Alert,
        AlertRule,
        UserActivity,
    ):
        assert admin.site.is_registered(model), model


def test_admin_pages_render(admin_client):
    for path in (
        "/admin/",
        "/admin/hosts/host/",
        "/admin/alerts/alert/",
        "/admin/activity/useractivity/",
        "/admin/hosts/commandexecution/",
        "/admin/hosts/packageoperation/",
        "/admin/sysmanage/user/",
        "/admin/hosts/host/add/",
        "/admin/hosts/hostgroup/",
        "/admin/hosts/hostgroup/add/",
        "/admin/alerts/alertrule/",
        "/admin/auth/group/",
    ):
        assert admin_client.get(path).status_code == 200, path


def test_admin_login_is_recorded(admin_client):
    assert UserActivity.objects.filter(
        username="root", action="login", details__via="session"
    ).exists()


def test_adding_a_host_in_the_admin_publishes_fleet_status(admin_client, published):
    response = published.run(
        admin_client.post, "/admin/hosts/host/add/", {"hostname": "new-host", "ip_addresses": "[]"}
    )
    assert response.status_code == 302, response.content[:2000]
    assert Host.objects.filter(hostname="new-host").exists()
    assert published.events("fleet.status_updated")[-1]["data"]["total_hosts"] == 1


def test_alert_actions_acknowledge_and_resolve(admin_client, published):
    alert = alert_services.alert_raise(severity="warning", category="cpu", title="CPU high")
    published.run(
        admin_client.post,
        "/admin/alerts/alert/",
        {"action": "acknowledge", "_selected_action": [str(alert.pk)]},
    )
    alert.refresh_from_db()
    assert alert.status == "acknowledged"
    published.run(
        admin_client.post,
        "/admin/alerts/alert/",
        {"action": "resolve", "_selected_action": [str(alert.pk)]},
    )
    alert.refresh_from_db()
    assert alert.status == "resolved"
    assert [e["data"]["action"] for e in published.events("alert.changed")] == [
        "acknowledged",
        "resolved",
    ]


def test_activity_is_read_only_in_the_admin(admin_client):
    record = UserActivity.objects.first()
    assert admin_client.get(f"/admin/activity/useractivity/{record.pk}/delete/").status_code == 403


def test_editing_a_rule_takes_effect_in_this_process(admin_client):
    from alerts import evaluation

    rule = AlertRule.objects.get(name="Disk usage")
    response = admin_client.post(
        f"/admin/alerts/alertrule/{rule.pk}/change/",
        {
            "name": rule.name,
            "metric": rule.metric,
            "category": rule.category,
            "enabled": "on",
            "warning_threshold": "70",
            "critical_threshold": "90",
            "sustained_samples": "1",
            "clear_margin": "3",
        },
    )
    assert response.status_code == 302, response.content[:2000]
    disk = next(r for r in evaluation.ENGINE.rules if r.name == "Disk usage")
    assert (disk.warning, disk.critical) == (70.0, 90.0)


def test_rotating_a_token_in_the_admin_shows_it_once(
    admin_client, django_capture_on_commit_callbacks
):
    from hosts import services

    host, old = services.host_register(hostname="web-01")
    response = admin_client.post(
        "/admin/hosts/host/",
        {"action": "rotate_token", "_selected_action": [str(host.pk)]},
        follow=True,
    )
    assert b"New agent token for web-01" in response.content
    host.refresh_from_db()
    assert host.token_hash
    assert old not in response.content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post(
            "/admin/hosts/host/", {"action": "revoke_token", "_selected_action": [str(host.pk)]}
        )
    host.refresh_from_db()
    assert host.token_hash == ""
    assert UserActivity.objects.filter(action="host_token_revoked", username="root").exists()


def test_command_and_operation_pages_show_outputs_read_lazily(admin_client):
    from hosts import services as host_services

    host = host_services.host_create(hostname="web-01")
    execution = host_services.command_create(host=host, command="uptime", timeout=5, user=None)
    host_services.command_finish(
        execution=execution, status="completed", exit_code=0, stdout="lazy-output"
    )
    assert admin_client.get("/admin/hosts/commandexecution/").status_code == 200
    page = admin_client.get(f"/admin/hosts/commandexecution/{execution.id}/change/")
    assert b"lazy-output" in page.content


def test_login_counters_can_be_deleted_to_lift_a_lock(admin_client):
    from activity.lockout import login_attempt_begin
    from activity.models import LoginCounter

    login_attempt_begin(username="alice", ip_address="192.0.2.1")
    counter = LoginCounter.objects.get(scope="pair")
    assert admin_client.get("/admin/activity/logincounter/").status_code == 200
    admin_client.post(f"/admin/activity/logincounter/{counter.pk}/delete/", {"post": "yes"})
    assert not LoginCounter.objects.filter(scope="pair").exists()
