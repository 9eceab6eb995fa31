"""The dashboard pages: login, access rules, what each page renders, search and filters."""

from __future__ import annotations

import json
import uuid

import pytest
from django.contrib.auth.models import Permission

from activity.models import UserActivity
from activity.services import activity_record
from alerts import services as alert_services
from alerts.models import Alert
from hosts import selectors as host_selectors
from hosts import services as host_services
from hosts.models import AgentRegistration, Host, HostInventory
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db

PAGES = ["/", "/hosts/", "/alerts/", "/activity/"]


def page_data(response) -> dict:
    """The JSON a page hands its script (``json_script`` with id ``page-data``)."""
    content = response.content.decode()
    start = content.index('id="page-data"')
    start = content.index(">", start) + 1
    return json.loads(content[start : content.index("</script>", start)])


#: What a staff member who reads the activity log and approves agents is given.
STAFF_PERMS = ("activity.view_useractivity", "hosts.view_agentregistration")


@pytest.fixture
def operator(client, make_user):
    make_user("operator")
    assert client.login(username="operator", password=PASSWORD)
    return client


@pytest.fixture
def staff(client, make_user):
    make_user("boss", staff=True, perms=STAFF_PERMS)
    assert client.login(username="boss", password=PASSWORD)
    return client


@pytest.fixture
def root(client, make_user):
    make_user("root", superuser=True)
    assert client.login(username="root", password=PASSWORD)
    return client


@pytest.fixture
def host():
    return host_services.host_create(
        hostname="web-01",
        fqdn="web-01.example.com",
        os_name="Debian GNU/Linux",
        os_version="12",
        cpu_count=4,
    )


# -- login and logout ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", [p for p in PAGES if p != "/"] + ["/hosts/5f0c6a8e-0d1b-4c39-9a51-2b7de3c4f6a1/"]
)
def test_pages_require_login(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=")


def test_root_shows_the_login_form_with_200_to_anonymous_visitors(client):
    # SysManage agents check that GET / answers 200 before every connection attempt.
    response = client.get("/")
    assert response.status_code == 200
    assert b'name="username"' in response.content
    assert b"Fleet overview" not in response.content


def test_logging_in_on_the_root_page_leads_to_the_overview(client, make_user):
    make_user("ops")
    response = client.post("/", {"username": "ops", "password": PASSWORD})
    assert response.status_code == 302
    assert client.get("/").context["nav_section"] == "overview"


def test_login_page_renders_without_the_live_connection(client):
    response = client.get("/login/")
    assert response.status_code == 200
    assert b'name="username"' in response.content
    assert b'id="connection"' not in response.content


def test_login_redirects_to_the_overview_and_is_recorded(client, make_user):
    make_user("operator")
    response = client.post("/login/", {"username": "operator", "password": PASSWORD})
    assert response.status_code == 302
    assert response["Location"] == "/"
    assert UserActivity.objects.filter(
        username="operator", action="login", details__path="/login/"
    ).exists()


def test_login_follows_next(client, make_user):
    make_user("operator")
    response = client.post(
        "/login/?next=/alerts/", {"username": "operator", "password": PASSWORD, "next": "/alerts/"}
    )
    assert response["Location"] == "/alerts/"


def test_wrong_password_shows_the_form_again(client, make_user):
    make_user("operator")
    response = client.post("/login/", {"username": "operator", "password": "wrong"})
    assert response.status_code == 200
    assert b"Please enter a correct username and password" in response.content


def test_locked_account_sees_the_lockout_message(client, make_user, settings):
    settings.LOGIN_LOCKOUT_THRESHOLD = 2
    make_user("operator")
    for _ in range(2):
        client.post("/login/", {"username": "operator", "password": "wrong"})
    response = client.post("/login/", {"username": "operator", "password": PASSWORD})
    assert response.status_code == 200
    assert b"Too many failed logins" in response.content
    assert "_auth_user_id" not in client.session
    locked = UserActivity.objects.get(action="login_locked")
    assert locked.username == "operator"
    assert locked.details["via"] == "session"


def test_admin_login_still_locks_out(client, make_user, settings):
    settings.LOGIN_LOCKOUT_THRESHOLD = 1
    make_user("root", superuser=True)
    client.post("/admin/login/", {"username": "root", "password": "wrong"})
    response = client.post("/admin/login/", {"username": "root", "password": PASSWORD})
    assert b"Too many failed logins" in response.content


def test_logged_in_users_skip_the_login_page(operator):
    assert operator.get("/login/")["Location"] == "/"


def test_logout_is_post_only_and_goes_to_login(operator):
    assert operator.get("/logout/").status_code == 405
    response = operator.post("/logout/")
    assert response.status_code == 302
    assert response["Location"] == "/login/"
    assert operator.get("/hosts/").status_code == 302
    assert b'name="username"' in operator.get("/").content


# -- access ---------------------------------------------------------------------------------


def test_activity_page_is_staff_only(operator):
    assert operator.get("/activity/").status_code == 403


def test_activity_page_for_staff(staff):
    activity_record(
        action="command_run",
        username="alice",
        details={"hostname": "web-01", "command": "uptime", "execution_id": "x"},
    )
    response = staff.get("/activity/")
    assert response.status_code == 200
    assert len(response.context["activities"]) == UserActivity.objects.count()
    row = response.context["activities"][0]
    assert row["label"] == "Ran a command"
    assert row["details"] == "hostname: web-01 · command: uptime"  # identifiers left out
    assert page_data(response)["actionLabels"]["login"] == "Logged in"


def test_activity_page_names_a_fleet_run_started(staff):
    activity_record(
        action="fleet_run_started",
        username="alice",
        details={"run_id": "x", "command": "uptime", "hosts": 3, "target": "groups web"},
    )
    row = staff.get("/activity/").context["activities"][0]
    assert row["label"] == "Started a fleet run"


def test_activity_page_keeps_the_last_hundred(staff):
    for i in range(105):
        activity_record(action="login", username=f"user{i}")
    assert len(staff.get("/activity/").context["activities"]) == 100


def test_navigation_shows_activity_and_admin_to_staff_only(operator, make_user, client):
    content = operator.get("/").content
    assert b'href="/activity/"' not in content
    assert b'href="/admin/"' not in content
    client.logout()
    # staff alone opens the admin, but not the activity log
    make_user("clerk", staff=True)
    client.login(username="clerk", password=PASSWORD)
    content = client.get("/").content
    assert b'href="/activity/"' not in content
    assert b'href="/admin/"' in content
    assert client.get("/activity/").status_code == 403
    client.logout()
    make_user("boss", staff=True, perms=STAFF_PERMS)
    client.login(username="boss", password=PASSWORD)
    content = client.get("/").content
    assert b'href="/activity/"' in content
    assert b'href="/admin/"' in content


# -- overview ---------------------------------------------------------------------------------


def test_overview_of_an_empty_fleet_explains_enrolment(operator):
    response = operator.get("/")
    assert response.status_code == 200
    assert response.context["fleet"]["total_hosts"] == 0
    assert b"python manage.py register_host" in response.content
    assert b"seed_demo" in response.content
    assert b'aria-labelledby="empty-fleet-heading" hidden' not in response.content


def test_overview_counts_hosts_and_active_alerts(operator, host):
    alert_services.alert_raise(severity="critical", category="disk", title="Disk", host=host)
    alert_services.alert_raise(severity="warning", category="cpu", title="CPU", host=host)
    resolved = alert_services.alert_raise(severity="warning", category="x", title="Old")
    Alert.objects.filter(pk=resolved.pk).update(status="resolved")
    response = operator.get("/")
    assert response.context["fleet"]["total_hosts"] == 1
    assert response.context["alert_counts"] == [
        ("critical", "Critical", 1),
        ("warning", "Warning", 1),
        ("info", "Info", 0),
    ]
    assert response.context["active_alerts"] == 2
    assert b"No hosts yet" in response.content  # present for live use, but hidden
    assert b'aria-labelledby="empty-fleet-heading" hidden' in response.content


def test_overview_activity_for_staff_only(operator, make_user, client):
    activity_record(action="login", username="someone")
    response = operator.get("/")
    assert response.context["activities"] == []
    assert page_data(response)["canViewActivity"] is False
    assert b"Recent activity" not in response.content
    client.logout()
    make_user("boss", staff=True, perms=STAFF_PERMS)
    client.login(username="boss", password=PASSWORD)
    response = client.get("/")
    assert page_data(response)["canViewActivity"] is True
    assert 0 < len(response.context["activities"]) <= 20


# -- hosts --------------------------------------------------------------------------------------


def test_hosts_table(operator, host):
    host_services.host_create(hostname="db-01", os_name="Ubuntu")
    response = operator.get("/hosts/")
    assert response.status_code == 200
    assert [h.hostname for h in response.context["hosts"]] == ["db-01", "web-01"]
    assert f'href="/hosts/{host.pk}/"'.encode() in response.content
    assert b"Debian GNU/Linux" in response.content


def test_hosts_table_shows_live_metrics_to_those_who_may_watch_every_host(
    operator, client, make_user, host
):
    response = operator.get("/hosts/")
    assert page_data(response) == {"liveMetrics": False, "group": None}
    assert b'data-cell="cpu"' not in response.content
    make_user("ops", staff=True, perms=["hosts.view_host"])
    assert client.login(username="ops", password=PASSWORD)
    response = client.get("/hosts/")
    assert page_data(response) == {"liveMetrics": True, "group": None}
    assert b'<th scope="col" class="num">CPU</th>' in response.content
    assert b'data-cell="cpu"' in response.content
    assert b'data-cell="memory"' in response.content


def test_hosts_search(operator, host):
    host_services.host_create(hostname="db-01")
    response = operator.get("/hosts/?q=WEB")
    assert [h.hostname for h in response.context["hosts"]] == ["web-01"]
    assert response.context["query"] == "WEB"
    assert response.context["total_hosts"] == 2
    assert operator.get("/hosts/?q=example.com").context["hosts"][0].hostname == "web-01"


def test_hosts_search_without_match(operator, host):
    response = operator.get("/hosts/?q=nothing-like-it")
    assert response.context["hosts"] == []
    assert b"No hosts match" in response.content


def test_hosts_empty_state(operator):
    response = operator.get("/hosts/")
    assert response.context["total_hosts"] == 0
    assert b"No hosts yet" in response.content
    assert b'id="hosts-none" class="empty-state" hidden' not in response.content


# -- one host -------------------------------------------------------------------------------------


def test_host_page(operator, host):
    response = operator.get(f"/hosts/{host.pk}/")
    assert response.status_code == 200
    assert response.context["host"] == host
    data = page_data(response)
    assert data["hostId"] == str(host.pk)
    assert data["username"] == "operator"  # which commands on the host are this page's
    assert data["cpuCount"] == 4
    assert data["canRunCommands"] is False
    assert data["canManageAlerts"] is False
    for chart in ("cpu", "memory", "disk", "load"):
        assert f'data-chart="{chart}"'.encode() in response.content


def test_host_page_of_unknown_host_is_404(operator):
    assert operator.get(f"/hosts/{uuid.uuid4()}/").status_code == 404
    assert operator.get("/hosts/not-a-uuid/").status_code == 404


def test_console_disabled_without_the_permission(operator, host):
    content = operator.get(f"/hosts/{host.pk}/").content.decode()
    assert "You may not run commands on hosts" in content
    assert "<fieldset disabled>" in content


def test_console_enabled_with_the_permission(client, make_user, host):
    user = make_user("runner")
    user.user_permissions.add(Permission.objects.get(codename="run_command"))
    client.login(username="runner", password=PASSWORD)
    response = client.get(f"/hosts/{host.pk}/")
    assert response.context["can_run_commands"] is True
    assert "<fieldset disabled>" not in response.content.decode()
    assert page_data(response)["canRunCommands"] is True


def test_superuser_may_run_commands_and_manage_alerts(root, host):
    data = page_data(root.get(f"/hosts/{host.pk}/"))
    assert data["canRunCommands"] is True
    assert data["canManageAlerts"] is True


def test_host_absolute_url_and_admin_link(root, host):
    assert host.get_absolute_url() == f"/hosts/{host.pk}/"
    content = root.get(f"/admin/hosts/host/{host.pk}/change/").content.decode()
    assert f'href="/hosts/{host.pk}/"' in content
    assert "View on dashboard" in content
    assert 'href="/"' in root.get("/admin/").content.decode()  # "View site"


# -- alerts ----------------------------------------------------------------------------------------


@pytest.fixture
def alerts(host):
    made = {
        "critical": alert_services.alert_raise(
            severity="critical", category="disk", title="Disk full", host=host
        ),
        "warning": alert_services.alert_raise(
            severity="warning", category="cpu", title="CPU busy", host=host
        ),
        "info": alert_services.alert_raise(severity="info", category="note", title="FYI"),
    }
    Alert.objects.filter(pk=made["info"].pk).update(status="resolved")
    return made


def titles(response) -> set[str]:
    return {a.title for a in response.context["alerts"]}


def test_alerts_default_to_active(operator, alerts):
    response = operator.get("/alerts/")
    assert response.status_code == 200
    assert titles(response) == {"Disk full", "CPU busy"}
    assert response.context["states"] == ["open", "acknowledged"]
    assert response.context["showing_default"] is True


def test_alerts_filtered_by_severity_and_state(operator, alerts):
    response = operator.get("/alerts/?severity=critical&severity=info&status=open&status=resolved")
    assert titles(response) == {"Disk full", "FYI"}
    assert page_data(response)["severities"] == ["info", "critical"]
    assert titles(operator.get("/alerts/?severity=warning,critical")) == {"Disk full", "CPU busy"}


def test_alerts_form_with_nothing_ticked_shows_everything(operator, alerts):
    assert titles(operator.get("/alerts/?filtered=1")) == {"Disk full", "CPU busy", "FYI"}


def test_alerts_unknown_filter_values_are_ignored(operator, alerts):
    response = operator.get("/alerts/?severity=bogus&status=nope")
    assert titles(response) == {"Disk full", "CPU busy"}


def test_alerts_empty_state(operator):
    assert b"No open alerts." in operator.get("/alerts/").content


def test_alert_buttons_only_for_managers(operator, make_user, client, alerts):
    assert b'data-action="acknowledge"' not in operator.get("/alerts/").content
    client.logout()
    # the staff flag alone manages nothing; the permission does
    make_user("clerk", staff=True)
    client.login(username="clerk", password=PASSWORD)
    assert b'data-action="acknowledge"' not in client.get("/alerts/").content
    client.logout()
    make_user("boss", perms=["alerts.change_alert"])
    client.login(username="boss", password=PASSWORD)
    response = client.get("/alerts/")
    assert b'data-action="acknowledge"' in response.content
    assert page_data(response)["canManageAlerts"] is True


def test_alerts_are_paginated(operator, host):
    for i in range(105):
        alert_services.alert_raise(severity="info", category="x", title=f"Alert {i}")
    first = operator.get("/alerts/")
    assert len(first.context["alerts"]) == 100
    assert page_data(first)["firstPage"] is True
    second = operator.get("/alerts/?page=2")
    assert len(second.context["alerts"]) == 5
    assert page_data(second)["firstPage"] is False


def test_every_page_links_its_script_and_styles(staff, host):
    for path in [*PAGES, f"/hosts/{host.pk}/"]:
        content = staff.get(path).content.decode()
        assert "/static/css/app.css" in content, path
        assert 'type="module" src="/static/js/pages/' in content, path
        assert 'id="connection"' in content, path
    assert Host.objects.count() == 1


# -- a SysManage agent's inventory on the host page -------------------------------------------


OS_REPORT = {
    "platform": "Linux",
    "platform_release": "6.1.0-18-amd64",
    "platform_version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1",
    "architecture": "64bit",
    "machine_architecture": "x86_64",
    "processor": "",
    "timezone": "Europe/Berlin",
    "python_version": "3.11.2",
    "os_info": {
        "distribution": "Debian GNU/Linux",
        "distribution_version": "12",
        "distribution_codename": "bookworm",
    },
}
HARDWARE_REPORT = {
    "cpu_vendor": "GenuineIntel",
    "cpu_model": "Intel(R) Xeon(R) Gold 6226R CPU @ 2.90GHz",
    "cpu_cores": 8,
    "cpu_threads": 16,
    "cpu_frequency_mhz": 2900,
    "memory_total_mb": 32768,
    "memory_available_mb": 20480,
    "storage_devices": [
        {
            "name": "/dev/sda1",
            "mount_point": "/",
            "total_size": 100 * 2**30,
            "used_size": 42 * 2**30,
            "file_system": "ext4",
        },
        {
            "name": "/dev/sdb1",
            "mount_point": "/srv/data",
            "total_size": 2 * 2**40,
            "used_size": 1.9 * 2**40,
            "file_system": "xfs",
        },
        {"name": "tmpfs", "mount_point": "/tmp", "file_system": "tmpfs"},  # no sizes
    ],
    "network_interfaces": [
        {"name": "lo", "ipv4_addresses": ["127.0.0.1"]},
        {"name": "eno1", "ipv4_addresses": ["192.0.2.7"]},
    ],
}
UPDATES_REPORT = {
    "available_updates": [
        {
            "package_name": "curl",
            "current_version": "7.88.1-10+deb12u4",
            "available_version": "7.88.1-10+deb12u5",
            "package_manager": "apt",
            "is_security_update": False,
        },
        {
            "package_name": "openssl",
            "current_version": "3.0.11-1~deb12u1",
            "available_version": "3.0.11-1~deb12u2",
            "package_manager": "apt",
            "is_security_update": True,
        },
    ],
    "total_updates": 2,
    "security_updates": 1,
}


def software_report(packages: int) -> dict:
    return {
        "software_packages": [
            {
                "package_name": f"pkg-{i:04d}",
                "version": f"1.{i}-1",
                "package_manager": "apt",
                "architecture": "amd64",
            }
            for i in range(packages)
        ],
        "total_packages": packages,
    }


@pytest.fixture
def sysmanage_host(host):
    Host.objects.filter(pk=host.pk).update(agent_kind="sysmanage", agent_version="0.9.5")
    for kind, data in (
        ("os", OS_REPORT),
        ("hardware", HARDWARE_REPORT),
        ("updates", UPDATES_REPORT),
        ("software", software_report(3)),
    ):
        HostInventory.objects.create(
            host=host, kind=kind, data=data, item_count=len(data.get("available_updates", []))
        )
    return host


def test_host_page_shows_the_inventory(operator, sysmanage_host):
    response = operator.get(f"/hosts/{sysmanage_host.pk}/")
    assert response.status_code == 200
    content = response.content.decode()
    inventory = response.context["inventory"]
    assert set(inventory) == {"os", "hardware", "updates", "software"}
    assert 'id="inventory-heading"' in content
    assert "SysManage agent 0.9.5" in content
    # Operating system
    assert "Debian GNU/Linux 12 (bookworm)" in content
    assert "6.1.0-18-amd64" in content
    assert "Europe/Berlin" in content
    # Hardware
    hardware = inventory["hardware"]
    assert hardware["memory_total"] == 32 * 2**30
    assert "Intel(R) Xeon(R) Gold 6226R" in content
    assert "8 / 16" in content
    assert [d["used_percent"] for d in hardware["storage"]] == [42, 95, None]
    assert "/srv/data" in content
    assert "95 %" in content
    assert "eno1" in content
    # Updates: security first
    updates = inventory["updates"]
    assert (updates["count"], updates["security_count"]) == (2, 1)
    assert [row["name"] for row in updates["rows"]] == ["openssl", "curl"]
    assert "3.0.11-1~deb12u2" in content
    assert '<span class="badge severity-warning">Security</span>' in content
    # Installed packages, collapsed
    assert "3 packages installed." in content
    assert '<details class="inventory-packages">' in content
    assert "pkg-0002" in content
    assert "more not shown" not in content
    # Each part says when it was reported
    assert content.count('class="inventory-reported muted"') == 4


def test_host_page_without_inventory(operator, host):
    response = operator.get(f"/hosts/{host.pk}/")
    assert response.context["inventory"] == {}
    content = response.content.decode()
    assert 'id="inventory-heading"' not in content
    assert "Built-in agent" in content


def test_host_page_shows_only_the_reported_parts(operator, host):
    HostInventory.objects.create(
        host=host, kind="updates", data={"available_updates": []}, item_count=0
    )
    content = operator.get(f"/hosts/{host.pk}/").content.decode()
    assert "No updates available." in content
    assert 'id="inventory-os-heading"' not in content
    assert 'id="inventory-software-heading"' not in content


MALFORMED_REPORTS = {
    "os": {
        "os_info": "Debian",
        "platform": ["Linux"],
        "platform_release": None,
        "timezone": {"name": "UTC"},
        "machine_architecture": 64,
    },
    "hardware": {
        "cpu_model": {"x": 1},
        "cpu_cores": "many",
        "cpu_threads": -4,
        "memory_total_mb": True,
        "memory_available_mb": "nan",
        "storage_devices": [
            None,
            "sda",
            7,
            {"mount_point": ["/"]},
            {"mount_point": "/", "total_size": "100", "used_size": 10**400},
            {"mount_point": "/x", "total_size": 0, "used_size": 5},
        ],
        "network_interfaces": {"eth0": {}},
    },
    "updates": {
        "available_updates": [
            None,
            {"package_name": None},
            {
                "package_name": "<script>alert(1)</script>",
                "current_version": 1.5,
                "available_version": [2],
                "is_security_update": "yes",
            },
        ],
        "total_updates": "lots",
        "security_updates": -1,
    },
    "software": {"software_packages": "many", "total_packages": "12"},
}


def test_host_page_survives_malformed_inventory(operator, host):
    for kind, data in MALFORMED_REPORTS.items():
        HostInventory.objects.create(host=host, kind=kind, data=data)
    response = operator.get(f"/hosts/{host.pk}/")
    assert response.status_code == 200
    content = response.content.decode()
    inventory = response.context["inventory"]
    assert inventory["os"]["name"] == ""
    assert inventory["os"]["architecture"] == "64"
    hardware = inventory["hardware"]
    assert hardware["cpu_cores"] is None
    assert hardware["cpu_threads"] is None
    assert hardware["memory_total"] is None
    assert hardware["memory_available"] is None
    assert hardware["interfaces"] == []
    assert [
        (d["mount_point"], d["total"], d["used"], d["used_percent"]) for d in hardware["storage"]
    ] == [("", None, None, None), ("/", 100, None, None), ("/x", 0, 5, None)]
    updates = inventory["updates"]
    assert (updates["count"], updates["security_count"]) == (3, 1)
    assert updates["rows"] == [
        {
            "name": "<script>alert(1)</script>",
            "current": "1.5",
            "available": "",
            "manager": "",
            "security": True,
        }
    ]
    assert "<script>alert(1)" not in content
    assert "&lt;script&gt;alert(1)" in content
    assert inventory["software"]["count"] == 12
    assert inventory["software"]["rows"] == []
    assert "12 packages installed." in content


@pytest.mark.parametrize("data", [[1, 2], "text", True, 42, {}])
def test_host_page_survives_inventory_that_is_not_an_object(operator, host, data):
    for kind in ("os", "hardware", "updates", "software"):
        HostInventory.objects.create(host=host, kind=kind, data=data)
    response = operator.get(f"/hosts/{host.pk}/")
    assert response.status_code == 200
    assert response.context["inventory"]["software"]["count"] is None
    assert "did not say how many packages" in response.content.decode()


def test_inventory_updates_are_limited_to_200_security_first(operator, host):
    updates = [
        {
            "package_name": f"lib{i:03d}",
            "current_version": "1",
            "available_version": "2",
            "is_security_update": False,
        }
        for i in range(249)
    ]
    updates.append(
        {
            "package_name": "zz-last-by-name",
            "current_version": "1",
            "available_version": "2",
            "is_security_update": True,
        }
    )
    HostInventory.objects.create(
        host=host,
        kind="updates",
        item_count=250,
        data={"available_updates": updates, "total_updates": 250},
    )
    response = operator.get(f"/hosts/{host.pk}/")
    rows = response.context["inventory"]["updates"]["rows"]
    assert len(rows) == 200
    assert rows[0]["name"] == "zz-last-by-name"
    content = response.content.decode()
    assert (
        "Showing the first 200 of 250 updates, security updates first; 50 more not shown."
        in content
    )
    assert content.count('<td class="version">') == 400


def test_inventory_packages_are_limited_to_500(operator, host):
    HostInventory.objects.create(
        host=host, kind="software", data=software_report(1200), item_count=1200
    )
    response = operator.get(f"/hosts/{host.pk}/")
    software = response.context["inventory"]["software"]
    assert software["count"] == 1200
    assert len(software["rows"]) == 500
    assert software["rows"][-1]["name"] == "pkg-0499"
    content = response.content.decode()
    assert "1200 packages installed." in content
    assert "The first 500 packages by name" in content
    assert "Listing the first 500 of 1200 packages by name; 700 more not shown." in content
    assert "pkg-0499" in content
    assert "pkg-0500" not in content


def test_inventory_shapers_are_plain_functions():
    assert host_selectors.inventory_updates({}) == {
        "count": None,
        "security_count": None,
        "rows": [],
        "listed": 0,
        "more": 0,
    }
    assert (
        host_selectors.inventory_updates({"total_updates": 9, "security_updates": 2.0}, limit=1)[
            "security_count"
        ]
        == 2
    )
    assert host_selectors.inventory_software(software_report(5), limit=2)["more"] == 3
    assert host_selectors.inventory_os({"platform": "FreeBSD", "platform_release": "14.0"}) == {
        "name": "FreeBSD",
        "version": "",
        "codename": "",
        "kernel": "14.0",
        "architecture": "",
        "timezone": "",
    }
    hardware = host_selectors.inventory_hardware(
        {"memory_total_mb": "1024.5", "storage_devices": [{}] * 150}
    )
    assert hardware["memory_total"] == int(1024.5 * 2**20)
    assert (len(hardware["storage"]), hardware["storage_more"]) == (100, 50)


# -- registrations waiting for approval on the overview ----------------------------------------

PENDING_URL = "/admin/hosts/agentregistration/?status__exact=pending"


def test_overview_tells_staff_about_pending_registrations(staff):
    AgentRegistration.objects.create(hostname="new-01", token_hash="0" * 64)
    AgentRegistration.objects.create(hostname="new-02", token_hash="0" * 64)
    AgentRegistration.objects.create(hostname="old-01", token_hash="0" * 64, status="approved")
    AgentRegistration.objects.create(hostname="bad-01", token_hash="0" * 64, status="rejected")
    response = staff.get("/")
    assert response.context["pending_registrations"] == 2
    content = response.content.decode()
    assert f'<a href="{PENDING_URL}">2 hosts waiting for approval</a>' in content


def test_pending_registrations_link_lists_them_in_the_admin(root):
    AgentRegistration.objects.create(hostname="new-01", token_hash="0" * 64)
    content = root.get("/").content.decode()
    assert f'<a href="{PENDING_URL}">1 host waiting for approval</a>' in content
    response = root.get(PENDING_URL)
    assert response.status_code == 200
    assert "new-01" in response.content.decode()


def test_overview_hides_pending_registrations_from_non_staff(operator):
    AgentRegistration.objects.create(hostname="new-01", token_hash="0" * 64)
    response = operator.get("/")
    assert response.context["pending_registrations"] == 0
    assert "waiting for approval" not in response.content.decode()


def test_overview_without_pending_registrations(staff):
    AgentRegistration.objects.create(hostname="old-01", token_hash="0" * 64, status="approved")
    response = staff.get("/")
    assert response.context["pending_registrations"] == 0
    assert 'id="pending-registrations"' not in response.content.decode()


def test_hosts_table_marks_sysmanage_agent_hosts(operator, sysmanage_host):
    host_services.host_create(hostname="db-01")
    content = operator.get("/hosts/").content.decode()
    assert content.count('<span class="badge">SysManage agent</span>') == 1
