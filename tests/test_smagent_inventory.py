"""The SysManage agent's users-and-groups (``user_access_update``) and services
(``role_data``) reports: normalized and bounded when stored, shown on the host page and
returned by ``GET /api/hosts/<id>/inventory/``."""

from __future__ import annotations

import json

import pytest

from hosts import selectors
from hosts import services as host_services
from hosts.models import HostInventory, InventoryKind
from hosts.smagent import enrollment, inventory, protocol
from hosts.smagent.session import INVENTORY_TYPES
from sysmanage.dbthreads import database_sync_to_async
from tests.conftest import PASSWORD
from tests.test_sysmanage_agent_server import approved_host, connect, message

ROOT = {
    "username": "root",
    "uid": 0,
    "home_directory": "/root",
    "shell": "/bin/bash",
    "is_system_user": True,
    "groups": ["root"],
}
ALICE = {
    "username": "alice",
    "uid": 1000,
    "home_directory": "/home/alice",
    "shell": "/bin/bash",
    "is_system_user": False,
    "groups": ["alice", "sudo", "docker"],
}
NOBODY = {
    "username": "nobody",
    "uid": 65534,
    "home_directory": "/nonexistent",
    "shell": "/usr/sbin/nologin",
    "is_system_user": False,
    "groups": ["nogroup"],
}
USER_ACCESS = {
    "users": [ROOT, ALICE, NOBODY],
    "groups": [
        {"group_name": "root", "gid": 0, "is_system_group": True},
        {"group_name": "sudo", "gid": 27, "is_system_group": True},
        {"group_name": "alice", "gid": 1000, "is_system_group": False},
    ],
    "platform": "Linux",
    "total_users": 3,
    "total_groups": 3,
    "system_users": 1,
    "regular_users": 2,
    "system_groups": 2,
    "regular_groups": 1,
    "hostname": "web-01",
}
POSTGRES = {
    "role": "Database Server",
    "package_name": "postgresql",
    "package_version": "15+248+deb12u2",
    "service_name": "postgresql",
    "service_status": "running",
    "is_active": True,
}
NGINX = {
    "role": "Web Server",
    "package_name": "nginx",
    "package_version": "1.22.1-9",
    "service_name": "nginx",
    "service_status": "stopped",
    "is_active": False,
}
ROLE_DATA = {
    "hostname": "web-01",
    "roles": [NGINX, POSTGRES],
    "role_count": 2,
    "collection_timestamp": "2026-12-05T19:40:00+00:00",
}


# -- normalization -----------------------------------------------------------------------


def test_message_types_map_to_the_new_kinds():
    assert INVENTORY_TYPES["user_access_update"] == InventoryKind.USERS
    assert INVENTORY_TYPES["role_data"] == InventoryKind.SERVICES
    assert "process_status_update" not in INVENTORY_TYPES


def test_a_users_report_keeps_its_fields_regular_accounts_first():
    report, count = inventory.users_report({**USER_ACCESS, "host_id": "x", "host_token": "t"})
    assert count == 3
    assert report["users"] == [ALICE, NOBODY, ROOT]
    assert report["groups"][0] == {"group_name": "alice", "gid": 1000, "is_system_group": False}
    assert len(report["groups"]) == 3
    assert (report["total_users"], report["system_users"], report["regular_groups"]) == (3, 1, 1)
    assert (report["platform"], report["hostname"]) == ("Linux", "web-01")
    assert (report["users_not_kept"], report["groups_not_kept"]) == (0, 0)
    assert "host_token" not in json.dumps(report)


def test_malformed_users_and_groups_are_skipped_and_fields_cleaned():
    report, count = inventory.users_report(
        {
            "users": [
                "root",
                None,
                {"uid": 5},
                {"username": 42},
                {"username": "   "},
                {
                    "username": "ev\x00il\nname" + "x" * 500,
                    "uid": -1,
                    "home_directory": 7,
                    "shell": "/bin/sh\x1b[31m",
                    "is_system_user": "yes",
                    "groups": ["ok", 3, None, "", "a" * 300, *[f"g{i}" for i in range(100)]],
                },
                {"username": "bob", "uid": True},
                {"username": "carol", "uid": 2**40, "groups": "carol"},
            ],
            "groups": [{"gid": 1}, [], {"group_name": "staff", "gid": "50"}],
            "total_users": "33",
            "system_users": -4,
            "platform": ["Linux"],
        }
    )
    assert count == 3
    evil, bob, carol = report["users"]
    assert evil["username"].startswith("ev\ufffdil\ufffdname")
    assert len(evil["username"]) == inventory.NAME_CHARS
    assert evil["uid"] is None
    assert evil["home_directory"] is None
    assert evil["shell"] == "/bin/sh\ufffd[31m"
    assert evil["is_system_user"] is False  # only a real true counts
    assert evil["groups"][:2] == ["ok", "a" * inventory.NAME_CHARS]
    assert len(evil["groups"]) == inventory.MAX_USER_GROUPS
    assert bob["uid"] is None
    assert (carol["uid"], carol["groups"]) == (None, [])
    assert report["groups"] == [{"group_name": "staff", "gid": None, "is_system_group": False}]
    assert report["total_users"] is None
    assert report["system_users"] is None
    assert report["platform"] is None


def test_a_users_report_is_bounded_keeping_regular_users():
    users = [{"username": f"sys{i}", "uid": i, "is_system_user": True} for i in range(2200)] + [
        {"username": f"user{i}", "uid": 1000 + i, "is_system_user": False} for i in range(300)
    ]
    groups = [{"group_name": f"g{i}", "gid": i, "is_system_group": i < 590} for i in range(600)]
    report, count = inventory.users_report({"users": users, "groups": groups})
    assert count == 2500
    assert len(report["users"]) == inventory.MAX_USERS == 2000
    assert [u["username"] for u in report["users"][:300]] == [f"user{i}" for i in range(300)]
    assert report["users"][300]["username"] == "sys0"
    assert report["users_not_kept"] == 500
    assert len(report["groups"]) == inventory.MAX_GROUPS == 500
    assert {g["group_name"] for g in report["groups"][:10]} == {f"g{i}" for i in range(590, 600)}
    assert report["groups_not_kept"] == 100


@pytest.mark.parametrize("data", [{}, {"users": "many"}, {"users": None, "groups": []}])
def test_a_users_report_without_a_list_of_users_is_not_stored(data):
    assert inventory.users_report(data) is None


def test_an_empty_users_report_has_no_totals():
    report, count = inventory.users_report({"users": []})
    assert count == 0
    assert report["users"] == report["groups"] == []
    assert report["total_users"] is None
    assert report["hostname"] is None


def test_a_services_report_keeps_its_fields_but_not_its_time():
    report, count = inventory.services_report({**ROLE_DATA, "host_id": "x", "host_token": "t"})
    assert count == 2
    assert report == {
        "roles": [NGINX, POSTGRES],
        "roles_not_kept": 0,
        "role_count": 2,
        "hostname": "web-01",
    }
    later = {**ROLE_DATA, "collection_timestamp": "2026-12-05T19:45:00+00:00"}
    again, _ = inventory.services_report(later)
    assert protocol.digest(again) == protocol.digest(report)


def test_malformed_roles_are_skipped_and_fields_cleaned():
    report, count = inventory.services_report(
        {
            "roles": [
                "nginx",
                {},
                {"role": "", "package_name": None},
                {"role": "Web Server", "service_name": None, "service_status": " RUNNING "},
                {"package_name": "redis-server", "service_status": 3, "is_active": "yes"},
            ],
            "role_count": "2",
        }
    )
    assert count == 2
    assert report["roles"] == [
        {
            "role": "Web Server",
            "package_name": None,
            "package_version": None,
            "service_name": None,
            "service_status": "running",
            "is_active": None,
        },
        {
            "role": None,
            "package_name": "redis-server",
            "package_version": None,
            "service_name": None,
            "service_status": None,
            "is_active": None,
        },
    ]
    assert report["role_count"] is None


def test_a_services_report_is_bounded():
    roles = [{**POSTGRES, "package_name": f"pkg{i}"} for i in range(600)]
    report, count = inventory.services_report({"roles": roles})
    assert count == 600
    assert len(report["roles"]) == inventory.MAX_ROLES == 500
    assert report["roles_not_kept"] == 100
    assert inventory.services_report({"role_count": 0}) is None
    assert inventory.services_report({"roles": []}) == (
        {"roles": [], "roles_not_kept": 0, "role_count": None, "hostname": None},
        0,
    )


# -- stored over the agent's socket --------------------------------------------------------


async def _ack_of(comm, sent) -> dict:
    """The reply to ``sent``, past any command the server sends meanwhile."""
    while True:
        reply = await comm.receive_json_from(timeout=3)
        if reply["message_type"] in ("command", "ping"):
            continue
        assert reply["message_type"] == "ack", reply
        assert reply["data"]["acked_message_id"] == sent["message_id"]
        return reply


def _stored(host_id) -> dict[str, tuple[dict, int | None]]:
    return {
        row.kind: (row.data, row.item_count)
        for row in HostInventory.objects.filter(host_id=host_id)
    }


@pytest.mark.django_db(transaction=True)
async def test_the_agent_reports_are_stored_normalized():
    host, host_token = await database_sync_to_async(approved_host)()
    comm = await connect(await database_sync_to_async(enrollment.connection_token_issue)("web-01"))
    ids = {"host_id": str(host.id), "host_token": host_token}
    sent = message("heartbeat", ids)
    await comm.send_json_to(sent)
    await _ack_of(comm, sent)
    # the periodic user_access_update names the host without its token
    for sent in (
        message("user_access_update", {**USER_ACCESS, "host_id": str(host.id)}),
        message("role_data", {**ROLE_DATA, **ids}),
    ):
        await comm.send_json_to(sent)
        await _ack_of(comm, sent)
    stored = await database_sync_to_async(_stored)(host.id)
    users, user_count = stored["users"]
    assert user_count == 3
    assert users == inventory.users_report(USER_ACCESS)[0]
    roles, role_count = stored["services"]
    assert role_count == 2
    assert "collection_timestamp" not in roles
    assert roles["roles"] == [NGINX, POSTGRES]
    # a report without its list leaves the last one; so does an unknown field's noise
    for sent in (
        message("user_access_update", {**ids, "anything": [1, 2, 3]}),
        message("role_data", {**ids, "role_count": 0}),
    ):
        await comm.send_json_to(sent)
        await _ack_of(comm, sent)
    assert await database_sync_to_async(_stored)(host.id) == stored
    await comm.disconnect()


# -- shown on the host page and over REST ---------------------------------------------------


@pytest.fixture
def operator(client, make_user):
    make_user("operator")
    assert client.login(username="operator", password=PASSWORD)
    return client


@pytest.fixture
def reported_host(db):
    host = host_services.host_create(hostname="web-01", fqdn="web-01.example.com")
    for kind, report in (
        ("users", inventory.users_report(USER_ACCESS)),
        ("services", inventory.services_report(ROLE_DATA)),
    ):
        assert report is not None
        HostInventory.objects.create(host=host, kind=kind, data=report[0], item_count=report[1])
    return host


def test_host_page_shows_users_and_services(operator, reported_host):
    response = operator.get(f"/hosts/{reported_host.pk}/")
    assert response.status_code == 200
    content = response.content.decode()
    view = response.context["inventory"]
    assert set(view) == {"users", "services"}
    users = view["users"]
    assert [u["name"] for u in users["regular"]] == ["alice", "nobody"]
    assert [u["name"] for u in users["system"]] == ["root"]
    assert users["regular"][0]["groups"] == ["alice", "sudo", "docker"]
    assert (len(users["groups"]), users["system_group_count"]) == (3, 2)
    assert 'id="inventory-users-heading"' in content
    assert "2 regular users and 1 system account; 3 groups (2 system)." in content
    assert 'id="inventory-users"' in content
    assert "alice, sudo, docker" in content
    assert "/usr/sbin/nologin" in content
    assert '<details class="inventory-packages inventory-system-users">' in content
    assert 'id="inventory-system-users"' in content
    assert "more user" not in content
    services = view["services"]
    assert [(r["role"], r["status"], r["tone"]) for r in services["rows"]] == [
        ("Database Server", "running", "good"),
        ("Web Server", "stopped", "warn"),
    ]
    assert 'id="inventory-services-heading"' in content
    assert "2 server roles found, 1 running." in content
    assert "15+248+deb12u2" in content
    assert 'class="badge service-good status-succeeded">Running<' in content
    assert 'class="badge service-warn severity-warning">Stopped<' in content


def test_host_page_notes_what_was_not_kept_and_escapes(operator, reported_host):
    users = [{"username": f"u{i}", "uid": 1000 + i} for i in range(2001)]
    users.append({"username": "<script>alert(1)</script>", "uid": 9, "is_system_user": True})
    report, count = inventory.users_report({"users": users})
    HostInventory.objects.filter(host=reported_host, kind="users").update(
        data=report, item_count=count
    )
    roles = [{"role": "Odd", "package_name": "x", "service_status": "installed"}]
    HostInventory.objects.filter(host=reported_host, kind="services").update(
        data=inventory.services_report({"roles": roles})[0]
    )
    content = operator.get(f"/hosts/{reported_host.pk}/").content.decode()
    assert "The agent listed 2 more users and 0 more groups than are kept" in content
    assert "<script>alert(1)" not in content
    assert 'class="badge service-neutral status-unknown">Installed<' in content


@pytest.mark.parametrize(
    "data", [[1, 2], "text", 42, {"users": "x", "roles": {"a": 1}}, {"users": [{"uid": 1}]}]
)
def test_host_page_survives_malformed_stored_reports(operator, reported_host, data):
    HostInventory.objects.filter(host=reported_host).update(data=data)
    response = operator.get(f"/hosts/{reported_host.pk}/")
    assert response.status_code == 200
    view = response.context["inventory"]
    assert view["users"]["count"] == 0
    assert view["services"]["rows"] == []
    content = response.content.decode()
    assert "No regular users reported." in content
    assert "No server roles reported." in content


def test_selectors_order_and_coerce():
    shaped = selectors.inventory_users(
        {
            "users": [
                {"username": "b", "uid": 1001, "groups": ["x", 5, ""]},
                {"username": "a", "uid": None},
                {"username": "c", "uid": 1000, "is_system_user": True},
            ]
        }
    )
    assert [u["name"] for u in shaped["regular"]] == ["b", "a"]
    assert shaped["regular"][0]["groups"] == ["x", "5"]
    assert shaped["count"] == 3
    rows = selectors.inventory_services({"roles": [{"package_name": "p", "service_status": 1}]})
    assert rows["rows"][0]["tone"] == "neutral"


def test_rest_inventory_includes_users_and_services(operator, reported_host):
    response = operator.get(f"/api/hosts/{reported_host.pk}/inventory/")
    assert response.status_code == 200
    body = response.json()["inventory"]
    assert set(body) == {"users", "services"}
    assert body["users"]["item_count"] == 3
    assert body["users"]["data"]["users"][0]["username"] == "alice"
    assert body["services"]["item_count"] == 2
    assert body["services"]["data"]["roles"][1]["service_status"] == "running"
