"""One permission path: the REST API and the admin ask the same model permission for
each change, the staff flag alone grants nothing, superusers pass."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from alerts import services as alert_services
from alerts.models import Alert, AlertStatus
from hosts import services as host_services
from hosts.models import AgentKind, Host, HostGroup, RegistrationKey
from hosts.smagent import enrollment
from sysmanage import permissions
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


def rest_as(username: str) -> APIClient:
    client = APIClient()
    response = client.post(
        "/api/token/", {"username": username, "password": PASSWORD}, format="json"
    )
    assert response.status_code == 200, response.content
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {response.data['access']}")
    return client


def _pending_registration() -> str:
    from tests.test_sysmanage_agent_server import submit

    return submit(f"new-{Host.objects.count()}-{RegistrationKey.objects.count()}").body["id"]


def _key() -> str:
    key, _ = enrollment.key_create(name="k", max_uses=None, expires_at=None)
    return str(key.id)


def _alert() -> str:
    return str(alert_services.alert_raise(severity="info", category="x", title="t").id)


def _sysmanage_host() -> str:
    host = host_services.host_create(
        hostname=f"sm-{Host.objects.count()}", agent_kind=AgentKind.SYSMANAGE
    )
    return str(host.id)


#: name -> (permission, builds the path, body, the status a holder gets)
WRITES: dict[str, tuple[str, Any, dict[str, Any] | None, int]] = {
    "create-registration-key": (
        "hosts.add_registrationkey",
        lambda: "/api/registration-keys/",
        {"name": "rollout"},
        201,
    ),
    "revoke-registration-key": (
        "hosts.change_registrationkey",
        lambda: f"/api/registration-keys/{_key()}/revoke/",
        None,
        200,
    ),
    "create-host-group": (
        "hosts.change_hostgroup",
        lambda: "/api/host-groups/",
        {"name": "web"},
        201,
    ),
    "approve-registration": (
        "hosts.change_agentregistration",
        lambda: f"/api/registrations/{_pending_registration()}/approve/",
        None,
        200,
    ),
    "reject-registration": (
        "hosts.change_agentregistration",
        lambda: f"/api/registrations/{_pending_registration()}/reject/",
        None,
        200,
    ),
    "allow-reregistration": (
        "hosts.change_host",
        lambda: f"/api/hosts/{_sysmanage_host()}/allow-reregistration/",
        None,
        200,
    ),
    "raise-alert": (
        "alerts.add_alert",
        lambda: "/api/alerts/",
        {"severity": "info", "category": "x", "title": "by hand"},
        201,
    ),
    "acknowledge-alert": (
        "alerts.change_alert",
        lambda: f"/api/alerts/{_alert()}/acknowledge/",
        None,
        200,
    ),
    "resolve-alert": ("alerts.change_alert", lambda: f"/api/alerts/{_alert()}/resolve/", None, 200),
}


@pytest.mark.parametrize("name", sorted(WRITES))
def test_staff_without_the_model_permission_gets_403_and_nothing_changes(make_user, name):
    perm, path, body, _ = WRITES[name]
    make_user("clerk", staff=True)
    target = path()
    before = (
        RegistrationKey.objects.filter(revoked_at=None).count(),
        Alert.objects.filter(status=AlertStatus.OPEN).count(),
        sorted(Host.objects.values_list("reregistration_allowed_until", flat=True), key=str),
        HostGroup.objects.count(),
    )
    response = rest_as("clerk").post(target, body, format="json")
    assert response.status_code == 403, response.content
    assert perm in response.data["detail"]
    assert before == (
        RegistrationKey.objects.filter(revoked_at=None).count(),
        Alert.objects.filter(status=AlertStatus.OPEN).count(),
        sorted(Host.objects.values_list("reregistration_allowed_until", flat=True), key=str),
        HostGroup.objects.count(),
    )


@pytest.mark.parametrize("name", sorted(WRITES))
def test_the_model_permission_allows_the_write(make_user, name):
    perm, path, body, status = WRITES[name]
    staff = perm.startswith("hosts.")  # the server's own set-up needs staff, as the admin
    make_user("holder", staff=staff, perms=[perm])
    response = rest_as("holder").post(path(), body, format="json")
    assert response.status_code == status, response.content


@pytest.mark.parametrize("name", sorted(WRITES))
def test_superusers_pass(make_user, name):
    _, path, body, status = WRITES[name]
    make_user("root", superuser=True)
    assert rest_as("root").post(path(), body, format="json").status_code == status


def test_set_up_rights_need_staff_as_in_the_admin(make_user):
    make_user("outsider", perms=["hosts.add_registrationkey"])
    response = rest_as("outsider").post("/api/registration-keys/", {"name": "k"}, format="json")
    assert response.status_code == 403
    assert "staff status" in response.data["detail"]


@pytest.mark.parametrize(
    ("path", "perm"),
    [
        ("/api/registrations/", "hosts.view_agentregistration"),
        ("/api/registration-keys/", "hosts.view_registrationkey"),
        ("/api/activity/", "activity.view_useractivity"),
    ],
)
def test_staff_reads_need_the_view_permission(make_user, path, perm):
    make_user("clerk", staff=True)
    make_user("reader", staff=True, perms=[perm])
    assert rest_as("clerk").get(path).status_code == 403
    assert rest_as("reader").get(path).status_code == 200


def test_anonymous_requests_get_401_not_403():
    assert APIClient().post("/api/registration-keys/", {"name": "k"}).status_code == 401
    assert APIClient().get("/api/registrations/").status_code == 401


# -- the admin asks the same functions ---------------------------------------------------


def admin_as(client, make_user, *perms: str):
    make_user("clerk", staff=True, perms=perms)
    assert client.login(username="clerk", password=PASSWORD)
    return client


def test_admin_host_token_actions_need_the_change_permission(client, make_user):
    host, _ = host_services.host_register(hostname="web-01")
    digest = Host.objects.get(pk=host.pk).token_hash
    clerk = admin_as(client, make_user, "hosts.view_host")
    page = clerk.get("/admin/hosts/host/")
    assert page.status_code == 200
    assert b"rotate_token" not in page.content
    assert b"revoke_token" not in page.content
    clerk.post("/admin/hosts/host/", {"action": "revoke_token", "_selected_action": [str(host.pk)]})
    assert Host.objects.get(pk=host.pk).token_hash == digest
    client.logout()
    make_user("keeper", staff=True, perms=["hosts.view_host", "hosts.change_host"])
    assert client.login(username="keeper", password=PASSWORD)
    assert b"revoke_token" in client.get("/admin/hosts/host/").content
    client.post(
        "/admin/hosts/host/", {"action": "revoke_token", "_selected_action": [str(host.pk)]}
    )
    assert Host.objects.get(pk=host.pk).token_hash == ""


def test_admin_alert_actions_need_the_change_permission(client, make_user, published):
    alert = alert_services.alert_raise(severity="warning", category="cpu", title="CPU")
    clerk = admin_as(client, make_user, "alerts.view_alert")
    assert b'value="acknowledge"' not in clerk.get("/admin/alerts/alert/").content
    clerk.post(
        "/admin/alerts/alert/", {"action": "acknowledge", "_selected_action": [str(alert.pk)]}
    )
    assert Alert.objects.get(pk=alert.pk).status == AlertStatus.OPEN
    assert clerk.get("/admin/alerts/alert/add/").status_code == 403


def test_admin_registration_decisions_need_the_change_permission(client, make_user):
    pending = _pending_registration()
    clerk = admin_as(client, make_user, "hosts.view_agentregistration")
    page = clerk.get("/admin/hosts/agentregistration/")
    assert page.status_code == 200
    assert b'value="approve"' not in page.content
    clerk.post(
        "/admin/hosts/agentregistration/", {"action": "approve", "_selected_action": [pending]}
    )
    assert not Host.objects.filter(pk=pending).exists()


def test_admin_registration_keys_need_the_add_permission(client, make_user):
    clerk = admin_as(client, make_user, "hosts.view_registrationkey")
    assert clerk.get("/admin/hosts/registrationkey/").status_code == 200
    assert clerk.get("/admin/hosts/registrationkey/add/").status_code == 403


def test_admin_host_groups_need_the_change_permission(client, make_user):
    group = host_services.host_group_create(name="web")
    clerk = admin_as(client, make_user, "hosts.view_hostgroup", "hosts.add_hostgroup")
    assert clerk.get("/admin/hosts/hostgroup/").status_code == 200
    # Adding asks the same right as the REST API: hosts.change_hostgroup.
    assert clerk.get("/admin/hosts/hostgroup/add/").status_code == 403
    clerk.post(f"/admin/hosts/hostgroup/{group.pk}/change/", {"name": "renamed"})
    assert HostGroup.objects.get().name == "web"


def test_admin_activity_log_needs_the_view_permission(client, make_user):
    clerk = admin_as(client, make_user)
    assert clerk.get("/admin/activity/useractivity/").status_code == 403


# -- the rules themselves --------------------------------------------------------------------


def test_every_right_names_existing_permissions():
    from django.contrib.auth.models import Permission

    known = {
        f"{app}.{code}"
        for app, code in Permission.objects.values_list("content_type__app_label", "codename")
    }
    for name, right in permissions.RIGHTS.items():
        assert set(right.permissions) <= known, name


def test_staff_flag_alone_holds_no_right(make_user):
    clerk = make_user("clerk", staff=True)
    assert not any(permissions.holds(clerk, right) for right in permissions.RIGHTS)
    root = make_user("root", superuser=True)
    assert all(permissions.holds(root, right) for right in permissions.RIGHTS)
    root.is_active = False
    assert not any(permissions.holds(root, right) for right in permissions.RIGHTS)


def test_sockets_share_one_set_of_rights_per_answer(make_user):
    first = make_user("first", staff=True, perms=["activity.view_useractivity"])
    second = make_user("second", staff=True, perms=["activity.view_useractivity"])
    rights = permissions.socket_rights(first)
    assert rights == {"view_activity"}
    assert permissions.socket_rights(second) is rights


def test_a_socket_keeps_its_user_without_the_permission_cache(make_user, token_for):
    from sysmanage.auth import token_credentials

    user = make_user("watcher", staff=True, perms=["activity.view_useractivity", "hosts.view_host"])
    credentials = token_credentials(token_for(user), "query")
    assert credentials.rights == {"view_activity", "view_fleet_metrics"}
    held = credentials.user
    assert held is not None
    assert not {"_perm_cache", "_user_perm_cache", "_group_perm_cache"} & set(vars(held))
    # asking again still answers (Django reads the permissions anew)
    assert held.has_perm("hosts.view_host")
