"""
``GET /metrics`` on real servers: Prometheus text, every name ``sysmanage_``, served only
to loopback or to the bearer of ``METRICS_TOKEN``, figures that follow what happens, and
every metric the Grafana dashboard in ``deploy/grafana`` and the alerting rules in
``deploy/prometheus`` use present.  The rules are also checked by Prometheus's
``promtool`` (``scripts/test`` installs Debian's ``prometheus`` package, which has it):
``check rules`` parses every expression and template, and ``test rules`` runs the
scenarios of ``alert_rules_scenarios.yml``, an alert firing on what it is meant to catch
and staying quiet on what it must not page for.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration import harness
from tests.integration.client import api, http_request, ws_connect

pytestmark = pytest.mark.integration

DASHBOARD = harness.REPO_ROOT / "deploy" / "grafana" / "sysmanage-dashboard.json"
ALERT_RULES = harness.REPO_ROOT / "deploy" / "prometheus" / "sysmanage-alerts.yml"
SCENARIOS = Path(__file__).with_name("alert_rules_scenarios.yml")
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


def names_in(text: str) -> set[str]:
    """The ``sysmanage_`` metric names that ``text`` (queries) mentions."""
    return set(re.findall(r"\bsysmanage_[a-z0-9_]+", text))


def not_served(queried: Iterable[str], served: dict[str, str]) -> list[str]:
    """The names of ``queried`` whose family ``served`` lacks."""
    return sorted(q for q in queried if base_name(q) not in served and q not in served)


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of the rules file."""
    loaded = yaml.safe_load(ALERT_RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


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
        assert sample(text, "sysmanage_alerts_active", severity="critical") >= 1
        assert sample(text, "sysmanage_alerts_open", severity="critical") >= 1
        assert sample(text, "sysmanage_channel_layer_up") == 1
        assert sample(text, "sysmanage_database_up") == 1
        assert sample(text, "sysmanage_db_pool_connections") >= 1
        # read back from the alert's stream in Redis, with its lag
        assert sample(text, "sysmanage_layer_receive_lag_seconds_count") >= 1
    text = scrape()
    assert sample(text, "sysmanage_sockets_closed_total", kind="client", code="1000") >= 1
    names = families(text)
    assert names
    assert all(name.startswith("sysmanage_") for name in names), sorted(names)
    queried = names_in(DASHBOARD.read_text())
    assert queried
    missing = not_served(queried, names)
    assert not missing, f"the dashboard queries metrics this server does not serve: {missing}"
    assert json.loads(DASHBOARD.read_text())["panels"]
    used = names_in("\n".join(rule["expr"] for rule in alert_rules()))
    assert "sysmanage_database_up" in used
    missing = not_served(used, names)
    assert not missing, f"the alerting rules use metrics this server does not serve: {missing}"


def test_every_alert_rule_is_complete():
    rules = alert_rules()
    assert len(rules) >= 12
    names = [rule.get("alert") for rule in rules]
    assert len(set(names)) == len(names), names
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"Sysmanage[A-Za-z]+", rule["alert"]), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule
        assert rule["labels"]["severity"] in ("critical", "warning"), rule
        assert set(rule["annotations"]) == {"summary", "description"}, rule
        assert all(text.strip() for text in rule["annotations"].values()), rule
    # the job name docs/operations.md tells operators to scrape under
    assert any('up{job="sysmanage"}' in rule["expr"] for rule in rules)
    # every alert is documented, under its own name
    operations = (harness.REPO_ROOT / "docs" / "operations.md").read_text()
    undocumented = [name for name in names if f"`{name}`" not in operations]
    assert not undocumented, undocumented


def promtool() -> str:
    """Prometheus's promtool; skipped (failed when ``CI`` is set) if it is not installed."""
    found = shutil.which("promtool")
    if found is None:
        reason = "promtool is not installed (scripts/test installs Debian's prometheus package)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this is a failure", pytrace=False)
        pytest.skip(reason)
    return found


def test_promtool_checks_the_rules_and_runs_their_scenarios(tmp_path):
    binary = promtool()
    checked = subprocess.run(
        [binary, "check", "rules", str(ALERT_RULES)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout, checked.stdout
    # promtool compares an alert's annotations whole: the scenarios run without them
    loaded = yaml.safe_load(ALERT_RULES.read_text())
    for group in loaded["groups"]:
        for rule in group["rules"]:
            del rule["annotations"]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(loaded))
    shutil.copy(SCENARIOS, tmp_path / SCENARIOS.name)
    tested = subprocess.run(
        [binary, "test", "rules", str(tmp_path / SCENARIOS.name)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    covered = set(re.findall(r"alertname: (\w+)", SCENARIOS.read_text()))
    assert covered == {rule["alert"] for rule in alert_rules()}, covered
