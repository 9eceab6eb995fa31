"""Resuming a channel on ``/ws``: events carry their position, and a subscribe with
``since`` replays what the client missed, or says it cannot and sends the state."""

from __future__ import annotations

import pytest

from alerts import services as alert_services
from hosts import services as host_services
from hosts.models import HostStatus
from sysmanage.dbthreads import database_sync_to_async
from tests.wsutil import next_event, open_socket, request, subscribe

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
async def viewer(make_user):
    return await database_sync_to_async(make_user)("viewer")


@pytest.fixture
def hosts(db):
    return [host_services.host_create(hostname=f"web-{n:02}", os_name="Debian") for n in range(2)]


raise_alert = database_sync_to_async(alert_services.alert_raise)


async def test_events_carry_their_offset_and_epoch(viewer, token_for, hosts):
    comm = await open_socket("/ws", token=token_for(viewer))
    reply = await subscribe(comm, "system_alerts")
    start = reply["data"]["position"]
    for n in range(3):
        await raise_alert(severity="warning", category="cpu", title=f"a{n}", host=hosts[0])
    events = [await next_event(comm, "system_alerts") for _ in range(3)]
    assert [e["offset"] for e in events] == [start["offset"] + n for n in (1, 2, 3)]
    assert {e["epoch"] for e in events} == {start["epoch"]}
    await comm.disconnect()


async def test_a_client_resumes_with_exactly_what_it_missed(viewer, token_for, hosts):
    comm = await open_socket("/ws", token=token_for(viewer))
    filters = {"host_id": str(hosts[0].id)}
    await subscribe(comm, "system_alerts", filters)
    await raise_alert(severity="warning", category="cpu", title="seen", host=hosts[0])
    seen = await next_event(comm, "system_alerts")
    await comm.disconnect()

    # away: two alerts on its host, one on another
    await raise_alert(severity="critical", category="cpu", title="missed-1", host=hosts[0])
    await raise_alert(severity="critical", category="cpu", title="other", host=hosts[1])
    await raise_alert(severity="warning", category="disk_space", title="missed-2", host=hosts[0])

    comm = await open_socket("/ws", token=token_for(viewer))
    since = {"epoch": seen["epoch"], "offset": seen["offset"]}
    reply = await request(
        comm,
        {
            "type": "subscribe",
            "channel": "system_alerts",
            "filters": filters,
            "since": since,
            "id": "r1",
        },
    )
    assert reply["type"] == "response"
    assert reply["id"] == "r1"
    assert reply["data"]["recovered"] is True
    assert reply["data"]["position"] == {"epoch": seen["epoch"], "offset": seen["offset"] + 3}
    replayed = [await comm.receive_json_from(timeout=3) for _ in range(2)]
    assert [m["type"] for m in replayed] == ["event", "event"]
    assert [m["data"]["title"] for m in replayed] == ["missed-1", "missed-2"]
    assert [m["offset"] for m in replayed] == [seen["offset"] + 1, seen["offset"] + 3]
    # then live, with nothing sent twice
    await raise_alert(severity="warning", category="cpu", title="live", host=hosts[0])
    live = await comm.receive_json_from(timeout=3)
    assert live["data"]["title"] == "live"
    assert live["offset"] == seen["offset"] + 4
    assert await comm.receive_nothing(timeout=0.2)
    await comm.disconnect()


async def test_an_unknown_epoch_is_not_recovered_and_the_state_follows(viewer, token_for, hosts):
    await database_sync_to_async(host_services.host_set_status)(
        host_id=hosts[0].id, status=HostStatus.ONLINE
    )
    comm = await open_socket("/ws", token=token_for(viewer))
    reply = await request(
        comm,
        {
            "type": "subscribe",
            "channel": "host_status",
            "since": {"epoch": "before-a-restart", "offset": 41},
            "id": "r2",
        },
    )
    assert reply["data"]["recovered"] is False
    snapshot = await comm.receive_json_from(timeout=3)
    assert snapshot["type"] == "status"
    assert snapshot["id"] == "r2"
    assert snapshot["channel"] == "host_status"
    assert str(hosts[0].id) in str(snapshot["data"])
    assert await comm.receive_nothing(timeout=0.2)  # nothing replayed
    await comm.disconnect()


async def test_a_recovered_state_channel_gets_no_snapshot(viewer, token_for, hosts):
    comm = await open_socket("/ws", token=token_for(viewer))
    reply = await subscribe(comm, "host_status")
    await comm.receive_json_from(timeout=3)  # the snapshot of a plain subscribe
    position = reply["data"]["position"]
    reply = await request(
        comm, {"type": "subscribe", "channel": "host_status", "since": position, "id": "r3"}
    )
    assert reply["data"]["recovered"] is True
    assert await comm.receive_nothing(timeout=0.2)
    await comm.disconnect()


@pytest.mark.parametrize(
    "since",
    [
        "yesterday",
        {"epoch": "e"},
        {"epoch": "e", "offset": -1},
        {"epoch": "e", "offset": 1.5},
        {"epoch": "e", "offset": True},
        {"epoch": "", "offset": 1},
        {"epoch": "x" * 65, "offset": 1},
        {"epoch": "e", "offset": 1, "extra": 2},
    ],
)
async def test_a_malformed_since_is_refused_and_nothing_subscribed(viewer, token_for, since):
    comm = await open_socket("/ws", token=token_for(viewer))
    reply = await request(
        comm, {"type": "subscribe", "channel": "host_status", "since": since, "id": "bad"}
    )
    assert reply["type"] == "error"
    assert reply["id"] == "bad"
    assert reply["data"]["code"] == "INVALID_MESSAGE"
    assert "since" in reply["data"]["message"]
    assert await comm.receive_nothing(timeout=0.2)
    await comm.disconnect()
