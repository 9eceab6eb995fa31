"""The fleet run pages: the list with its form, one run with its hosts, and the way to
them from a group's hosts page."""

from __future__ import annotations

import pytest

from hosts import fleetruns
from hosts import services as host_services
from hosts.fleetruns import parse_fleet_run

pytestmark = pytest.mark.django_db


@pytest.fixture
def run(make_user):
    group = host_services.host_group_create(name="web")
    for i in range(3):
        host_services.host_create(hostname=f"web-{i}", groups=[group])
    owner = make_user("root", superuser=True)
    spec = parse_fleet_run(
        {"targets": {"groups": ["web"]}, "command": "secret-cmd", "failure_limit": "50%"}
    )
    return fleetruns.fleet_run_create(spec=spec, user=owner)


def test_the_list_offers_the_groups_and_shows_the_latest_runs(client, run):
    client.force_login(run.requested_by)
    page = client.get("/fleet-runs/?group=WEB").content.decode()
    assert '<option value="web" selected>web (3 hosts)</option>' in page
    assert f'href="/fleet-runs/{run.id}/"' in page
    assert "secret-cmd" in page
    assert 'src="/static/js/pages/fleet-runs.js"' in page


def test_one_run_shows_its_hosts_and_hides_the_command_from_others(client, run, make_user):
    client.force_login(run.requested_by)
    page = client.get(f"/fleet-runs/{run.id}/").content.decode()
    assert "secret-cmd" in page
    assert page.count('data-status="queued"') == 3
    assert "50%" in page
    other = make_user("other")
    client.force_login(other)
    page = client.get(f"/fleet-runs/{run.id}/").content.decode()
    assert "secret-cmd" not in page
    assert "web-2" in page
    listed = client.get("/fleet-runs/").content.decode()
    assert "secret-cmd" not in listed
    assert "(hidden)" in listed
    assert 'id="fleet-run-form"' in listed
    assert "You may not run commands on hosts" in listed


def test_a_groups_hosts_page_leads_to_a_run_on_it(client, run, make_user):
    client.force_login(run.requested_by)
    page = client.get("/hosts/?group=web").content.decode()
    assert 'href="/fleet-runs/?group=web"' in page
    page = client.get("/hosts/?group=web&q=b-1").content.decode()
    assert 'href="/fleet-runs/?group=web&amp;q=b-1"' in page
    assert "/fleet-runs/?" not in client.get("/hosts/?q=nothing-matches").content.decode()
    listed = client.get("/fleet-runs/?group=web&q=b-1").content.decode()
    assert 'value="b-1"' in listed
    client.force_login(make_user("other"))
    assert 'href="/fleet-runs/?group=web"' not in client.get("/hosts/?group=web").content.decode()
