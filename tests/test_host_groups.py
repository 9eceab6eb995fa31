"""Host groups: the services (and what they record), the REST API, enrollment into groups
on the command line and with registration keys, the pages and the admin."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command
from django.db import IntegrityError, transaction
from rest_framework.test import APIClient

from activity.models import UserActivity
from hosts import selectors
from hosts import services as host_services
from hosts.models import Host, HostGroup, RegistrationKey
from hosts.smagent import enrollment
from sysmanage import permissions
from sysmanage.audit import Actor
from tests.conftest import PASSWORD
from tests.test_sysmanage_agent_server import submit

pytestmark = pytest.mark.django_db

MANAGER_PERMS = ["hosts.change_hostgroup"]


@pytest.fixture
def recorded(django_capture_on_commit_callbacks):
    """Run a call with its on-commit callbacks (the audit records); return its result."""

    def run(fn, *args, **kwargs):
        with django_capture_on_commit_callbacks(execute=True):
            return fn(*args, **kwargs)

    return run


def audit_of(action: str) -> list[dict]:
    return list(
        UserActivity.objects.filter(action=action)
        .order_by("timestamp")
        .values_list("details", flat=True)
    )


def rest(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def hosts():
    return [host_services.host_create(hostname=name) for name in ("web-01", "web-02", "db-01")]


# -- model and services --------------------------------------------------------------------


def test_group_names_are_unique_without_regard_to_case():
    host_services.host_group_create(name="Web")
    with pytest.raises(ValueError, match="exists already"):
        host_services.host_group_create(name=" web ")
    with pytest.raises(IntegrityError), transaction.atomic():
        HostGroup.objects.create(name="WEB")  # the database says so too
    with pytest.raises(ValueError, match="needs a name"):
        host_services.host_group_create(name="  ")


def test_create_rename_delete_are_recorded_and_hosts_stay(recorded, hosts):
    actor = Actor(username="alice")
    group = recorded(host_services.host_group_create, name="web", actor=actor)
    recorded(
        host_services.host_group_update,
        group_id=group.pk,
        name="frontend",
        description="serves",
        actor=actor,
    )
    recorded(host_services.host_group_update, group_id=group.pk, name="frontend", actor=actor)
    recorded(host_services.host_group_set_hosts, group_id=group.pk, host_ids=[hosts[0].pk])
    recorded(host_services.host_group_delete, group_id=group.pk, actor=actor)
    assert audit_of("host_group_created") == [{"group_id": str(group.pk), "group": "web"}]
    # Saving what is there already records nothing.
    assert audit_of("host_group_changed") == [
        {"group_id": str(group.pk), "group": "frontend", "renamed_from": "web"}
    ]
    assert audit_of("host_group_deleted") == [
        {"group_id": str(group.pk), "group": "frontend", "hosts": 1}
    ]
    assert Host.objects.count() == 3
    assert UserActivity.objects.get(action="host_group_created").username == "alice"


def test_setting_the_hosts_of_a_group(recorded, hosts):
    actor = Actor(username="alice")
    group = host_services.host_group_create(name="web")
    recorded(
        host_services.host_group_set_hosts,
        group_id=group.pk,
        host_ids=[hosts[0].pk, hosts[1].pk],
        actor=actor,
    )
    recorded(
        host_services.host_group_set_hosts,
        group_id=group.pk,
        host_ids=[str(hosts[1].pk), str(hosts[2].pk)],
        actor=actor,
    )
    assert set(group.hosts.values_list("hostname", flat=True)) == {"web-02", "db-01"}
    assert [
        {k: v for k, v in d.items() if k != "group_id"}
        for d in audit_of("host_group_members_changed")
    ] == [
        {"group": "web", "added": "web-01, web-02", "hosts": 2},
        {"group": "web", "added": "db-01", "removed": "web-01", "hosts": 2},
    ]
    with pytest.raises(ValueError, match="No host with id"):
        host_services.host_group_set_hosts(
            group_id=group.pk, host_ids=["00000000-0000-0000-0000-000000000000"]
        )
    assert group.hosts.count() == 2


def test_a_hosts_groups_replaced_or_added_to(recorded, hosts):
    web, db, prod = (host_services.host_group_create(name=n) for n in ("web", "db", "prod"))
    host = hosts[0]
    recorded(host_services.host_set_groups, host_id=host.pk, groups=[web, prod], actor=Actor())
    recorded(host_services.host_set_groups, host_id=host.pk, groups=[db], keep=True, actor=Actor())
    assert set(host.groups.values_list("name", flat=True)) == {"web", "db", "prod"}
    recorded(host_services.host_set_groups, host_id=host.pk, groups=[db], actor=Actor())
    assert list(host.groups.values_list("name", flat=True)) == ["db"]
    assert [d["removed"] for d in audit_of("host_groups_changed") if "removed" in d] == [
        "prod, web"
    ]


def test_groups_ensured_by_name_are_created_once():
    host_services.host_group_create(name="Web")
    groups, created = host_services.host_groups_ensure(names=["web", "edge", "EDGE", "Web"])
    assert [g.name for g in groups] == ["Web", "edge"]
    assert created == ["edge"]
    assert HostGroup.objects.count() == 2


def test_host_list_filters_by_group_in_any_case(hosts):
    group = host_services.host_group_create(name="Web")
    host_services.host_group_set_hosts(group_id=group.pk, host_ids=[h.pk for h in hosts[:2]])
    assert [h.hostname for h in selectors.host_list(group="WEB")] == ["web-01", "web-02"]
    assert list(selectors.host_list(group="nothing")) == []
    assert [h.hostname for h in selectors.host_list(group="web", search="02")] == ["web-02"]


def test_a_key_with_groups_puts_registering_hosts_in_them(recorded):
    edge = host_services.host_group_create(name="edge")
    key, secret = recorded(
        enrollment.key_create, name="rollout", groups=[edge], actor=Actor(username="a")
    )
    assert audit_of("registration_key_created")[0]["groups"] == "edge"
    outcome = submit("edge-01", key=secret)
    assert outcome.body["approved"] is True
    assert list(Host.objects.get(pk=outcome.body["id"]).groups.all()) == [edge]
    # Later changes of the key's groups apply to the hosts that register from then on.
    web = host_services.host_group_create(name="web")
    recorded(enrollment.key_set_groups, key_id=key.pk, groups=[web], actor=Actor(username="a"))
    assert audit_of("registration_key_changed")[0]["groups"] == "web"
    later = submit("edge-02", key=secret, address="192.0.2.8")
    assert list(Host.objects.get(pk=later.body["id"]).groups.all()) == [web]
    assert list(Host.objects.get(pk=outcome.body["id"]).groups.all()) == [edge]


def test_a_waiting_registration_approved_without_a_key_joins_no_group():
    host_services.host_group_create(name="edge")
    waiting = submit("plain-01")
    host = enrollment.registration_approve(registration_id=waiting.body["id"])
    assert host.groups.count() == 0


# -- the right -----------------------------------------------------------------------------------


def test_managing_groups_needs_staff_and_the_permission(make_user):
    assert not permissions.can_manage_host_groups(make_user("clerk", staff=True))
    assert not permissions.can_manage_host_groups(make_user("outsider", perms=MANAGER_PERMS))
    assert permissions.can_manage_host_groups(make_user("keeper", staff=True, perms=MANAGER_PERMS))


# -- REST ----------------------------------------------------------------------------------------


def test_every_user_lists_and_reads_groups_and_host_groups(make_user, hosts):
    group = host_services.host_group_create(name="web", description="front ends")
    host_services.host_group_set_hosts(group_id=group.pk, host_ids=[hosts[0].pk])
    viewer = rest(make_user("viewer"))
    listing = viewer.get("/api/host-groups/")
    assert listing.status_code == 200
    assert listing.data["results"][0] | {"created_at": None} == {
        "id": str(group.pk),
        "name": "web",
        "description": "front ends",
        "host_count": 1,
        "created_at": None,
    }
    one = viewer.get(f"/api/host-groups/{group.pk}/")
    assert one.data["hosts"] == [str(hosts[0].pk)]
    host = viewer.get(f"/api/hosts/{hosts[0].pk}/")
    assert host.data["groups"] == [{"id": str(group.pk), "name": "web"}]
    assert viewer.get(f"/api/hosts/{hosts[1].pk}/").data["groups"] == []
    filtered = viewer.get("/api/hosts/?group=WEB")
    assert [h["hostname"] for h in filtered.data["results"]] == ["web-01"]
    assert viewer.get("/api/hosts/?group=none").data["results"] == []
    assert APIClient().get("/api/host-groups/").status_code == 401


@pytest.mark.parametrize(
    ("staff", "perms"), [(False, []), (True, []), (False, MANAGER_PERMS)], ids=str
)
def test_changes_without_the_right_get_403_and_change_nothing(make_user, hosts, staff, perms):
    group = host_services.host_group_create(name="web")
    client = rest(make_user("clerk", staff=staff, perms=perms))
    for method, path, body in (
        ("post", "/api/host-groups/", {"name": "new"}),
        ("patch", f"/api/host-groups/{group.pk}/", {"name": "renamed"}),
        ("put", f"/api/host-groups/{group.pk}/", {"name": "renamed", "hosts": []}),
        ("patch", f"/api/host-groups/{group.pk}/", {"hosts": [str(hosts[0].pk)]}),
        ("delete", f"/api/host-groups/{group.pk}/", None),
    ):
        response = getattr(client, method)(path, body, format="json")
        assert response.status_code == 403, (method, path, response.content)
        assert "hosts.change_hostgroup" in response.data["detail"]
    assert [(g.name, g.hosts.count()) for g in HostGroup.objects.all()] == [("web", 0)]


def test_changes_with_the_right(make_user, hosts, django_capture_on_commit_callbacks):
    client = rest(make_user("keeper", staff=True, perms=MANAGER_PERMS))
    with django_capture_on_commit_callbacks(execute=True):
        created = client.post(
            "/api/host-groups/",
            {"name": "web", "description": "front", "hosts": [str(hosts[0].pk)]},
            format="json",
        )
    assert created.status_code == 201, created.content
    assert created.data["hosts"] == [str(hosts[0].pk)]
    assert created.data["host_count"] == 1
    path = f"/api/host-groups/{created.data['id']}/"
    with django_capture_on_commit_callbacks(execute=True):
        members = client.patch(path, {"hosts": [str(hosts[1].pk), str(hosts[2].pk)]}, format="json")
    assert sorted(members.data["hosts"]) == sorted([str(hosts[1].pk), str(hosts[2].pk)])
    assert members.data["name"] == "web"
    renamed = client.put(path, {"name": "frontend", "description": ""}, format="json")
    assert renamed.status_code == 200
    assert renamed.data["host_count"] == 2
    with django_capture_on_commit_callbacks(execute=True):
        assert client.delete(path).status_code == 204
    assert HostGroup.objects.count() == 0
    assert Host.objects.count() == 3
    records = UserActivity.objects.filter(username="keeper")
    assert set(records.values_list("action", flat=True)) == {
        "host_group_created",
        "host_group_members_changed",
        "host_group_deleted",
    }
    assert all(r.ip_address == "127.0.0.1" for r in records)


def test_bad_group_writes_get_400_with_a_detail(make_user):
    host_services.host_group_create(name="Web")
    client = rest(make_user("keeper", staff=True, perms=MANAGER_PERMS))
    taken = client.post("/api/host-groups/", {"name": "WEB"}, format="json")
    assert taken.status_code == 400
    assert "exists already" in taken.data["detail"]
    unknown = client.post(
        "/api/host-groups/",
        {"name": "new", "hosts": ["00000000-0000-0000-0000-000000000000"]},
        format="json",
    )
    assert unknown.status_code == 400
    assert "No host with id" in unknown.data["detail"]
    assert not HostGroup.objects.filter(name="new").exists()  # nothing half made
    garbage = client.post("/api/host-groups/", {"name": "x", "hosts": ["nope"]}, format="json")
    assert garbage.status_code == 400
    assert garbage.data["detail"]


def test_registration_keys_created_over_rest_name_existing_groups(make_user):
    host_services.host_group_create(name="Edge")
    client = rest(make_user("keeper", staff=True, perms=["hosts.add_registrationkey"]))
    made = client.post("/api/registration-keys/", {"name": "k", "groups": ["edge"]}, format="json")
    assert made.status_code == 201, made.content
    assert made.data["groups"] == ["Edge"]
    assert [g.name for g in RegistrationKey.objects.get(pk=made.data["id"]).groups.all()] == [
        "Edge"
    ]
    unknown = client.post("/api/registration-keys/", {"name": "k", "groups": ["x"]}, format="json")
    assert unknown.status_code == 400
    assert "No host group named x" in unknown.data["detail"]


# -- enrollment on the command line -------------------------------------------------------------


def run(command: str, *args: str) -> tuple[dict, str]:
    out, err = io.StringIO(), io.StringIO()
    with transaction.atomic():  # as one command line: its on-commit work runs
        call_command(command, *args, stdout=out, stderr=err)
    return json.loads(out.getvalue().strip().splitlines()[-1]), err.getvalue()


def test_register_host_with_groups(django_capture_on_commit_callbacks):
    host_services.host_group_create(name="Web")
    with django_capture_on_commit_callbacks(execute=True):
        enrolled, said = run("register_host", "web-09", "--group", "web", "--group", "prod")
    assert enrolled["groups"] == ["prod", "Web"]
    assert "Created host group prod." in said
    assert "Created host group Web" not in said
    host = Host.objects.get(pk=enrolled["host_id"])
    assert sorted(host.groups.values_list("name", flat=True), key=str.lower) == ["prod", "Web"]
    assert audit_of("host_enrolled")[0]["groups"] == "prod, Web"
    assert audit_of("host_group_created")[0]["group"] == "prod"
    # A new token for an enrolled host adds groups and keeps those it is in.
    again, _ = run("register_host", "web-09", "--reissue", "--group", "edge")
    assert again["groups"] == ["edge", "prod", "Web"]


def test_a_refused_enrollment_leaves_no_group_behind():
    Host.objects.create(hostname="sm-01", agent_kind="sysmanage")
    with pytest.raises(Exception, match="SysManage agent"):
        run("register_host", "sm-01", "--reissue", "--group", "orphan")
    assert not HostGroup.objects.exists()


def test_create_registration_key_with_groups():
    made, said = run("create_registration_key", "rollout", "--group", "edge", "--group", "Edge")
    assert made["groups"] == ["edge"]
    assert "Created host group edge." in said
    assert "join edge" in said
    key = RegistrationKey.objects.get(pk=made["id"])
    assert [g.name for g in key.groups.all()] == ["edge"]


# -- pages ----------------------------------------------------------------------------------------


@pytest.fixture
def operator(client, make_user):
    make_user("operator")
    assert client.login(username="operator", password=PASSWORD)
    return client


def test_hosts_page_shows_groups_and_filters_by_them(operator, hosts):
    group = host_services.host_group_create(name="Web")
    host_services.host_group_set_hosts(group_id=group.pk, host_ids=[h.pk for h in hosts[:2]])
    page = operator.get("/hosts/")
    html = page.content.decode()
    assert '<th scope="col">Groups</th>' in html
    assert html.count('href="/hosts/?group=Web"') == 2
    assert '<option value="Web">Web (2)</option>' in html
    filtered = operator.get("/hosts/?group=web&q=02")
    assert [h.hostname for h in filtered.context["hosts"]] == ["web-02"]
    assert filtered.context["total_hosts"] == 2
    # named as the group is named, whatever the case of the address
    assert "1 of 2 hosts in group “Web” match “02”." in filtered.content.decode()
    assert '<option value="Web" selected>' in filtered.content.decode()
    assert filtered.context["page_data"] == {"liveMetrics": False, "group": "Web"}
    unknown = operator.get("/hosts/?group=nothing")
    assert unknown.context["hosts"] == []
    assert "There is no host group named “nothing”." in unknown.content.decode()
    assert b"No hosts yet" in unknown.content  # in the page, hidden: the fleet is not empty
    assert b'id="hosts-none" class="empty-state" hidden' in unknown.content


def test_host_page_shows_its_groups(operator, hosts):
    group = host_services.host_group_create(name="Web")
    host_services.host_group_set_hosts(group_id=group.pk, host_ids=[hosts[0].pk])
    html = operator.get(f"/hosts/{hosts[0].pk}/").content.decode()
    assert '<dt>Groups</dt><dd id="host-groups"><a class="badge badge-group"' in html
    assert 'href="/hosts/?group=Web">Web</a>' in html
    other = operator.get(f"/hosts/{hosts[1].pk}/").content.decode()
    assert '<dd id="host-groups"><span class="muted">—</span>' in other


# -- admin ---------------------------------------------------------------------------------------


@pytest.fixture
def admin_client(client, make_user):
    make_user("root", superuser=True)
    assert client.login(username="root", password=PASSWORD)
    return client


def test_admin_group_pages_render_and_change_through_the_services(
    admin_client, hosts, django_capture_on_commit_callbacks
):
    group = host_services.host_group_create(name="web")
    host_services.host_group_set_hosts(group_id=group.pk, host_ids=[hosts[0].pk])
    listing = admin_client.get("/admin/hosts/hostgroup/?q=we")
    assert listing.status_code == 200
    assert b"web" in listing.content
    assert b'class="field-host_count">1<' in listing.content
    for path in (
        "/admin/hosts/hostgroup/add/",
        f"/admin/hosts/hostgroup/{group.pk}/change/",
        f"/admin/hosts/host/{hosts[0].pk}/change/",
        f"/admin/hosts/host/?groups__id__exact={group.pk}",
        "/admin/hosts/registrationkey/add/",
    ):
        assert admin_client.get(path).status_code == 200, path
    assert b'name="groups"' in admin_client.get(f"/admin/hosts/host/{hosts[0].pk}/change/").content
    filtered = admin_client.get(f"/admin/hosts/host/?groups__id__exact={group.pk}")
    assert b"web-01" in filtered.content
    assert b"web-02" not in filtered.content
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post("/admin/hosts/hostgroup/add/", {"name": "WEB"})
    assert response.status_code == 200  # refused: the name is taken, in another case
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            "/admin/hosts/hostgroup/add/", {"name": "db", "description": "x"}
        )
    assert response.status_code == 302, response.content[:2000]
    assert audit_of("host_group_created")[-1]["group"] == "db"


def test_admin_edits_a_hosts_groups_through_the_service(
    admin_client, hosts, django_capture_on_commit_callbacks
):
    web = host_services.host_group_create(name="web")
    host = hosts[0]
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            f"/admin/hosts/host/{host.pk}/change/",
            {"hostname": host.hostname, "ip_addresses": "[]", "groups": [str(web.pk)]},
        )
    assert response.status_code == 302, response.content[:2000]
    assert list(host.groups.all()) == [web]
    assert audit_of("host_groups_changed") == [
        {"host_id": str(host.pk), "hostname": "web-01", "added": "web"}
    ]


def test_admin_host_groups_are_read_only_without_the_right(client, make_user, hosts):
    web = host_services.host_group_create(name="web")
    make_user("clerk", staff=True, perms=["hosts.view_host", "hosts.change_host"])
    assert client.login(username="clerk", password=PASSWORD)
    host = hosts[0]
    page = client.get(f"/admin/hosts/host/{host.pk}/change/")
    assert b'name="groups"' not in page.content
    client.post(
        f"/admin/hosts/host/{host.pk}/change/",
        {"hostname": host.hostname, "ip_addresses": "[]", "groups": [str(web.pk)]},
    )
    assert host.groups.count() == 0
    assert client.get("/admin/hosts/hostgroup/add/").status_code == 403


def test_admin_registration_key_groups(admin_client, django_capture_on_commit_callbacks):
    web = host_services.host_group_create(name="web")
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            "/admin/hosts/registrationkey/add/", {"name": "rollout", "groups": [str(web.pk)]}
        )
    assert response.status_code == 302, response.content[:2000]
    key = RegistrationKey.objects.get()
    assert list(key.groups.all()) == [web]
    edge = host_services.host_group_create(name="edge")
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            f"/admin/hosts/registrationkey/{key.pk}/change/", {"groups": [str(edge.pk)]}
        )
    assert response.status_code == 302, response.content[:2000]
    assert RegistrationKey.objects.count() == 1  # changed, not another key made
    assert list(key.groups.all()) == [edge]
    assert audit_of("registration_key_changed")[0]["groups"] == "edge"
    assert b"edge" in admin_client.get("/admin/hosts/registrationkey/").content
