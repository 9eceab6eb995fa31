"""Every service that publishes: how many events it sends, and that each validates."""

from __future__ import annotations

import dataclasses

import pytest
from django.utils import timezone

from activity.services import activity_record
from alerts import services as alerts
from hosts import services as hosts
from hosts.models import ExecutionStatus, HostStatus, OperationStatus
from sysmanage.audit import Actor
from sysmanage.events import event_types

pytestmark = pytest.mark.django_db


def assert_valid(message):
    """The payload has exactly the fields of its registered event type."""
    cls = event_types()[message["event"]]
    assert message["channel"] == cls.channel
    assert set(message["data"]) == {f.name for f in dataclasses.fields(cls)}
    assert message["timestamp"].endswith("Z")


@pytest.fixture
def host(db):
    return hosts.host_create(hostname="web-01")


def test_host_create_publishes_fleet_status(published):
    published.run(hosts.host_create, hostname="db-01", os_name="Debian")
    fleet = published.events("fleet.status_updated")
    assert len(fleet) == 1
    assert fleet[0]["data"]["total_hosts"] == 1
    assert_valid(fleet[0])


def test_status_change_publishes_once_with_previous(published, host):
    published.run(hosts.host_set_status, host_id=host.id, status=HostStatus.ONLINE)
    published.run(hosts.host_set_status, host_id=host.id, status=HostStatus.ONLINE)
    changes = published.events("host.status_changed")
    assert len(changes) == 1
    assert changes[0]["data"]["previous_status"] == "unknown"
    assert changes[0]["data"]["status"] == "online"
    assert_valid(changes[0])
    fleet = published.events("fleet.status_updated")
    assert fleet[-1]["data"]["online_hosts"] == 1


def test_status_change_rolled_back_publishes_nothing(published, host):
    from django.db import transaction

    class Boom(Exception):
        pass

    def change_then_fail():
        with transaction.atomic():
            hosts.host_set_status(host_id=host.id, status=HostStatus.OFFLINE)
            raise Boom

    with pytest.raises(Boom):
        published.run(change_then_fail)
    assert published.events() == []


def test_unknown_status_is_refused(host):
    with pytest.raises(ValueError, match="unknown host status"):
        hosts.host_set_status(host_id=host.id, status="sleeping")


def test_metrics_publish_without_database_write(published, host):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        published.run(
            hosts.host_metrics_publish,
            host_id=str(host.id),
            hostname=host.hostname,
            metrics={"cpu_usage": 1.0},
            cpu_count=host.cpu_count,
            at=timezone.now(),
        )
    writes = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].split()[0].upper() in ("INSERT", "UPDATE", "DELETE")
    ]
    assert writes == []
    (event,) = published.events("host.metrics_reported")
    assert event["data"]["metrics"] == {"cpu_usage": 1.0}
    assert_valid(event)


def test_command_lifecycle_events(published, host, make_user):
    user = make_user("ops", superuser=True)
    execution = published.run(
        hosts.command_create, host=host, command="uptime", timeout=5, user=user, request_id="r1"
    )
    published.run(
        hosts.command_finish,
        execution=execution,
        status=ExecutionStatus.COMPLETED,
        exit_code=0,
        stdout="up",
        execution_time=0.1,
    )
    events = published.events("command.updated")
    assert [e["data"]["status"] for e in events] == ["pending", "completed"]
    assert events[1]["data"]["stdout"] == "up"
    assert events[1]["data"]["requested_by"] == "ops"
    for event in events:
        assert_valid(event)
    controls = [
        (m["action"], m["fields"]) for m in published.messages if m["type"] == "hub.control"
    ]
    # the agent is nudged when the command is queued; its requester is told when it ends
    assert controls == [
        ("agent_dispatch", {"host_id": str(host.id)}),
        ("command_finished", {"execution_id": str(execution.id)}),
    ]
    with pytest.raises(ValueError, match="is not a final status"):
        hosts.command_finish(execution=execution, status=ExecutionStatus.RUNNING)


def test_package_operation_events(published, host):
    operation = published.run(
        hosts.package_operation_create, host=host, operation="install", package="nginx", user=None
    )
    published.run(
        hosts.package_operation_update,
        operation=operation,
        status=OperationStatus.IN_PROGRESS,
        progress=45,
        message="Downloading",
    )
    published.run(
        hosts.package_operation_update,
        operation=operation,
        status=OperationStatus.COMPLETED,
        progress=150,
    )
    events = published.events("package_operation.updated")
    assert [(e["data"]["status"], e["data"]["progress"]) for e in events] == [
        ("pending", 0),
        ("in_progress", 45),
        ("completed", 100),
    ]
    assert events[1]["data"]["message"] == "Downloading"
    for event in events:
        assert_valid(event)
    controls = [
        (m["action"], m["fields"]) for m in published.messages if m["type"] == "hub.control"
    ]
    # whoever waits for its end (a fleet run) is told when it ends, once
    assert controls == [
        ("agent_dispatch", {"host_id": str(host.id)}),
        ("package_operation_finished", {"operation_id": str(operation.id)}),
    ]


def test_alert_lifecycle_events(published, host, make_user):
    user = make_user("ops", staff=True)
    alert = published.run(
        alerts.alert_raise,
        severity="warning",
        category="disk_space",
        title="High disk usage",
        message="Disk usage on /var is 85%",
        host=host,
    )
    published.run(alerts.alert_acknowledge, alert_id=alert.id, actor=Actor(user=user))
    published.run(alerts.alert_resolve, alert_id=alert.id, actor=Actor(user=user))
    events = published.events("alert.changed")
    assert [e["data"]["action"] for e in events] == ["raised", "acknowledged", "resolved"]
    assert events[0]["data"]["hostname"] == "web-01"
    for event in events:
        assert_valid(event)
    with pytest.raises(alerts.AlertStateError):
        alerts.alert_resolve(alert_id=alert.id, actor=Actor(user=user))
    with pytest.raises(alerts.AlertStateError):
        alerts.alert_acknowledge(alert_id=alert.id, actor=Actor(user=user))
    figures = [e["data"]["hosts_with_alerts"] for e in published.events("fleet.status_updated")]
    assert figures == [1, 1, 0]


def test_activity_record_event(published, make_user):
    user = make_user("ops")
    published.run(
        activity_record, action="login", user=user, ip_address="not-an-ip", user_agent="x" * 900
    )
    (event,) = published.events("user.activity")
    assert event["data"]["user_id"] == str(user.pk)
    assert event["data"]["ip_address"] is None
    assert len(event["data"]["user_agent"]) == 500
    assert_valid(event)


def test_deactivating_a_user_publishes_a_revocation(published, make_user):
    user = make_user("ops")
    user.is_active = False
    published.run(user.save)
    controls = [m for m in published.messages if m["type"] == "hub.control"]
    assert controls == [
        {
            "type": "hub.control",
            "action": "close_user",
            "fields": {"user_id": str(user.pk), "reason": "User account is disabled", "code": 4001},
        }
    ]


def test_event_names_are_unique():
    from sysmanage.events import Event

    with pytest.raises(ValueError, match="is registered twice"):

        @dataclasses.dataclass(frozen=True, kw_only=True)
        class Duplicate(Event):
            channel = "host_status"
            name = "host.status_changed"
