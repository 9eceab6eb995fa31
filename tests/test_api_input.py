"""What the REST API accepts: checked filters, bounded pages, bounded JSON, errors in words.

In-process; ``tests/integration/test_security_http.py`` sends the same to a real server.
"""

from __future__ import annotations

import json

import pytest
from rest_framework.test import APIClient

from hosts import services as host_services
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(make_user):
    make_user("boss", superuser=True)
    client = APIClient()
    access = client.post(
        "/api/token/", {"username": "boss", "password": PASSWORD}, format="json"
    ).data["access"]
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {access}")
    return client


BAD_FILTERS = [
    ("/api/commands/?host=abc", "host"),
    ("/api/package-operations/?host=1", "host"),
    ("/api/package-operations/?status=exploded", "status"),
    ("/api/commands/?status=nope", "status"),
    ("/api/alerts/?host=zzz", "host"),
    ("/api/alerts/?severity=warning,apocalyptic", "severity"),
    ("/api/alerts/?status=open,gone", "status"),
    ("/api/activity/?since=notadate", "since"),
    ("/api/activity/?until=2024-13-45", "until"),
    ("/api/activity/?user=42", "user"),
    ("/api/activity/?ip_address=999.1.1.1", "ip_address"),
    ("/api/activity/?username=" + "x" * 151, "username"),
    ("/api/hosts/?status=sleeping", "status"),
    ("/api/hosts/?search=a%00b", "search"),
    ("/api/registrations/?status=maybe", "status"),
]


@pytest.mark.parametrize(("path", "param"), BAD_FILTERS)
def test_bad_filters_are_400_with_words(staff, path, param):
    response = staff.get(path)
    assert response.status_code == 400, (path, response.status_code)
    assert param in response.data["detail"]
    assert param in response.data["errors"]


def test_good_filters_still_filter(staff):
    host = host_services.host_create(hostname="web-01")
    other = host_services.host_create(hostname="db-01")
    host_services.command_create(host=host, command="uptime", timeout=5, user=None)
    host_services.command_create(host=other, command="df", timeout=5, user=None)
    listed = staff.get(f"/api/commands/?host={host.id}&status=pending").data["results"]
    assert [c["command"] for c in listed] == ["uptime"]
    assert staff.get("/api/alerts/?severity=warning,critical&status=open").status_code == 200
    assert (
        staff.get(
            "/api/activity/?since=2000-01-01T00:00:00Z&ip_address=::1&"
            "user=00000000-0000-0000-0000-000000000000"
        ).status_code
        == 200
    )
    # empty parameters mean no filter, as before
    assert len(staff.get("/api/commands/?host=&status=").data["results"]) == 2


@pytest.mark.parametrize(
    "query",
    [
        "limit=abc",
        "limit=-1",
        "offset=-5",
        "offset=1e3",
        "offset=99999999999999999999",
        "limit=１０",
    ],
)
def test_bad_pagination_parameters_are_400(staff, query):
    response = staff.get(f"/api/hosts/?{query}")
    assert response.status_code == 400, query
    assert "whole number" in response.data["detail"]


def test_pages_are_capped(staff, settings):
    settings.API_MAX_PAGE_SIZE = 3
    for n in range(5):
        host_services.host_create(hostname=f"h-{n}")
    page = staff.get("/api/hosts/?limit=100000").data
    assert (page["count"], len(page["results"])) == (5, 3)
    assert "limit=3" in page["next"]
    assert len(staff.get("/api/hosts/?limit=2").data["results"]) == 2


def test_the_schema_states_the_cap(staff):
    schema = staff.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").data
    parameters = schema["paths"]["/api/hosts/"]["get"]["parameters"]
    limit = next(p for p in parameters if p["name"] == "limit")
    assert limit["schema"]["maximum"] == 500


def nested(depth):
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("path", ["/api/token/", "/api/token/refresh/", "/api/alerts/"])
@pytest.mark.parametrize(
    "body",
    [
        nested(65),
        nested(100_000),
        '{"a":' * 5000 + "1" + "}" * 5000,
        '{"username": ' + nested(70) + ', "password": "x"}',
    ],
)
def test_json_nested_too_deep_is_400(staff, path, body):
    response = staff.post(path, body, content_type="application/json")
    assert response.status_code == 400, path
    assert "nested deeper than 64" in response.data["detail"]


def test_json_within_the_depth_is_parsed(staff):
    body = json.dumps({"username": "x", "password": "y", "extra": json.loads(nested(60))})
    assert APIClient().post("/api/token/", body, content_type="application/json").status_code == 401


def test_field_errors_gain_a_detail_and_keep_their_keys(staff):
    response = staff.post(
        "/api/alerts/", {"severity": "doom", "category": "x", "title": "t"}, format="json"
    )
    assert response.status_code == 400
    assert "severity" in response.data
    assert response.data["detail"].startswith("Invalid input: severity:")


def test_non_uuid_alert_actions_are_404_not_500(staff):
    for action in ("acknowledge", "resolve"):
        assert staff.post(f"/api/alerts/abc/{action}/").status_code == 404


def test_lists_carry_outputs_in_short_and_one_item_whole(staff):
    host = host_services.host_create(hostname="web-01")
    big = "x" * 300_000 + "END"
    execution = host_services.command_create(host=host, command="cat big", timeout=5, user=None)
    host_services.command_finish(
        execution=execution,
        status="completed",
        exit_code=0,
        stdout=big,
        stderr="warn",
        error="e" * 5000,
    )
    operation = host_services.package_operation_create(
        host=host, operation="install", package="nginx", user=None
    )
    host_services.package_operation_update(
        operation=operation, status="completed", progress=100, output=big
    )
    (listed,) = staff.get("/api/commands/").data["results"]
    assert "stdout" not in listed
    assert "stderr" not in listed
    assert (listed["stdout_length"], listed["stderr_length"]) == (len(big), 4)
    assert listed["stdout_preview"] == big[:200]
    assert listed["stderr_preview"] == "warn"
    assert len(listed["error"]) == 1000
    whole = staff.get(f"/api/commands/{execution.id}/").data
    assert (whole["stdout"], len(whole["error"])) == (big, 5000)
    (listed_op,) = staff.get("/api/package-operations/").data["results"]
    assert "output" not in listed_op
    assert (listed_op["output_length"], listed_op["output_preview"]) == (len(big), big[:200])
    assert staff.get(f"/api/package-operations/{operation.id}/").data["output"] == big
