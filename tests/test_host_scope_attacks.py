"""Scoped access under attack: what a user who sees only the hosts of one granted group
tries in order to learn of, or act on, the hosts out of sight, on the paths that
tests/test_host_scope.py does not walk (in-process)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from django.test import Client
from rest_framework.test import APIClient

from alerts import services as alert_services
from hosts import services as host_services
from hosts.models import HostStatus
from sysmanage import consumers, permissions, recheck
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.node import Node
from tests.conftest import PASSWORD
from tests.scopeutil import Fleet, give, quiet
from tests.wsutil import open_socket, request, subscribe_with_status

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


# -- the system_alerts snapshot ------------------------------------------------------------


async def test_the_alerts_snapshot_lists_only_alerts_of_hosts_in_sight(webops, fleet, token_for):
    """Alerts already open when a user subscribes: those of hosts out of sight stay out
    of the snapshot, as they stay out of the events and the REST list."""

    def raise_three():
        for title, host in (("seen", "web-01"), ("hidden", "db-01"), ("lonely", "lone-01")):
            alert_services.alert_raise(
                severity="critical", category="disk", title=title, host=fleet.hosts[host]
            )
        alert_services.alert_raise(severity="info", category="fleet", title="about no host")

    await database_sync_to_async(raise_three)()
    comm = await open_socket("/ws", token=token_for(webops))
    _, status = await subscribe_with_status(comm, "system_alerts")
    titles = {a["title"] for a in status["data"]["alerts"]}
    assert titles == {"seen", "about no host"}, status
    assert status["data"]["count"] == 2

    # with a severity filter too
    _, status = await subscribe_with_status(
        comm, "system_alerts", {"severity": ["critical"]}, id_="crit"
    )
    assert [a["title"] for a in status["data"]["alerts"]] == ["seen"], status

    # those who see every host still get them all
    staff = await database_sync_to_async(_make_staff)()
    everyone = await open_socket("/ws", token=token_for(staff))
    _, status = await subscribe_with_status(everyone, "system_alerts")
    assert {a["title"] for a in status["data"]["alerts"]} == {
        "seen",
        "hidden",
        "lonely",
        "about no host",
    }
    await comm.disconnect()
    await everyone.disconnect()


def _make_staff():
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user(
        username="staffer", password=PASSWORD, is_staff=True
    )


# -- pages ---------------------------------------------------------------------------------


def test_the_fleet_runs_page_counts_only_group_hosts_in_sight(webops, fleet, make_user):
    client = Client()
    assert client.login(username="webops", password=PASSWORD)
    page = client.get("/fleet-runs/")
    counts = {g.name: g.host_count for g in page.context["groups"]}
    assert counts == {"db": 0, "web": 2}, counts
    assert "db (1 host)" not in page.content.decode()

    make_user("old-timer")
    assert client.login(username="old-timer", password=PASSWORD)
    counts = {g.name: g.host_count for g in client.get("/fleet-runs/").context["groups"]}
    assert counts == {"db": 1, "web": 2}


# -- REST ----------------------------------------------------------------------------------


def test_raising_an_alert_answers_a_hidden_host_as_a_missing_one_however_it_is_spelt(
    make_user, fleet
):
    """The refusal echoes the id as it was sent, as the one for a host that does not
    exist does: in capitals or without dashes, a hidden host is not told apart."""
    raiser = make_user("raiser", every_host=False, perms=["alerts.add_alert"])
    give(fleet.web, user=raiser)
    client = APIClient()
    client.force_authenticate(raiser)
    body = {"severity": "info", "category": "x", "title": "t"}
    for spell in (str.upper, lambda s: s.replace("-", "")):
        hidden_id, missing_id = spell(fleet.id("db-01")), spell(str(uuid.uuid4()))
        hidden = client.post("/api/alerts/", {**body, "host": hidden_id}, format="json")
        missing = client.post("/api/alerts/", {**body, "host": missing_id}, format="json")
        assert hidden.status_code == missing.status_code == 400
        assert str(hidden.json()).replace(hidden_id, "X") == str(missing.json()).replace(
            missing_id, "X"
        ), (hidden.json(), missing.json())
    # with another field wrong too: the host is still refused alike
    bad = {**body, "severity": "bogus"}
    hidden_id, missing_id = fleet.id("db-01"), str(uuid.uuid4())
    hidden = client.post("/api/alerts/", {**bad, "host": hidden_id}, format="json")
    missing = client.post("/api/alerts/", {**bad, "host": missing_id}, format="json")
    assert hidden.status_code == missing.status_code == 400
    assert str(hidden.json()).replace(hidden_id, "X") == str(missing.json()).replace(
        missing_id, "X"
    ), (hidden.json(), missing.json())


def test_checking_for_updates_follows_the_grant_and_hides_hosts_out_of_sight(
    webops, fleet, make_user
):
    """A grant that lets its holder run commands lets them ask for an update check on
    its hosts; a host out of sight is answered as one that does not exist."""
    client = APIClient()
    client.force_authenticate(webops)
    ok = client.post(f"/api/hosts/{fleet.id('web-01')}/check-updates/")
    assert ok.status_code == 202, ok.json()
    hidden = client.post(f"/api/hosts/{fleet.id('db-01')}/check-updates/")
    missing = client.post(f"/api/hosts/{uuid.uuid4()}/check-updates/")
    assert hidden.status_code == missing.status_code == 404

    # seeing a host without the right there: refused, as before
    viewer = make_user("viewer", every_host=False)
    give(fleet.web, user=viewer)
    client.force_authenticate(viewer)
    assert client.post(f"/api/hosts/{fleet.id('web-01')}/check-updates/").status_code == 403


# -- a subscribe that races a grant taken away ----------------------------------------------


async def test_a_subscribe_read_before_a_grant_was_taken_away_does_not_outlive_it(
    make_user, fleet, token_for, monkeypatch
):
    """The subscribe reads the user's hosts; before it goes on, the grant is taken away
    and the recheck gives the socket its new (smaller) set.  The subscription must not
    then be made on the strength of the older read."""
    user = await database_sync_to_async(make_user)("racer", every_host=False)
    grant = await database_sync_to_async(give)(fleet.db, user=user)
    comm = await open_socket("/ws", token=token_for(user))

    read = asyncio.Event()
    go_on = asyncio.Event()
    real = consumers.database_sync_to_async

    def slowed(fn):
        wrapped = real(fn)
        if fn is not consumers._authorize_now:
            return wrapped

        async def call(*args, **kwargs):
            result = await wrapped(*args, **kwargs)
            read.set()
            await go_on.wait()
            return result

        return call

    monkeypatch.setattr(consumers, "database_sync_to_async", slowed)
    await comm.send_json_to(
        {
            "type": "subscribe",
            "channel": "host_status",
            "id": "late",
            "filters": {"host_id": fleet.id("db-01")},
        }
    )
    await asyncio.wait_for(read.wait(), 3)
    monkeypatch.setattr(consumers, "database_sync_to_async", real)
    await database_sync_to_async(host_services.host_group_grant_delete)(grant_id=grant.pk)
    await recheck.recheck(Node.current().hub)
    go_on.set()

    answer = await comm.receive_json_from(timeout=3)
    assert (answer["type"], answer["data"].get("code")) == ("error", "INVALID_FILTERS"), answer
    await database_sync_to_async(_set_status)(fleet.id("db-01"), HostStatus.ONLINE)
    assert await quiet(comm) == []
    await comm.disconnect()


def _set_status(host_id: str, status: str) -> None:
    host_services.host_set_status(host_id=host_id, status=status)


# -- fleet runs on the socket --------------------------------------------------------------


async def test_a_fleet_run_out_of_sight_is_answered_as_one_that_does_not_exist(
    webops, fleet, token_for
):
    """Subscribing with the id of someone else's run tells nothing more than with an id
    of no run."""
    from hosts.models import FleetRun

    theirs = await database_sync_to_async(FleetRun.objects.create)(
        kind="command", command="x", total=0, target={}
    )
    comm = await open_socket("/ws", token=token_for(webops))
    answers = []
    for run_id in (str(theirs.id), str(uuid.uuid4())):
        answer = await request(
            comm,
            {
                "type": "subscribe",
                "channel": "command_execution",
                "id": "run",
                "filters": {"run_id": run_id},
            },
        )
        answers.append((answer["type"], answer["data"].get("code"), answer["data"].get("message")))
        await quiet(comm)
    assert answers[0] == answers[1] == ("error", "INVALID_FILTERS", answers[1][2]), answers
    await comm.disconnect()


# -- package runs follow the grant's package flag --------------------------------------------


def test_a_package_fleet_run_needs_the_grants_package_flag_not_the_command_one(
    webops, fleet, make_user
):
    """One package operation needs a grant's "run package operations"; a fleet run of
    one does too (webops may run commands on the web hosts, not package operations)."""
    from hosts import fleetrunner, fleetruns
    from hosts.models import FleetRunKind

    body = {"targets": {"groups": ["web"]}, "operation": "install", "package": "htop"}
    spec = fleetruns.parse_fleet_run(body, FleetRunKind.PACKAGE)
    with pytest.raises(fleetruns.FleetRunRefused, match="package operations on 2 of the 2"):
        fleetruns.fleet_run_create(spec=spec, user=webops)
    client = APIClient()
    client.force_authenticate(webops)
    refused = client.post("/api/fleet-runs/", {**body, "kind": "package"}, format="json")
    assert refused.status_code == 403, refused.json()
    assert not fleetrunner._still_allowed(webops, fleet.id("web-01"), "run_package_operation")

    packager = make_user("packager", every_host=False)
    give(fleet.web, user=packager, can_run_package_operations=True)
    run = fleetruns.fleet_run_create(spec=spec, user=packager)
    assert run.total == 2
    assert fleetrunner._still_allowed(packager, fleet.id("web-01"), "run_package_operation")
    command = fleetruns.parse_fleet_run({"targets": {"groups": ["web"]}, "command": "uptime"})
    with pytest.raises(fleetruns.FleetRunRefused, match="run commands on 2 of the 2"):
        fleetruns.fleet_run_create(spec=command, user=packager)


async def test_a_resume_whose_grant_is_taken_away_while_history_is_read_replays_nothing(
    make_user, fleet, token_for, monkeypatch
):
    """A subscribe with ``since`` reads the channel's history; the grant of its host is
    taken away meanwhile.  The missed events of that host must not follow."""
    user = await database_sync_to_async(make_user)("resumer", every_host=False)
    grant = await database_sync_to_async(give)(fleet.db, user=user)
    comm = await open_socket("/ws", token=token_for(user))
    filters = {"host_id": fleet.id("db-01")}
    reply = await request(
        comm, {"type": "subscribe", "channel": "system_alerts", "id": "s", "filters": filters}
    )
    since = reply["data"]["position"]
    await quiet(comm)  # the snapshot
    await database_sync_to_async(alert_services.alert_raise)(
        severity="critical", category="disk", title="missed", host=fleet.hosts["db-01"]
    )
    await quiet(comm)

    hub = Node.current().hub
    reading, go_on = asyncio.Event(), asyncio.Event()
    real = hub.history.read_after

    async def slowed(channel, position):
        history = await real(channel, position)
        reading.set()
        await go_on.wait()
        return history

    monkeypatch.setattr(hub.history, "read_after", slowed)
    await comm.send_json_to(
        {
            "type": "subscribe",
            "channel": "system_alerts",
            "id": "again",
            "filters": filters,
            "since": since,
        }
    )
    await asyncio.wait_for(reading.wait(), 3)
    await database_sync_to_async(host_services.host_group_grant_delete)(grant_id=grant.pk)
    await recheck.recheck(hub)
    go_on.set()
    got = await quiet(comm, 0.5)
    assert not any(m["type"] == "event" for m in got), got
    assert "missed" not in str(got), got
    assert got[-1]["data"].get("code") == "INVALID_FILTERS", got
    await comm.disconnect()


# -- changes that narrow a user's hosts ask every process for a recheck -----------------------


def test_every_change_that_narrows_a_users_hosts_asks_for_a_recheck(make_user, fleet, published):
    """Deleting a granted group, a host leaving it from either side, the user leaving the
    Django group a grant names, that Django group deleted: each asks the processes to
    recheck the sockets concerned (after commit)."""
    from django.contrib.auth.models import Group

    def rechecks() -> int:
        return sum(1 for m in published.messages if m.get("action") == "recheck_users")

    user = make_user("narrowed", every_host=False)
    dba = Group.objects.create(name="dba")
    published.run(user.groups.add, dba)
    published.run(give, fleet.db, user_group=dba)
    published.run(give, fleet.web, user=user)
    assert permissions.host_scope(user) == {fleet.id(n) for n in ("web-01", "web-02", "db-01")}

    steps = [
        (lambda: fleet.hosts["web-02"].groups.remove(fleet.web), {"web-01", "db-01"}),
        (lambda: fleet.web.hosts.remove(fleet.hosts["web-01"]), {"db-01"}),
        (lambda: fleet.hosts["web-01"].groups.add(fleet.web), {"web-01", "db-01"}),
        (lambda: fleet.hosts["web-01"].groups.clear(), {"db-01"}),
        (lambda: user.groups.remove(dba), set()),
        (lambda: user.groups.add(dba), {"db-01"}),
        (lambda: dba.delete(), set()),
    ]
    for change, sees in steps:
        before = rechecks()
        published.run(change)
        assert rechecks() > before, change
        assert permissions.host_scope(user) == {fleet.id(n) for n in sees}

    published.run(give, fleet.db, user=user)
    before = rechecks()
    published.run(host_services.host_group_delete, group_id=fleet.db.pk)
    assert rechecks() > before
    assert permissions.host_scope(user) == frozenset()
