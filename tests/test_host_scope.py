"""Scoped access: who sees which hosts (host group grants, ``hosts.view_all_hosts``, staff),
and that every path answers the same — the permission functions, REST, the pages, every
WebSocket channel and the actions — including changes on open sockets (in-process; the
real-server test is tests/integration/test_scoped_access.py)."""

from __future__ import annotations

import uuid

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from rest_framework.test import APIClient

from alerts import services as alert_services
from hosts import services as host_services
from hosts.models import HostStatus
from sysmanage import permissions, recheck
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.node import Node
from tests.conftest import PASSWORD
from tests.scopeutil import Fleet, give, quiet
from tests.wsutil import open_socket, request, subscribe, subscribe_with_status

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


@pytest.fixture
def webops(make_user, fleet):
    """Sees the web hosts only; may run commands there."""
    user = make_user("webops", every_host=False)
    give(fleet.web, user=user, can_run_commands=True)
    return user


def rest(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


# -- who sees what -------------------------------------------------------------------------


def test_scopes_of_staff_every_host_grants_user_groups_and_no_one(make_user, fleet):
    assert permissions.host_scope(make_user("root", superuser=True)) is None
    assert permissions.host_scope(make_user("staffer", staff=True)) is None
    assert permissions.host_scope(make_user("old-timer")) is None  # hosts.view_all_hosts
    assert permissions.host_scope(make_user("newcomer", every_host=False)) == frozenset()

    dba = Group.objects.create(name="dba")
    member = make_user("member", every_host=False)
    member.groups.add(dba)
    give(fleet.db, user_group=dba, can_manage_alerts=True)
    assert permissions.host_scope(member) == {fleet.id("db-01")}
    assert permissions.host_scope(member, "manage_alert") == {fleet.id("db-01")}
    assert permissions.host_scope(member, "run_command") == frozenset()

    both = make_user("both", every_host=False)
    both.groups.add(dba)
    give(fleet.web, user=both)
    assert permissions.host_scope(both) == {fleet.id(n) for n in ("web-01", "web-02", "db-01")}
    assert permissions.host_scope(make_user("inactive", every_host=False, active=False)) == set()


def test_actions_need_the_grant_flag_or_the_right_on_every_host_and_sight(make_user, fleet):
    webops = make_user("webops", every_host=False)
    give(fleet.web, user=webops, can_run_package_operations=True)
    everywhere = [fleet.id(n) for n in fleet.hosts]
    assert permissions.hosts_allowed(webops, "run_package_operation", everywhere) == {
        fleet.id("web-01"),
        fleet.id("web-02"),
    }
    assert permissions.hosts_allowed(webops, "run_command", everywhere) == set()
    assert not permissions.may_anywhere(webops, "run_command")

    # the model permission gives the right on every host the user sees, not beyond
    runner = make_user("runner", every_host=False, perms=["sysmanage.run_command"])
    give(fleet.db, user=runner)
    assert permissions.hosts_allowed(runner, "run_command", everywhere) == {fleet.id("db-01")}
    assert permissions.may_on_host(runner, "run_command", fleet.id("db-01"))
    assert not permissions.may_on_host(runner, "run_command", fleet.id("lone-01"))

    admin = make_user("admin", superuser=True)
    assert permissions.hosts_allowed(admin, "manage_alert", everywhere) == set(everywhere)


# -- REST and pages ------------------------------------------------------------------------


def test_rest_lists_and_details_show_only_hosts_in_sight(webops, fleet):
    client = rest(webops)
    listed = {h["hostname"] for h in client.get("/api/hosts/").json()["results"]}
    assert listed == {"web-01", "web-02"}
    assert client.get(f"/api/hosts/{fleet.id('web-01')}/").status_code == 200
    for hidden in ("db-01", "lone-01"):
        assert client.get(f"/api/hosts/{fleet.id(hidden)}/").status_code == 404
        assert client.get(f"/api/hosts/{fleet.id(hidden)}/metrics/").status_code == 404
        assert client.get(f"/api/hosts/{fleet.id(hidden)}/inventory/").status_code == 404

    groups = {g["name"]: g for g in client.get("/api/host-groups/").json()["results"]}
    assert (groups["web"]["host_count"], groups["db"]["host_count"]) == (2, 0)
    detail = client.get(f"/api/host-groups/{fleet.db.pk}/").json()
    assert detail["hosts"] == []

    seen = alert_services.alert_raise(
        severity="warning", category="disk", title="seen", host=fleet.hosts["web-01"]
    )
    hidden = alert_services.alert_raise(
        severity="critical", category="disk", title="hidden", host=fleet.hosts["db-01"]
    )
    alert_services.alert_raise(severity="info", category="fleet", title="about no host")
    titles = {a["title"] for a in client.get("/api/alerts/").json()["results"]}
    assert titles == {"seen", "about no host"}
    assert client.get(f"/api/alerts/{hidden.pk}/").status_code == 404
    assert client.get(f"/api/alerts/{seen.pk}/").status_code == 200


def test_rest_alert_actions_follow_the_grant(make_user, fleet):
    dba = make_user("dba", every_host=False)
    give(fleet.db, user=dba, can_manage_alerts=True)
    give(fleet.web, user=dba)  # sees web, may not manage its alerts
    on_db = alert_services.alert_raise(
        severity="warning", category="disk", title="db", host=fleet.hosts["db-01"]
    )
    on_web = alert_services.alert_raise(
        severity="warning", category="disk", title="web", host=fleet.hosts["web-01"]
    )
    on_lone = alert_services.alert_raise(
        severity="warning", category="disk", title="lone", host=fleet.hosts["lone-01"]
    )
    client = rest(dba)
    assert client.post(f"/api/alerts/{on_db.pk}/acknowledge/").status_code == 200
    refused = client.post(f"/api/alerts/{on_web.pk}/acknowledge/")
    assert refused.status_code == 403
    assert "host group grant" in refused.json()["detail"]
    assert client.post(f"/api/alerts/{on_lone.pk}/acknowledge/").status_code == 404


def test_raising_an_alert_on_a_host_out_of_sight_is_answered_as_no_such_host(make_user, fleet):
    raiser = make_user("raiser", every_host=False, perms=["alerts.add_alert"])
    give(fleet.web, user=raiser)
    client = rest(raiser)
    body = {"severity": "info", "category": "x", "title": "t"}
    hidden = client.post("/api/alerts/", {**body, "host": fleet.id("db-01")}, format="json")
    missing = client.post("/api/alerts/", {**body, "host": str(uuid.uuid4())}, format="json")
    assert hidden.status_code == missing.status_code == 400
    assert "does not exist" in str(hidden.json()["host"])
    ok = client.post("/api/alerts/", {**body, "host": fleet.id("web-02")}, format="json")
    assert ok.status_code == 201


def test_commands_and_package_operations_lists_are_scoped(webops, fleet, make_user):
    for name in ("web-01", "db-01"):
        host_services.command_create(
            host=fleet.hosts[name], command=f"echo {name}", timeout=5, user=None
        )
    listed = rest(webops).get("/api/commands/").json()["results"]
    assert [c["host"] for c in listed] == [fleet.id("web-01")]
    everyone = rest(make_user("old-timer")).get("/api/commands/").json()["results"]
    assert len(everyone) == 2


def test_pages_show_only_hosts_in_sight(webops, fleet):
    client = Client()
    assert client.login(username="webops", password=PASSWORD)
    page = client.get("/hosts/").content.decode()
    assert "web-01" in page
    assert "web-02" in page
    assert "db-01" not in page
    assert "lone-01" not in page
    assert client.get(f"/hosts/{fleet.id('db-01')}/").status_code == 404
    detail = client.get(f"/hosts/{fleet.id('web-01')}/")
    assert detail.status_code == 200
    assert detail.context["can_run_commands"] is True
    assert detail.context["can_manage_alerts"] is False
    overview = client.get("/")
    assert overview.context["fleet"]["total_hosts"] == 2


# -- WebSocket -----------------------------------------------------------------------------


async def _socket(user, token_for):
    return await open_socket("/ws", token=token_for(user))


def _set_status(host_id: str, status: str) -> None:
    host_services.host_set_status(host_id=host_id, status=status)


async def test_host_status_snapshot_and_events_reach_only_hosts_in_sight(webops, fleet, token_for):
    comm = await _socket(webops, token_for)
    _, status = await subscribe_with_status(comm, "host_status")
    assert {h["hostname"] for h in status["data"]["hosts"]} == {"web-01", "web-02"}

    await database_sync_to_async(_set_status)(fleet.id("db-01"), HostStatus.ONLINE)
    await database_sync_to_async(_set_status)(fleet.id("web-02"), HostStatus.ONLINE)
    event = await comm.receive_json_from(timeout=3)
    assert (event["type"], event["data"]["hostname"]) == ("event", "web-02"), event
    assert await quiet(comm) == []
    await comm.disconnect()


async def test_a_host_out_of_sight_is_answered_as_one_that_does_not_exist(webops, fleet, token_for):
    comm = await _socket(webops, token_for)
    for channel, extra in (("host_status", {}), ("host_metrics", {}), ("package_operations", {})):
        hidden = await request(
            comm,
            {
                "type": "subscribe",
                "channel": channel,
                "id": channel,
                "filters": {"host_id": fleet.id("db-01"), **extra},
            },
        )
        missing = await request(
            comm,
            {
                "type": "subscribe",
                "channel": channel,
                "id": channel,
                "filters": {"host_id": str(uuid.uuid4()), **extra},
            },
        )
        assert hidden["data"]["code"] == missing["data"]["code"] == "INVALID_FILTERS", hidden
        hidden_id, missing_id = fleet.id("db-01"), missing["data"]["message"].rsplit(" ", 1)[-1]
        assert hidden["data"]["message"].replace(hidden_id, "X") == missing["data"][
            "message"
        ].replace(missing_id, "X")

    denied = await request(
        comm,
        {
            "type": "command",
            "channel": "command_execution",
            "id": "run",
            "data": {"host_id": fleet.id("db-01"), "command": "uptime"},
        },
    )
    assert (denied["data"]["code"], denied["data"]["message"]) == (
        "COMMAND_FAILED",
        "Host not found",
    )
    allowed = await request(
        comm,
        {
            "type": "command",
            "channel": "command_execution",
            "id": "run2",
            "data": {"host_id": fleet.id("web-01"), "command": "uptime"},
        },
    )
    # past the permission: the host has no agent
    assert allowed["data"]["code"] == "COMMAND_FAILED", allowed
    assert "not reachable" in allowed["data"]["message"], allowed
    package = await request(
        comm,
        {
            "type": "command",
            "channel": "package_operations",
            "id": "pkg",
            "data": {"host_id": fleet.id("web-01"), "operation": "install", "package": "x"},
        },
    )
    assert package["data"]["code"] == "PERMISSION_DENIED", package  # commands only
    await comm.disconnect()


async def test_alerts_and_fleet_figures_are_counted_over_what_the_viewer_sees(
    webops, fleet, token_for
):
    comm = await _socket(webops, token_for)
    _, figures = await subscribe_with_status(comm, "fleet_status", id_="fleet")
    assert figures["data"]["total_hosts"] == 2
    assert figures["data"]["online_hosts"] == 0
    await subscribe_with_status(comm, "system_alerts", id_="alerts")

    def raise_both():
        alert_services.alert_raise(
            severity="critical", category="disk", title="hidden", host=fleet.hosts["db-01"]
        )
        alert_services.alert_raise(
            severity="warning", category="disk", title="seen", host=fleet.hosts["web-01"]
        )

    await database_sync_to_async(raise_both)()
    got = []
    for _ in range(10):
        message = await comm.receive_json_from(timeout=3)
        got.append(message)
        fleet_events = [m for m in got if m["channel"] == "fleet_status"]
        if fleet_events and any(m["channel"] == "system_alerts" for m in got):
            break
    alerts = [m["data"]["title"] for m in got if m["channel"] == "system_alerts"]
    assert alerts == ["seen"], got
    assert fleet_events[-1]["data"]["hosts_with_alerts"] == 1, fleet_events
    assert fleet_events[-1]["data"]["total_hosts"] == 2, fleet_events
    extra = await quiet(comm, 1.5)
    assert all(m["channel"] != "system_alerts" for m in extra), extra
    assert all(m["data"]["total_hosts"] == 2 for m in extra if m["channel"] == "fleet_status")
    await comm.disconnect()


async def test_grants_given_and_taken_reach_open_sockets(make_user, fleet, token_for):
    user = await database_sync_to_async(make_user)("late", every_host=False)
    comm = await _socket(user, token_for)
    _, status = await subscribe_with_status(comm, "host_status")
    assert status["data"]["hosts"] == []

    grant = await database_sync_to_async(give)(fleet.db, user=user)
    await recheck.recheck(Node.current().hub)  # what the grant's signal asks every process
    await database_sync_to_async(_set_status)(fleet.id("db-01"), HostStatus.ONLINE)
    event = await comm.receive_json_from(timeout=3)
    assert event["data"]["hostname"] == "db-01", event

    await subscribe(comm, "host_metrics", {"host_id": fleet.id("db-01")}, id_="metrics")
    await database_sync_to_async(host_services.host_group_grant_delete)(grant_id=grant.pk)
    await recheck.recheck(Node.current().hub)
    revoked = await comm.receive_json_from(timeout=3)
    assert (revoked["channel"], revoked["data"]["code"]) == ("host_metrics", "SUBSCRIPTION_REVOKED")
    assert "can no longer see its host" in revoked["data"]["message"]
    await database_sync_to_async(_set_status)(fleet.id("db-01"), HostStatus.OFFLINE)
    assert await quiet(comm) == []
    await comm.disconnect()


def test_a_grant_or_a_membership_change_asks_for_a_recheck(
    make_user, fleet, published, django_capture_on_commit_callbacks
):
    user = make_user("someone", every_host=False)

    def rechecks():
        return [m["fields"] for m in published.messages if m.get("action") == "recheck_users"]

    published.run(give, fleet.web, user=user)
    assert list(rechecks()[-1]["user_ids"]) == [str(user.pk)]
    before = len(rechecks())
    new = published.run(host_services.host_create, hostname="web-03")
    published.run(
        host_services.host_group_set_hosts,
        group_id=fleet.web.pk,
        host_ids=[fleet.id("web-01"), fleet.id("web-02"), str(new.pk)],
    )
    assert len(rechecks()) == before + 1
    assert rechecks()[-1]["user_ids"] is None
    # a group without grants changes no one's view
    published.run(host_services.host_group_set_hosts, group_id=fleet.db.pk, host_ids=[str(new.pk)])
    assert len(rechecks()) == before + 1


# -- fleet runs ----------------------------------------------------------------------------


def test_fleet_run_targets_are_what_the_requester_sees_and_runs_are_theirs(
    webops, fleet, make_user
):
    from hosts import fleetruns
    from hosts.fleetruns import parse_fleet_run
    from hosts.models import FleetRun

    # hosts matching a filter, some out of sight: only those seen are targets (and the
    # others are not even counted)
    spec = parse_fleet_run({"targets": {"filter": {"search": "-01"}}, "command": "uptime"})
    run = fleetruns.fleet_run_create(spec=spec, user=webops)
    assert list(run.hosts.values_list("hostname", flat=True)) == ["web-01"]
    hidden = parse_fleet_run({"targets": {"host_ids": [fleet.id("db-01")]}, "command": "uptime"})
    with pytest.raises(ValueError, match="name no host"):
        fleetruns.fleet_run_create(spec=hidden, user=webops)

    theirs = FleetRun.objects.create(kind="command", command="x", total=0, target={})
    listed = [r["run_id"] for r in rest(webops).get("/api/fleet-runs/").json()["results"]]
    assert listed == [str(run.id)]
    assert rest(webops).get(f"/api/fleet-runs/{theirs.id}/").status_code == 404
    everyone = rest(make_user("old-timer")).get("/api/fleet-runs/").json()["results"]
    assert {r["run_id"] for r in everyone} == {str(run.id), str(theirs.id)}


def test_fleet_run_progress_reaches_only_those_who_see_the_run():
    from sysmanage.topics import TOPICS, Viewer

    topic = TOPICS["command_execution"]
    progress = {"run_id": "r", "requested_by_id": "7", "results": [], "counts": {}}
    assert not topic.withholds(Viewer("7", scope=frozenset()), progress)  # the requester
    assert not topic.withholds(Viewer("8", scope=None), progress)  # sees every host
    assert topic.withholds(Viewer("8", scope=frozenset({"h"})), progress)
    assert not topic.withholds(Viewer("8", scope=frozenset()), {"host_id": "h"})
