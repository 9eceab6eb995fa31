"""Every host at once (``host_metrics`` with ``host_id: "*"``): one bounded summary a
second instead of a frame per report, for those who hold the right."""

from __future__ import annotations

import json
import uuid

import pytest
from django.contrib.auth.models import AnonymousUser
from django.utils import timezone

from hosts import services as host_services
from sysmanage import permissions
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.hub import Hub
from sysmanage.node import Node
from sysmanage.protocol import ALL_HOSTS, ErrorCode, ProtocolError
from sysmanage.topics import TOPICS, filter_problem
from sysmanage.transport import Frame
from tests.conftest import grant
from tests.wsutil import open_socket, request, subscribe

HOSTS = [str(uuid.UUID(int=i + 1)) for i in range(1000)]
ALL = {"host_id": ALL_HOSTS}
BOUNDS = {"max_hosts": 2000, "max_bytes": 512 * 1024}


class Recorder:
    """A subscriber that records what the hub hands it."""

    def __init__(self, user_id="u"):
        self.user_id = user_id
        self.session_tag = None
        self.rights = frozenset()
        self.frames: list[Frame] = []

    def deliver(self, frame):
        self.frames.append(frame)

    def close_from_hub(self, code, error):
        raise AssertionError("not closed here")


def report(hub: Hub, host_id: str, cpu: float, at: str = "2026-12-05T10:00:00.000Z") -> int:
    """One metrics report of ``host_id`` reaching the hub, as the node hands it on."""
    data = {
        "host_id": host_id,
        "hostname": f"h-{host_id[-4:]}",
        "timestamp": at,
        "metrics": {"cpu_usage": cpu, "memory_usage": 50.0, "load_average": [0.1, 0.2, 0.3]},
        "cpu_count": 4,
    }
    return hub.dispatch("host_metrics", data, at)


def summary_of(frame: Frame) -> dict:
    message = json.loads(frame.text)
    assert (message["type"], message["channel"]) == ("event", "host_metrics"), message
    assert "offset" not in message
    assert "epoch" not in message
    return message["data"]


# -- the hub ---------------------------------------------------------------------------


def test_a_thousand_reports_make_one_shared_frame_per_subscriber():
    hub = Hub()
    watchers = [Recorder() for _ in range(5)]
    for watcher in watchers:
        hub.subscribe(watcher, "host_metrics", ALL)
    one_host = Recorder()
    hub.subscribe(one_host, "host_metrics", {"host_id": HOSTS[0]})
    for i, host_id in enumerate(HOSTS):
        delivered = report(hub, host_id, cpu=1.0)
        assert delivered == (1 if i == 0 else 0)  # only the per-host subscriber, per report
    report(hub, HOSTS[0], cpu=99.0)  # a second report: its latest figures go out
    assert all(w.frames == [] for w in watchers)

    assert hub.send_summaries(**BOUNDS) == 5
    assert hub.summaries["host_metrics"].stats["frames"] == 1  # serialized once for all five
    assert {id(w.frames[0]) for w in watchers} == {id(watchers[0].frames[0])}
    data = summary_of(watchers[0].frames[0])
    assert data["count"] == 1000
    assert data["truncated"] is False
    assert [h["host_id"] for h in data["hosts"]] == HOSTS  # each once, in first-report order
    assert data["hosts"][0]["metrics"]["cpu_usage"] == 99.0
    assert data["hosts"][1] == {
        "host_id": HOSTS[1],
        "hostname": f"h-{HOSTS[1][-4:]}",
        "timestamp": "2026-12-05T10:00:00.000Z",
        "metrics": {"cpu_usage": 1.0, "memory_usage": 50.0, "load_average": [0.1, 0.2, 0.3]},
        "cpu_count": 4,
    }
    assert len(one_host.frames) == 2

    # nothing reported since: no frame; one host reported: a frame with that host alone
    assert hub.send_summaries(**BOUNDS) == 0
    report(hub, HOSTS[7], cpu=7.0)
    assert hub.send_summaries(**BOUNDS) == 5
    assert [h["host_id"] for h in summary_of(watchers[0].frames[1])["hosts"]] == [HOSTS[7]]


def test_a_summary_is_bounded_and_the_hosts_left_out_lead_the_next():
    hub = Hub()
    watcher = Recorder()
    hub.subscribe(watcher, "host_metrics", ALL)
    for host_id in HOSTS:
        report(hub, host_id, cpu=1.0)
    hub.send_summaries(max_hosts=300, max_bytes=10**9)
    first = summary_of(watcher.frames[0])
    assert (len(first["hosts"]), first["count"], first["truncated"]) == (300, 1000, True)
    report(hub, HOSTS[0], cpu=2.0)  # sent already: due again, behind the ones left out
    report(hub, HOSTS[500], cpu=3.0)  # left out: keeps its place, with its new figures
    hub.send_summaries(max_hosts=300, max_bytes=10**9)
    second = summary_of(watcher.frames[1])
    assert [h["host_id"] for h in second["hosts"]] == HOSTS[300:600]
    assert second["hosts"][200]["metrics"]["cpu_usage"] == 3.0
    assert (second["count"], second["truncated"]) == (701, True)

    # bytes: the host payloads take at most max_bytes, whatever max_hosts allows
    budget = 64 * 1024
    hub.send_summaries(max_hosts=2000, max_bytes=budget)
    third = watcher.frames[2].text
    hosts = summary_of(watcher.frames[2])["hosts"]
    assert sum(len(json.dumps(h, separators=(",", ":"))) + 1 for h in hosts) <= budget
    assert len(third) <= budget + 200  # and the envelope around them is small
    assert 0 < len(hosts) < 401
    assert summary_of(watcher.frames[2])["truncated"] is True


def test_without_all_hosts_subscribers_nothing_is_framed_and_nothing_piles_up():
    hub = Hub()
    for host_id in HOSTS:
        report(hub, host_id, cpu=1.0)
    assert hub.send_summaries(**BOUNDS) == 0
    summary = hub.summaries["host_metrics"]
    assert summary.due == {}
    assert summary.stats["frames"] == 0
    assert len(summary.latest) == 1000  # kept for the snapshot of a subscriber to come


def test_each_metrics_filter_gets_its_own_trimmed_frame():
    hub = Hub()
    full, cpu, cpu_too = Recorder(), Recorder(), Recorder()
    hub.subscribe(full, "host_metrics", ALL)
    hub.subscribe(cpu, "host_metrics", {**ALL, "metrics": ("cpu",)})
    hub.subscribe(cpu_too, "host_metrics", {**ALL, "metrics": ("cpu",)})
    report(hub, HOSTS[0], cpu=5.0)
    assert hub.send_summaries(**BOUNDS) == 3
    assert hub.summaries["host_metrics"].stats["frames"] == 2
    assert cpu.frames[0] is cpu_too.frames[0]
    assert summary_of(cpu.frames[0])["hosts"][0]["metrics"] == {"cpu_usage": 5.0}
    assert len(summary_of(full.frames[0])["hosts"][0]["metrics"]) == 3


def test_the_snapshot_lists_the_latest_of_each_host_most_recent_first_and_bounded():
    hub = Hub()
    summary = hub.summaries["host_metrics"]
    for host_id in HOSTS[:10]:
        report(hub, host_id, cpu=1.0)
    hub.send_summaries(**BOUNDS)  # time passes: later reports are more recent
    report(hub, HOSTS[5], cpu=50.0)
    status = json.loads(summary.snapshot(ALL, max_hosts=4, max_bytes=10**6, id_="s").text)
    assert (status["type"], status["id"]) == ("status", "s")
    data = status["data"]
    assert (data["count"], data["truncated"], len(data["hosts"])) == (10, True, 4)
    assert data["hosts"][0]["host_id"] == HOSTS[5]
    assert data["hosts"][0]["metrics"]["cpu_usage"] == 50.0
    whole = json.loads(summary.snapshot(ALL, max_hosts=100, max_bytes=10**6, id_=None).text)
    assert {h["host_id"] for h in whole["data"]["hosts"]} == set(HOSTS[:10])
    assert whole["data"]["truncated"] is False


def test_hosts_silent_for_long_are_forgotten():
    hub = Hub()
    summary = hub.summaries["host_metrics"]
    start = summary.now
    report(hub, HOSTS[0], cpu=1.0)
    summary.send([], now=start + 100, max_hosts=10, max_bytes=10**6)
    report(hub, HOSTS[1], cpu=1.0)
    summary.send([], now=start + 181, max_hosts=10, max_bytes=10**6)
    assert list(summary.latest) == [HOSTS[1]]


def test_unsubscribing_removes_an_all_hosts_subscriber():
    hub = Hub()
    watcher = Recorder()
    hub.subscribe(watcher, "host_metrics", ALL)
    assert hub.unsubscribe(watcher, "host_metrics")
    report(hub, HOSTS[0], cpu=1.0)
    assert hub.send_summaries(**BOUNDS) == 0
    assert hub._index["host_metrics"] == {}


# -- filters and rights ------------------------------------------------------------------


def test_star_is_a_host_id_of_host_metrics_only():
    assert TOPICS["host_metrics"].clean_filters({"host_id": "*"}, None) == ALL
    assert TOPICS["host_metrics"].all_hosts(ALL)
    assert filter_problem(ALL) is None  # no host to look up
    with pytest.raises(ProtocolError) as caught:
        TOPICS["host_status"].clean_filters({"host_id": "*"}, None)
    assert caught.value.code == ErrorCode.INVALID_FILTERS
    with pytest.raises(ProtocolError) as caught:
        TOPICS["host_metrics"].clean_filters({"host_id": "all"}, None)
    assert "or '*' for every host" in caught.value.message
    with pytest.raises(ProtocolError):  # still required: leaving it out is no "all"
        TOPICS["host_metrics"].clean_filters({}, None)


@pytest.mark.django_db
def test_every_host_at_once_needs_staff_and_the_right_to_view_hosts(make_user):
    def may(user):
        rights = permissions.socket_rights(permissions.fresh(user))
        return permissions.filters_denied_reason("host_metrics", ALL, rights) is None

    assert may(make_user("root", superuser=True))
    assert may(make_user("ops", staff=True, perms=["hosts.view_host"]))
    assert may(make_user("ops2", staff=True, perms=["hosts.change_host"]))
    assert not may(make_user("flag", staff=True))  # the staff flag alone
    assert not may(make_user("perm", perms=["hosts.view_host"]))  # the permission alone
    assert not may(AnonymousUser())
    denied = permissions.filters_denied_reason("host_metrics", ALL, frozenset())
    assert denied == (
        "Insufficient permissions for channel 'host_metrics' with host_id '*' "
        "(needs staff status and the permission hosts.view_host)"
    )
    one_host = {"host_id": HOSTS[0]}
    assert permissions.filters_denied_reason("host_metrics", one_host, frozenset()) is None
    assert permissions.subscription_lost("host_metrics", ALL, frozenset())
    assert not permissions.subscription_lost("host_metrics", one_host, frozenset())


# -- through the consumer ----------------------------------------------------------------


@pytest.fixture
def host(db):
    return host_services.host_create(hostname="web-01", os_name="Debian")


def publish(host, cpu: float) -> None:
    """A metrics report of ``host``, published on the event loop as agents' are."""
    host_services.host_metrics_publish(
        host_id=str(host.id),
        hostname=host.hostname,
        cpu_count=2,
        at=timezone.now(),
        metrics={"cpu_usage": cpu, "memory_usage": 10.0},
    )


async def next_summary(comm, timeout: float = 5) -> dict:
    while True:
        message = await comm.receive_json_from(timeout=timeout)
        if message["type"] == "event" and message["channel"] == "host_metrics":
            return message


@pytest.mark.django_db(transaction=True)
async def test_staff_get_the_snapshot_then_summaries(make_user, token_for, host, settings):
    settings.WS_FLEET_METRICS_INTERVAL = 0.2
    user = await database_sync_to_async(make_user)("root", superuser=True)
    comm = await open_socket("/ws", token=token_for(user))
    try:
        await subscribe(comm, "host_metrics", {"host_id": str(host.id)})  # starts the node
        publish(host, 1.0)
        await next_summary(comm)
        reply = await subscribe(comm, "host_metrics", {"host_id": "*"}, id_="all")
        assert reply["data"]["filters"] == ALL
        assert "position" not in reply["data"]
        status = await comm.receive_json_from(timeout=3)
        assert (status["type"], status["id"]) == ("status", "all")
        assert [h["host_id"] for h in status["data"]["hosts"]] == [str(host.id)]
        for cpu in (2.0, 3.0, 4.0):
            publish(host, cpu)
        data = (await next_summary(comm))["data"]
        assert [h["metrics"]["cpu_usage"] for h in data["hosts"]] == [4.0]
        assert (data["count"], data["truncated"]) == (1, False)
    finally:
        await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_resume_is_answered_not_recovered_with_the_snapshot(make_user, token_for):
    user = await database_sync_to_async(make_user)("root", superuser=True)
    comm = await open_socket("/ws", token=token_for(user))
    try:
        reply = await request(
            comm,
            {
                "type": "subscribe",
                "channel": "host_metrics",
                "filters": {"host_id": "*"},
                "since": {"epoch": "e", "offset": 3},
                "id": "r",
            },
        )
        assert reply["data"]["recovered"] is False
        status = await comm.receive_json_from(timeout=3)
        assert status["type"] == "status"
        assert status["data"]["truncated"] is False
    finally:
        await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_others_are_refused_and_staff_who_lose_the_right_lose_the_summary(
    make_user, token_for
):
    viewer = await database_sync_to_async(make_user)("viewer")
    comm = await open_socket("/ws", token=token_for(viewer))
    try:
        error = await request(
            comm,
            {"type": "subscribe", "channel": "host_metrics", "filters": ALL, "id": "x"},
        )
        assert error["type"] == "error"
        assert error["channel"] == "subscription"
        assert error["data"]["code"] == "SUBSCRIPTION_FAILED"
        assert error["data"]["requested_channel"] == "host_metrics"
        assert Node.current().hub.subscriber_count("host_metrics") == 0
        await database_sync_to_async(grant)(viewer, "hosts.view_host")
        error = await request(
            comm, {"type": "subscribe", "channel": "host_metrics", "filters": ALL}
        )
        assert error["data"]["code"] == "SUBSCRIPTION_FAILED"  # not staff
    finally:
        await comm.disconnect()

    ops = await database_sync_to_async(make_user)("ops", staff=True, perms=["hosts.view_host"])
    comm = await open_socket("/ws", token=token_for(ops))
    try:
        await subscribe(comm, "host_metrics", ALL)
        await comm.receive_json_from(timeout=3)  # the snapshot
        [conn] = Node.current().hub.subscriptions["host_metrics"]
        conn.update_rights(frozenset(), read_at=conn.rights_read_at + 1, scope=None)
        error = await comm.receive_json_from(timeout=3)
        assert (error["channel"], error["data"]["code"]) == ("host_metrics", "SUBSCRIPTION_REVOKED")
        assert Node.current().hub.subscriber_count("host_metrics") == 0
    finally:
        await comm.disconnect()


def test_reports_read_from_a_stream_are_summarized_without_decoding_each():
    """With Redis the hub routes an event by its host before decoding it: an all-hosts
    subscription keeps each host's latest entry as read, and decodes only the ones a
    summary takes (one per host, however often it reported)."""
    from sysmanage import streams
    from sysmanage.protocol import StreamPosition

    hub = Hub()
    watcher = Recorder()
    hub.subscribe(watcher, "host_metrics", ALL)
    entries = []
    for n in range(30):
        host = HOSTS[n % 3]
        data = {"host_id": host, "hostname": "h", "timestamp": "t", "metrics": {"cpu": n}}
        payload = streams.encode_payload("host.metrics_reported", data, "t")
        entries.append(
            streams.Entry.stored("host_metrics", StreamPosition("E", n + 1), payload, host)
        )
    decoded = streams.DECODED["payloads"]
    for entry in entries:
        assert hub.dispatch_entry(entry) == 0
    assert streams.DECODED["payloads"] == decoded  # routed and noted, nothing decoded
    assert hub.heads["host_metrics"] == StreamPosition("E", 30)
    assert hub.send_summaries(**BOUNDS) == 1
    hosts = summary_of(watcher.frames[0])["hosts"]
    assert sorted((h["host_id"], h["metrics"]["cpu"]) for h in hosts) == sorted(
        [(HOSTS[0], 27), (HOSTS[1], 28), (HOSTS[2], 29)]
    )
    assert streams.DECODED["payloads"] - decoded == 3  # each host's latest, once
