"""Channel handlers: filters, matching, payload shaping, permissions."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest

from sysmanage.protocol import ErrorCode, ProtocolError
from sysmanage.topics import TOPICS, get_topic

HOST = str(uuid.uuid4())


def user(staff=False, active=True, authenticated=True, superuser=False, perms=()):
    return SimpleNamespace(
        is_staff=staff,
        is_active=active,
        is_authenticated=authenticated,
        is_superuser=superuser,
        has_perm=lambda perm: perm in perms,
    )


def test_the_seven_channels_exist():
    assert set(TOPICS) == {
        "host_status",
        "package_operations",
        "command_execution",
        "system_alerts",
        "user_activity",
        "host_metrics",
        "fleet_status",
    }


def test_unknown_channel_is_refused_with_the_list():
    with pytest.raises(ProtocolError) as caught:
        get_topic("bogus", "r")
    assert caught.value.code == ErrorCode.UNKNOWN_CHANNEL
    assert "host_status" in caught.value.extra["available_channels"]


def test_user_activity_needs_staff_and_the_view_permission():
    topic = TOPICS["user_activity"]
    reader = ("activity.view_useractivity",)
    assert topic.authorize(user(staff=True, perms=reader)) is None
    assert topic.authorize(user(staff=True, superuser=True)) is None
    refused = "Insufficient permissions for channel 'user_activity'"
    assert topic.authorize(user()) == refused
    assert topic.authorize(user(staff=True)) == refused  # the flag alone
    assert topic.authorize(user(perms=reader)) == refused  # the permission alone
    assert topic.authorize(user(staff=True, active=False, perms=reader)) is not None


@pytest.mark.parametrize("channel", ["host_metrics", "package_operations"])
def test_host_id_is_required_where_the_channel_is_per_host(channel):
    with pytest.raises(ProtocolError) as caught:
        TOPICS[channel].clean_filters({}, None)
    assert caught.value.code == ErrorCode.INVALID_FILTERS


@pytest.mark.parametrize(
    ("channel", "filters"),
    [
        ("host_status", {"host_id": "nope"}),
        ("host_status", {"hostid": HOST}),
        ("system_alerts", {"severity": "critical"}),
        ("system_alerts", {"severity": []}),
        ("system_alerts", {"severity": ["urgent"]}),
        ("host_metrics", {"host_id": HOST, "metrics": ["cpu", "gpu"]}),
        ("fleet_status", {"host_id": HOST}),
    ],
)
def test_malformed_filters_are_refused(channel, filters):
    with pytest.raises(ProtocolError) as caught:
        TOPICS[channel].clean_filters(filters, "q")
    assert caught.value.code == ErrorCode.INVALID_FILTERS
    assert caught.value.id == "q"
    assert caught.value.channel == "subscription"


def test_uuid_filters_are_normalized():
    cleaned = TOPICS["host_status"].clean_filters({"host_id": HOST.upper()}, None)
    assert cleaned == {"host_id": HOST}


def test_severity_filter_matches_only_listed_severities():
    topic = TOPICS["system_alerts"]
    filters = topic.clean_filters({"severity": ["warning", "critical"]}, None)
    assert topic.matches(filters, {"severity": "critical"})
    assert not topic.matches(filters, {"severity": "info"})
    assert topic.matches({}, {"severity": "info"})


def test_host_filter_matches_only_that_host():
    topic = TOPICS["command_execution"]
    assert topic.matches({"host_id": HOST}, {"host_id": HOST})
    assert not topic.matches({"host_id": HOST}, {"host_id": str(uuid.uuid4())})
    assert topic.matches({}, {"host_id": HOST})


def test_metrics_filter_delivers_only_the_named_metrics():
    topic = TOPICS["host_metrics"]
    filters = topic.clean_filters({"host_id": HOST, "metrics": ["disk", "cpu"]}, None)
    data = {
        "host_id": HOST,
        "metrics": {
            "cpu_usage": 1.0,
            "memory_usage": 2.0,
            "disk_usage": {"/": 3.0},
            "load_average": [1, 2, 3],
        },
    }
    rendered = topic.render(filters, data)
    assert rendered["metrics"] == {"cpu_usage": 1.0, "disk_usage": {"/": 3.0}}
    assert data["metrics"]["memory_usage"] == 2.0  # the shared payload is untouched
    assert topic.variant(filters) == ("cpu", "disk")
    assert topic.render({"host_id": HOST}, data) is data
