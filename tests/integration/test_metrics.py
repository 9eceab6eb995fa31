"""
``GET /metrics`` on real servers: Prometheus text, every name ``sysmanage_``, served only
to loopback or to the bearer of ``METRICS_TOKEN``, figures that follow what happens, and
every metric the Grafana dashboard in ``deploy/grafana`` queries present.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration import harness
from tests.integration.client import api, http_request, ws_connect

pytestmark = pytest.mark.integration

DASHBOARD = harness.REPO_ROOT / "deploy" / "grafana" / "sysmanage-dashboard.json"
#: Suffixes Prometheus adds to a family's name in samples and queries.
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def families(text: str) -> dict[str, str]:
    """Family name -> type, from the ``# TYPE`` lines."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name{labels}`` (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if line.split("{")[0].split(" ")[0] == name and all(
            found.get(k) == v for k, v in labels.items()
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def base_name(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@pytest.fixture(scope="module")
def guarded(launch_sqlite: Any) -> Iterator[harness.Deployment]:
    with launch_sqlite("metrics-token", METRICS_TOKEN="scrape-me-please-0123456789") as d:
        yield d


async def test_a_token_guards_metrics_when_set(guarded):
    base = guarded.server.base_url
    assert (await api("GET", base, "/metrics")).status == 403  # loopback is not enough
    wrong = await api("GET", base, "/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 403
    right = await api(
        "GET", base, "/metrics", headers={"Authorization": "Bearer scrape-me-please-0123456789"}
    )
    assert right.status == 200


async def test_metrics_follow_what_happens_and_cover_the_dashboard(pg_redis_cluster):
    d = pg_redis_cluster
    base = d.server.base_url
    token = d.token("admin")

    def scrape() -> str:
        response = http_request("GET", f"{base}/metrics", headers={"Accept": "text/plain"})
        assert response.status == 200, response.status
        text = response.body
        assert isinstance(text, str), text  # not JSON: the text format
        return text

    async with ws_connect(d.server.ws_url, token=token) as client:
        await client.subscribe("system_alerts")
        raised = await api(
            "POST",
            base,
            "/api/alerts/",
            token=token,
            json_body={"severity": "critical", "category": "disk_space", "title": "metrics"},
        )
        assert raised.status == 201
        await client.next_event("system_alerts")
        text = scrape()
        assert sample(text, "sysmanage_sockets_open", kind="client", auth="query") >= 1
        assert sample(text, "sysmanage_subscriptions", channel="system_alerts") >= 1
        assert sample(text, "sysmanage_events_published_total", channel="system_alerts") >= 1
        assert sample(text, "sysmanage_event_deliveries_total", channel="system_alerts") >= 1
        assert sample(text, "sysmanage_alerts_active", severity="critical") >= 0
        assert sample(text, "sysmanage_channel_layer_up") == 1
        assert sample(text, "sysmanage_db_pool_connections") >= 1
        # read back from the alert's stream in Redis, with its lag
        assert sample(text, "sysmanage_layer_receive_lag_seconds_count") >= 1
    text = scrape()
    assert sample(text, "sysmanage_sockets_closed_total", kind="client", code="1000") >= 1
    names = families(text)
    assert names
    assert all(name.startswith("sysmanage_") for name in names), sorted(names)
    queried = set(re.findall(r"\bsysmanage_[a-z0-9_]+", DASHBOARD.read_text()))
    assert queried
    missing = sorted(q for q in queried if base_name(q) not in names and q not in names)
    assert not missing, f"the dashboard queries metrics this server does not serve: {missing}"
    assert json.loads(DASHBOARD.read_text())["panels"]
