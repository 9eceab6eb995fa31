"""The seed protocol through the /ws consumer: subscriptions, events, errors, limits."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from django.utils import timezone

from alerts import services as alert_services
from hosts import services as host_services
from hosts.models import CommandExecution, ExecutionStatus, HostStatus
from sysmanage.dbthreads import database_sync_to_async
from tests.wsutil import (
    expect_close,
    next_event,
    open_socket,
    request,
    subscribe,
    subscribe_with_status,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
async def staff_socket(make_user, token_for):
    user = await database_sync_to_async(make_user)("admin", superuser=True)
    comm = await open_socket("/ws", token=token_for(user))
    yield comm
    await comm.disconnect()


@pytest.fixture
async def viewer_socket(make_user, token_for):
    user = await database_sync_to_async(make_user)("viewer")
    comm = await open_socket("/ws", token=token_for(user))
    yield comm
    await comm.disconnect()


@pytest.fixture
def host(db):
    return host_services.host_create(hostname="web-01", os_name="Debian")


async def test_ping_gets_pong_with_same_id(viewer_socket):
    pong = await request(viewer_socket, {"type": "ping", "id": "hb-1"})
    assert pong["type"] == "pong"
    assert pong["id"] == "hb-1"
    assert pong["timestamp"].endswith("Z")


async def test_subscribe_confirms_channel_and_filters(viewer_socket, host):
    reply = await subscribe(
        viewer_socket, "system_alerts", {"severity": ["critical", "warning"]}, id_="s1"
    )
    assert reply["channel"] == "system_alerts"
    assert reply["id"] == "s1"
    position = reply["data"].pop("position")
    assert reply["data"] == {
        "action": "subscribe",
        "status": "subscribed",
        "channel": "system_alerts",
        "filters": {"severity": ["warning", "critical"]},
    }
    assert set(position) == {"epoch", "offset"}
    assert isinstance(position["offset"], int)


async def test_every_channel_can_be_subscribed(staff_socket, host):
    filters = {
        "host_status": {"host_id": str(host.id)},
        "package_operations": {"host_id": str(host.id)},
        "command_execution": {},
        "system_alerts": {"severity": ["info"]},
        "user_activity": None,
        "host_metrics": {"host_id": str(host.id), "metrics": ["cpu"]},
        "fleet_status": None,
    }
    snapshots = {}
    for channel, channel_filters in filters.items():
        reply = await subscribe(staff_socket, channel, channel_filters, id_=channel)
        assert reply["data"]["channel"] == channel
        if channel not in ("user_activity", "host_metrics"):
            status = await staff_socket.receive_json_from(timeout=3)
            assert status["type"] == "status"
            assert status["channel"] == channel
            assert status["id"] == channel
            snapshots[channel] = status["data"]
    # nothing is pending, running or open: the lists are empty
    empty = {"count": 0, "truncated": False}
    assert snapshots["package_operations"] == {"operations": [], **empty}
    assert snapshots["command_execution"] == {"commands": [], **empty}
    assert snapshots["system_alerts"] == {"alerts": [], **empty}
    # and no status message followed user_activity or host_metrics
    pong = await request(staff_socket, {"type": "ping", "id": "after"})
    assert pong["type"] == "pong"


async def test_host_status_snapshot_lists_hosts(viewer_socket, host):
    await subscribe(viewer_socket, "host_status")
    status = await viewer_socket.receive_json_from(timeout=3)
    assert status["data"]["hosts"] == [
        {"host_id": str(host.id), "hostname": "web-01", "status": "unknown", "last_seen": None}
    ]


async def test_fleet_status_snapshot_counts(viewer_socket, host):
    await subscribe(viewer_socket, "fleet_status")
    status = await viewer_socket.receive_json_from(timeout=3)
    data = status["data"]
    assert (data["total_hosts"], data["online_hosts"], data["offline_hosts"]) == (1, 0, 1)
    assert data["hosts_with_alerts"] == 0
    assert data["pending_operations"] == 0
    assert data["last_updated"].endswith("Z")


async def test_user_activity_is_refused_to_non_staff(viewer_socket):
    error = await request(
        viewer_socket, {"type": "subscribe", "channel": "user_activity", "id": "ua"}
    )
    assert error["type"] == "error"
    assert error["channel"] == "subscription"
    assert error["id"] == "ua"
    assert error["data"] == {
        "code": "SUBSCRIPTION_FAILED",
        "message": "Insufficient permissions for channel 'user_activity'",
        "requested_channel": "user_activity",
    }


async def test_unknown_host_in_filters_is_refused(viewer_socket):
    error = await request(
        viewer_socket,
        {"type": "subscribe", "channel": "host_metrics", "filters": {"host_id": str(uuid.uuid4())}},
    )
    assert error["data"]["code"] == "INVALID_FILTERS"
    assert "no host" in error["data"]["message"]


async def test_host_status_event_carries_previous_status(viewer_socket, host):
    await subscribe(viewer_socket, "host_status", {"host_id": str(host.id)})
    await database_sync_to_async(host_services.host_set_status)(
        host_id=host.id, status=HostStatus.ONLINE
    )
    event = await next_event(viewer_socket, "host_status")
    assert {k: event["data"][k] for k in ("host_id", "hostname", "status", "previous_status")} == {
        "host_id": str(host.id),
        "hostname": "web-01",
        "status": "online",
        "previous_status": "unknown",
    }
    assert event["data"]["timestamp"].endswith("Z")
    assert "id" not in event


async def test_severity_filter_and_resubscribe_replaces_filters(viewer_socket, host):
    await subscribe(viewer_socket, "system_alerts", {"severity": ["critical"]})
    raise_alert = database_sync_to_async(alert_services.alert_raise)
    await raise_alert(severity="warning", category="disk_space", title="w1", host=host)
    await raise_alert(severity="critical", category="disk_space", title="c1", host=host)
    event = await next_event(viewer_socket, "system_alerts")
    assert event["data"]["title"] == "c1"  # the warning raised first was filtered out
    assert event["data"]["hostname"] == "web-01"
    assert set(event["data"]) >= {
        "alert_id",
        "severity",
        "title",
        "message",
        "host_id",
        "hostname",
        "category",
    }

    await subscribe(viewer_socket, "system_alerts", {"severity": ["warning"]})
    await raise_alert(severity="critical", category="cpu", title="c2", host=host)
    await raise_alert(severity="warning", category="cpu", title="w2", host=host)
    event = await next_event(viewer_socket, "system_alerts")
    assert event["data"]["title"] == "w2"


async def test_unsubscribe_stops_events(viewer_socket, host):
    await subscribe_with_status(viewer_socket, "system_alerts")
    await subscribe(viewer_socket, "host_status")
    reply = await request(
        viewer_socket, {"type": "unsubscribe", "channel": "system_alerts", "id": "u1"}
    )
    assert reply["type"] == "status"  # the host_status snapshot was queued first
    reply = await viewer_socket.receive_json_from(timeout=3)
    assert reply["data"] == {
        "action": "unsubscribe",
        "status": "unsubscribed",
        "channel": "system_alerts",
        "was_subscribed": True,
    }
    await database_sync_to_async(alert_services.alert_raise)(
        severity="critical", category="x", title="nobody hears", host=host
    )
    await database_sync_to_async(host_services.host_set_status)(
        host_id=host.id, status=HostStatus.ONLINE
    )
    event = await viewer_socket.receive_json_from(timeout=3)
    assert event["channel"] == "host_status"  # and not the alert published before it


async def test_metrics_filter_delivers_only_named_metrics(viewer_socket, host):
    await subscribe(
        viewer_socket, "host_metrics", {"host_id": str(host.id), "metrics": ["cpu", "load"]}
    )
    # On the event loop, as an agent's connection publishes them.
    host_services.host_metrics_publish(
        host_id=str(host.id),
        hostname=host.hostname,
        cpu_count=host.cpu_count,
        at=timezone.now(),
        metrics={
            "cpu_usage": 23.5,
            "memory_usage": 67.2,
            "disk_usage": {"/": 45.8},
            "load_average": [1.2, 1.5, 1.8],
        },
    )
    event = await next_event(viewer_socket, "host_metrics")
    assert event["data"]["metrics"] == {"cpu_usage": 23.5, "load_average": [1.2, 1.5, 1.8]}
    assert event["data"]["host_id"] == str(host.id)


async def test_fleet_status_event_after_changes_is_coalesced(viewer_socket, host, settings):
    await subscribe(viewer_socket, "fleet_status")
    await viewer_socket.receive_json_from(timeout=3)  # snapshot
    for name in ("a", "b", "c"):
        await database_sync_to_async(host_services.host_create)(hostname=name)
    totals = []
    deadline = asyncio.get_running_loop().time() + 4
    while asyncio.get_running_loop().time() < deadline and (not totals or totals[-1] != 4):
        event = await next_event(viewer_socket, "fleet_status", timeout=3)
        totals.append(event["data"]["total_hosts"])
    assert totals[-1] == 4
    assert len(totals) <= 2  # three changes within a second: at most two publications


async def test_user_activity_events_reach_staff(staff_socket, make_user):
    await subscribe(staff_socket, "user_activity")
    from activity.services import activity_record

    await database_sync_to_async(activity_record)(
        action="login", username="someone", ip_address="10.0.0.1", user_agent="ua"
    )
    event = await next_event(staff_socket, "user_activity")
    assert {k: event["data"][k] for k in ("username", "action", "ip_address", "user_agent")} == {
        "username": "someone",
        "action": "login",
        "ip_address": "10.0.0.1",
        "user_agent": "ua",
    }
    assert "user_id" in event["data"]
    assert event["data"]["timestamp"].endswith("Z")


@pytest.mark.parametrize(
    ("message", "code", "channel"),
    [
        ('{"type": "dance", "id": "x"}', "UNKNOWN_TYPE", "system"),
        (
            '{"type": "subscribe", "channel": "weather", "id": "x"}',
            "UNKNOWN_CHANNEL",
            "subscription",
        ),
        ('{"type": "subscribe", "id": "x"}', "UNKNOWN_CHANNEL", "subscription"),
        (
            '{"type": "unsubscribe", "channel": "weather", "id": "x"}',
            "UNKNOWN_CHANNEL",
            "subscription",
        ),
        (
            '{"type": "subscribe", "channel": "system_alerts", "filters": {"severity": "high"},'
            ' "id": "x"}',
            "INVALID_FILTERS",
            "subscription",
        ),
        ('{"type": "response", "id": "x"}', "UNSUPPORTED_TYPE", "system"),
        (
            '{"type": "command", "channel": "fleet_status", "id": "x"}',
            "INVALID_COMMAND",
            "fleet_status",
        ),
        ('{"type": "command", "channel": "weather", "id": "x"}', "UNKNOWN_CHANNEL", "system"),
        ('{"channel": "host_status", "id": "x"}', "INVALID_MESSAGE", "system"),
    ],
)
async def test_bad_requests_get_errors_with_id(viewer_socket, message, code, channel):
    await viewer_socket.send_to(text_data=message)
    error = await viewer_socket.receive_json_from(timeout=3)
    assert error["type"] == "error"
    assert error["data"]["code"] == code
    assert error["channel"] == channel
    assert error["id"] == "x"
    assert error["data"]["message"]
    assert (await request(viewer_socket, {"type": "ping"}))["type"] == "pong"  # still usable


@pytest.mark.parametrize(
    ("text", "code"),
    [("{oops", "INVALID_JSON"), ("[]", "INVALID_MESSAGE"), ("42", "INVALID_MESSAGE")],
)
async def test_unparseable_messages_get_errors(viewer_socket, text, code):
    await viewer_socket.send_to(text_data=text)
    error = await viewer_socket.receive_json_from(timeout=3)
    assert error["data"]["code"] == code
    assert "id" not in error


async def test_binary_frames_are_refused(viewer_socket):
    await viewer_socket.send_to(bytes_data=b"\x00\x01")
    error = await viewer_socket.receive_json_from(timeout=3)
    assert error["data"]["code"] == "INVALID_MESSAGE"


async def test_oversized_message_closes_with_4013(viewer_socket, settings):
    settings.WS_MAX_MESSAGE_BYTES = 1024
    await viewer_socket.send_to(text_data='{"type":"ping","pad":"' + "x" * 2000 + '"}')
    error = await viewer_socket.receive_json_from(timeout=3)
    assert error["data"]["code"] == "MESSAGE_TOO_LARGE"
    assert await expect_close(viewer_socket) == 4013


async def test_flood_is_rate_limited_then_closed(make_user, token_for, settings):
    settings.WS_RATE_LIMIT_PER_SECOND = 1
    settings.WS_RATE_LIMIT_BURST = 3
    user = await database_sync_to_async(make_user)()
    comm = await open_socket("/ws", token=token_for(user))
    for i in range(3):
        assert (await request(comm, {"type": "ping", "id": i}))["type"] == "pong"
    limited = await request(comm, {"type": "ping", "id": "over"})
    assert limited["data"]["code"] == "RATE_LIMITED"
    assert limited["id"] == "over"
    assert limited["data"]["retry_after"] > 0
    for i in range(105):  # malformed frames count against the rate too
        await comm.send_to(text_data="not json" if i % 2 else json.dumps({"type": "ping", "id": i}))
    codes = []
    while True:
        output = await comm.receive_output(timeout=3)
        if output["type"] == "websocket.close":
            break
        codes.append(json.loads(output["text"])["data"]["code"])
    assert output["code"] == 4029
    assert set(codes) == {"RATE_LIMITED"}


async def test_command_to_unknown_host_fails(staff_socket):
    host_id = str(uuid.uuid4())
    error = await request(
        staff_socket,
        {
            "type": "command",
            "channel": "command_execution",
            "data": {"host_id": host_id, "command": "uptime"},
            "id": "request_123",
        },
    )
    assert error == {**error, "type": "error", "channel": "command_execution", "id": "request_123"}
    assert error["data"] == {
        "code": "COMMAND_FAILED",
        "message": "Host not found",
        "host_id": host_id,
        "execution_id": None,
    }


async def test_command_to_offline_host_fails_and_is_recorded(staff_socket, host):
    error = await request(
        staff_socket,
        {
            "type": "command",
            "channel": "command_execution",
            "data": {"host_id": str(host.id), "command": "systemctl status nginx", "timeout": 30},
            "id": "request_124",
        },
    )
    assert error["data"]["code"] == "COMMAND_FAILED"
    assert error["data"]["message"].startswith("Host not reachable")
    execution = await database_sync_to_async(
        lambda: CommandExecution.objects.select_related("requested_by").get(
            id=error["data"]["execution_id"]
        )
    )()
    assert execution.status == ExecutionStatus.FAILED
    assert execution.requested_by.username == "admin"
    assert execution.command == "systemctl status nginx"


async def test_package_operation_to_offline_host_fails(staff_socket, host):
    error = await request(
        staff_socket,
        {
            "type": "command",
            "channel": "package_operations",
            "data": {"host_id": str(host.id), "operation": "install", "package": "nginx"},
            "id": "p1",
        },
    )
    assert error["data"]["code"] == "COMMAND_FAILED"
    assert error["data"]["execution_id"]


async def test_commands_need_permission(viewer_socket, host):
    error = await request(
        viewer_socket,
        {
            "type": "command",
            "channel": "command_execution",
            "data": {"host_id": str(host.id), "command": "id"},
            "id": "c",
        },
    )
    assert error["data"]["code"] == "PERMISSION_DENIED"


@pytest.mark.parametrize(
    "data",
    [
        {"command": "ls"},
        {"host_id": "nope", "command": "ls"},
        {"host_id": str(uuid.uuid4()), "command": ""},
        {"host_id": str(uuid.uuid4()), "command": "ls", "timeout": 0},
        {"host_id": str(uuid.uuid4()), "command": "ls", "timeout": "soon"},
    ],
)
async def test_malformed_commands_are_refused(staff_socket, data):
    error = await request(
        staff_socket, {"type": "command", "channel": "command_execution", "data": data, "id": "c"}
    )
    assert error["data"]["code"] == "INVALID_COMMAND"
    assert error["id"] == "c"


# -- database trips of a subscribe ------------------------------------------------------


@pytest.fixture
def database_trips(monkeypatch):
    """The functions the consumer runs in the database threads, in order."""
    import sysmanage.consumers

    trips: list[str] = []
    real = sysmanage.consumers.database_sync_to_async

    def counting(func):
        def call(*args, **kwargs):
            trips.append(func.__name__)
            return real(func)(*args, **kwargs)

        return call

    monkeypatch.setattr(sysmanage.consumers, "database_sync_to_async", counting)
    return trips


async def test_a_subscribe_makes_one_database_trip(viewer_socket, host, database_trips):
    """The user's rights now and the host filter's check are read in one trip: in a
    storm of resuming clients each trip waits its turn for a database thread."""
    await subscribe(viewer_socket, "host_metrics", {"host_id": str(host.id)})
    assert database_trips == ["_authorize_now"]


async def test_one_trip_still_refuses_in_order(viewer_socket, database_trips):
    """Refused for the channel before the filters are judged; then bad filters, then a
    host that does not exist."""
    refused = await request(
        viewer_socket,
        {"type": "subscribe", "channel": "user_activity", "filters": {"bogus": 1}, "id": "a"},
    )
    assert (refused["type"], refused["data"]["code"]) == ("error", "SUBSCRIPTION_FAILED")
    invalid = await request(
        viewer_socket,
        {"type": "subscribe", "channel": "host_metrics", "filters": {"host_id": "x"}, "id": "b"},
    )
    assert (invalid["type"], invalid["data"]["code"]) == ("error", "INVALID_FILTERS")
    assert "valid UUID" in invalid["data"]["message"]
    missing = await request(
        viewer_socket,
        {
            "type": "subscribe",
            "channel": "host_metrics",
            "filters": {"host_id": str(uuid.uuid4())},
            "id": "c",
        },
    )
    assert (missing["type"], missing["data"]["code"]) == ("error", "INVALID_FILTERS")
    assert "no host with id" in missing["data"]["message"]
    assert database_trips == ["_authorize_now"] * 3


async def test_a_token_socket_without_a_session_reads_no_session(make_user, token_for, monkeypatch):
    """A socket with a token and no session cookie has no session user to read: its
    handshake goes to the database threads once (the token's user), not twice."""
    import sysmanage.auth

    user = await database_sync_to_async(make_user)("viewer")
    read = []

    async def session_user(store):
        read.append(store.session_key)
        raise AssertionError("no session to read")

    monkeypatch.setattr(sysmanage.auth, "session_user", session_user)
    comm = await open_socket("/ws", token=token_for(user))
    assert (await request(comm, {"type": "ping", "id": 1}))["type"] == "pong"
    assert read == []
    await comm.disconnect()
