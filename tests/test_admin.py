"""The Django admin: every model registered, and changes made there publish events."""
from __future__ import annotations

import pytest
from django.contrib import admin

from activity.models import UserActivity
from alerts import services as alert_services
from alerts.models import Alert
from hosts.models import CommandExecution, Host, PackageOperation
from sysmanage.models import User
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, make_user):
    make_user("root", superuser=True)
    assert client.login(username="root", password=PASSWORD)
    return client


def test_every_model_is_registered():
    for model in (User, Host, CommandExecution, PackageOperation, Alert, UserActivity):
        assert admin.site.is_registered(model), model


def test_admin_pages_render(admin_client):
    for path in ("/admin/", "/admin/hosts/host/", "/admin/alerts/alert/",
                 "/admin/activity/useractivity/", "/admin/hosts/commandexecution/",
                 "/admin/hosts/packageoperation/", "/admin/sysmanage/user/",
                 "/admin/hosts/host/add/"):
        assert admin_client.get(path).status_code == 200, path


def test_admin_login_is_recorded(admin_client):
    assert UserActivity.objects.filter(username="root", action="login",
                                       details__via="session").exists()


def test_adding_a_host_in_the_admin_publishes_fleet_status(admin_client, published):
    response = published.run(admin_client.post, "/admin/hosts/host/add/", {
        "hostname": "new-host", "ip_addresses": "[]"})
    assert response.status_code == 302, response.content[:2000]
    assert Host.objects.filter(hostname="new-host").exists()
    assert published.events("fleet.status_updated")[-1]["data"]["total_hosts"] == 1


def test_alert_actions_acknowledge_and_resolve(admin_client, published):
    alert = alert_services.alert_raise(severity="warning", category="cpu", title="CPU high")
    published.run(admin_client.post, "/admin/alerts/alert/", {
        "action": "acknowledge", "_selected_action": [str(alert.pk)]})
    alert.refresh_from_db()
    assert alert.status == "acknowledged"
    published.run(admin_client.post, "/admin/alerts/alert/", {
        "action": "resolve", "_selected_action": [str(alert.pk)]})
    alert.refresh_from_db()
    assert alert.status == "resolved"
    assert [e["data"]["action"] for e in published.events("alert.changed")] == \
        ["acknowledged", "resolved"]


def test_activity_is_read_only_in_the_admin(admin_client):
    record = UserActivity.objects.first()
    assert admin_client.get(f"/admin/activity/useractivity/{record.pk}/delete/").status_code \
        == 403
