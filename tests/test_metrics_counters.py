"""The counters behind /metrics: what they count, and that agents cannot grow them."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from django.db import ProgrammingError
from prometheus_client import generate_latest

from sysmanage import dbgate, metrics

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fresh_counts(monkeypatch):
    monkeypatch.setattr(metrics, "_agent_messages", metrics.Counter())
    monkeypatch.setattr(metrics, "_closed", metrics.Counter())


def scraped() -> str:
    return generate_latest(metrics.REGISTRY).decode()


def test_agent_messages_are_counted_by_kind_and_type():
    for _ in range(3):
        metrics.agent_message("agent", "metrics")
    metrics.agent_message("sysmanage_agent", "heartbeat")
    text = scraped()
    assert 'sysmanage_agent_messages_total{kind="agent",type="metrics"} 3.0' in text
    assert 'sysmanage_agent_messages_total{kind="sysmanage_agent",type="heartbeat"} 1.0' in text


def test_invented_message_types_cannot_grow_the_series_without_end():
    for index in range(metrics.MAX_MESSAGE_TYPES * 3):
        metrics.agent_message("sysmanage_agent", f"invented_{index}")
    series = re.findall(r"^sysmanage_agent_messages_total\{.*$", scraped(), flags=re.MULTILINE)
    assert len(series) == metrics.MAX_MESSAGE_TYPES + 1  # the first ones, then "other"
    assert any('type="other"' in line for line in series)


def test_refused_frames_by_kind_and_reason(monkeypatch):
    monkeypatch.setattr(metrics, "_refused", metrics.Counter())
    metrics.frame_refused("agent", "too_large")
    metrics.frame_refused("client", "rate")
    metrics.frame_refused("client", "rate")
    text = scraped()
    assert 'sysmanage_frames_refused_total{kind="agent",reason="too_large"} 1.0' in text
    assert 'sysmanage_frames_refused_total{kind="client",reason="rate"} 2.0' in text
    assert "sysmanage_db_calls_queued 0.0" in text


def test_sockets_closed_by_code():
    metrics.socket_closed("client", 4008)
    metrics.socket_closed("client", None)  # no code in the close: 1005, as RFC 6455 says
    text = scraped()
    assert 'sysmanage_sockets_closed_total{code="4008",kind="client"} 1.0' in text
    assert 'sysmanage_sockets_closed_total{code="1005",kind="client"} 1.0' in text


class FakeHub:
    def __init__(self):
        client = type("Conn", (), {"auth_via": "header"})()
        agent = type("Agent", (), {"metric_kind": "sysmanage_agent"})()
        self.clients = {client}
        self.agents = {"h1": agent}
        self.subscriptions = {"host_status": {client: {}}}
        self.stats = {"events": 7}
        self.deliveries = {"host_status": 5}

    def connections(self):
        return self.clients


class FakeNode:
    hub = FakeHub()
    layer_down_since = None
    publish_failures = 2

    def inbox_depth(self):
        return 3


def test_live_figures_come_from_the_node(monkeypatch):
    monkeypatch.setattr(metrics, "_node_source", FakeNode)
    text = scraped()
    assert 'sysmanage_sockets_open{auth="header",kind="client"} 1.0' in text
    assert 'sysmanage_sockets_open{auth="token",kind="sysmanage_agent"} 1.0' in text
    assert 'sysmanage_subscriptions{channel="host_status"} 1.0' in text
    assert 'sysmanage_event_deliveries_total{channel="host_status"} 5.0' in text
    assert "sysmanage_events_dispatched_total 7.0" in text
    assert "sysmanage_hub_inbox_depth 3.0" in text
    assert "sysmanage_channel_layer_up 1.0" in text
    assert "sysmanage_publish_failures_total 2.0" in text
    assert 'sysmanage_hosts{status="unknown"}' in text  # the apps' figures, from the database


def test_metrics_are_served_to_loopback_or_the_token_only(rf, settings):
    settings.METRICS_TOKEN = ""
    assert metrics.metrics_view(rf.get("/metrics", REMOTE_ADDR="127.0.0.1")).status_code == 200
    assert metrics.metrics_view(rf.get("/metrics", REMOTE_ADDR="10.1.2.3")).status_code == 403
    assert metrics.metrics_view(rf.get("/metrics", REMOTE_ADDR="bogus")).status_code == 403
    settings.METRICS_TOKEN = "t0ken-for-scrapes"
    assert metrics.metrics_view(rf.get("/metrics", REMOTE_ADDR="127.0.0.1")).status_code == 403
    granted = rf.get(
        "/metrics", REMOTE_ADDR="10.1.2.3", HTTP_AUTHORIZATION="Bearer t0ken-for-scrapes"
    )
    assert metrics.metrics_view(granted).status_code == 200


def test_request_durations_are_observed_by_view(client):
    client.get("/healthz")
    assert 'sysmanage_http_request_duration_seconds_count{method="GET",view="health"}' in scraped()
    metrics.round_trip("command", "completed", 1.5)
    assert (
        'sysmanage_operation_round_trip_seconds_count{kind="command",status="completed"}'
        in scraped()
    )


def test_database_up_follows_the_process_gate(monkeypatch):
    assert "sysmanage_database_up 1.0" in scraped()
    monkeypatch.setattr(dbgate.gate(), "down_since_wall", datetime.now(UTC))
    assert "sysmanage_database_up 0.0" in scraped()


def test_figures_the_database_cannot_give_are_left_out_and_read_again(monkeypatch):
    answers: list[object] = [dbgate.DatabaseUnavailable("away"), {"online": 3}]

    def read() -> dict[str, int]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, dict)
        return answer

    monkeypatch.setattr(metrics, "_figures", [("sysmanage_test_hosts", "Test.", "status", read)])
    collector = metrics.DatabaseCollector(ttl=60)
    assert [m.name for m in collector.collect()] == []  # no figures, no stale ones, no error
    served = list(collector.collect())  # read again at once, not after the ttl
    assert [(m.name, m.samples[0].value) for m in served] == [("sysmanage_test_hosts", 3)]


def test_a_database_error_that_is_a_bug_still_fails_the_scrape(monkeypatch):
    def read() -> dict[str, int]:
        raise ProgrammingError("no such column")

    monkeypatch.setattr(metrics, "_figures", [("sysmanage_test_hosts", "Test.", "status", read)])
    with pytest.raises(ProgrammingError):
        list(metrics.DatabaseCollector().collect())


@pytest.mark.django_db
def test_open_alerts_leave_out_the_acknowledged_ones():
    from alerts.models import Alert, AlertStatus
    from alerts.selectors import alert_severity_counts

    for status in (AlertStatus.OPEN, AlertStatus.ACKNOWLEDGED, AlertStatus.RESOLVED):
        Alert.objects.create(severity="critical", category="disk_space", title="x", status=status)
    assert alert_severity_counts()["critical"] == 2  # open or acknowledged
    assert alert_severity_counts((AlertStatus.OPEN,))["critical"] == 1
