"""The counters behind /metrics: what they count, and that agents cannot grow them."""

from __future__ import annotations

import re

import pytest
from prometheus_client import generate_latest

from sysmanage import metrics

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
