"""Fleet runs over REST (``/api/fleet-runs/``) and in the admin."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from hosts import fleetruns
from hosts import services as host_services
from hosts.fleetruns import parse_fleet_run

pytestmark = pytest.mark.django_db


@pytest.fixture
def web(db):
    """Group ``web`` of five hosts."""
    group = host_services.host_group_create(name="web")
    return [host_services.host_create(hostname=f"web-{i}", groups=[group]) for i in range(5)]


def test_rest_lists_runs_and_shows_one_with_its_hosts(web, make_user):
    owner = make_user("root", superuser=True)
    other = make_user("other")
    spec = parse_fleet_run({"targets": {"groups": ["web"]}, "command": "secret"})
    run = fleetruns.fleet_run_create(spec=spec, user=owner)
    client = APIClient()
    client.force_authenticate(owner)
    listed = client.get("/api/fleet-runs/").json()
    assert listed["results"][0]["run_id"] == str(run.id)
    assert listed["results"][0]["command"] == "secret"
    shown = client.get(f"/api/fleet-runs/{run.id}/").json()
    assert [h["hostname"] for h in shown["hosts"]] == [f"web-{i}" for i in range(5)]
    assert shown["counts"]["queued"] == 5
    client.force_authenticate(other)
    shown = client.get(f"/api/fleet-runs/{run.id}/").json()
    assert shown["command"] is None
    assert shown["redacted"] is True
    assert client.get("/api/fleet-runs/nope/").status_code == 404
    refused = client.post(
        "/api/fleet-runs/", {"targets": {"groups": ["web"]}, "command": "x"}, format="json"
    )
    assert refused.status_code == 403
    assert refused.json()["refused"] == 5
    bad = client.post("/api/fleet-runs/", {"command": "x"}, format="json")
    assert bad.status_code == 400


def test_rest_refuses_a_run_over_the_users_running_limit(web, make_user, settings):
    settings.FLEET_RUNS_MAX_RUNNING_PER_USER = 1
    owner = make_user("root", superuser=True)
    fleetruns.fleet_run_create(
        spec=parse_fleet_run({"targets": {"groups": ["web"]}, "command": "x"}), user=owner
    )
    client = APIClient()
    client.force_authenticate(owner)
    refused = client.post(
        "/api/fleet-runs/", {"targets": {"groups": ["web"]}, "command": "y"}, format="json"
    )
    assert refused.status_code == 429
    assert refused.json() == {
        "detail": "You already have the most fleet runs running at once (1); "
        "start this one once one of them has ended",
        "limit": 1,
    }


def test_the_admin_lists_runs_and_shows_each_host_read_only(web, make_user, client):
    owner = make_user("root", superuser=True)
    spec = parse_fleet_run({"targets": {"groups": ["web"]}, "command": "secret-cmd"})
    run = fleetruns.fleet_run_create(spec=spec, user=owner)
    client.force_login(owner)
    listed = client.get("/admin/hosts/fleetrun/")
    assert listed.status_code == 200
    assert str(run) in listed.content.decode()
    page = client.get(f"/admin/hosts/fleetrun/{run.id}/change/").content.decode()
    assert "secret-cmd" in page
    assert "web-4" in page
    assert client.get("/admin/hosts/fleetrun/add/").status_code == 403
    staff = make_user("staff", staff=True, perms=["hosts.view_fleetrun"])
    client.force_login(staff)
    page = client.get(f"/admin/hosts/fleetrun/{run.id}/change/").content.decode()
    assert "web-4" in page
    assert "secret-cmd" not in page
