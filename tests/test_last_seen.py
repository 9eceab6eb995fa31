"""Agents' last-seen times: noted per connection, written together, never moved back."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.test import override_settings
from django.utils import timezone

from hosts import services
from hosts.events import HostMetricsReported
from hosts.models import Host
from tests.test_agent_consumer import METRICS, agent_socket, hello

pytestmark = pytest.mark.django_db(transaction=True)


def test_hosts_touch_never_moves_a_last_seen_time_back(db):
    now = timezone.now()
    older, newer, never = (services.host_register(hostname=n)[0] for n in ("a", "b", "c"))
    Host.objects.filter(id=older.id).update(last_seen=now - timedelta(minutes=5))
    Host.objects.filter(id=newer.id).update(last_seen=now + timedelta(seconds=5))

    services.hosts_touch(host_ids=[older.id, newer.id, never.id], seen_at=now)

    seen = dict(Host.objects.values_list("id", "last_seen"))
    assert seen[older.id] == now
    assert seen[newer.id] == now + timedelta(seconds=5)
    assert seen[never.id] == now


@override_settings(HOST_OFFLINE_AFTER_SECONDS=0.3)  # noted at most every 0.1 s
async def test_reports_of_several_agents_are_written_in_one_trip(monkeypatch):
    trips: list[set[object]] = []
    write = services.hosts_touch

    def counted(*, host_ids, seen_at):
        trips.append(set(host_ids))
        write(host_ids=host_ids, seen_at=seen_at)

    monkeypatch.setattr(services, "hosts_touch", counted)
    enrolled = [
        await database_sync_to_async(services.host_register)(hostname=f"web-{i}") for i in range(3)
    ]
    sockets = [await agent_socket(token) for _, token in enrolled]
    for comm in sockets:
        await hello(comm)
    long_ago = timezone.now() - timedelta(hours=1)
    await database_sync_to_async(Host.objects.update)(last_seen=long_ago)
    await asyncio.sleep(0.15)  # past a third of the offline timeout since hello
    before = timezone.now()
    for comm in sockets:
        await comm.send_json_to({"type": "metrics", "data": {"metrics": METRICS}})
        await comm.send_json_to({"type": "heartbeat", "data": {}})
    # Nothing is written while the batch waits, and the reports were not held up by it.
    assert await database_sync_to_async(Host.objects.filter(last_seen=long_ago).count)() == 3
    await asyncio.sleep(services.LAST_SEEN_BATCH_SECONDS + 0.5)

    ids = {str(host.id) for host, _ in enrolled}
    assert trips == [ids]
    seen = await database_sync_to_async(lambda: dict(Host.objects.values_list("id", "last_seen")))()
    assert all(before <= seen[host.id] <= timezone.now() for host, _ in enrolled), seen
    for comm in sockets:
        await comm.disconnect()


@override_settings(HOST_OFFLINE_AFTER_SECONDS=90)
async def test_a_connection_notes_its_host_once_per_third_of_the_offline_timeout():
    noted = services.LastSeenBatch()
    last_seen = services.LastSeen("host-1")
    original, services.LAST_SEEN = services.LAST_SEEN, noted
    try:
        last_seen.touch()
        last_seen.touch()
        assert noted.pending == {"host-1"}
        noted.pending.clear()
        last_seen.touch()  # within 30 s of the last note
        assert noted.pending == set()
    finally:
        services.LAST_SEEN = original


def test_the_metrics_event_payload_is_that_of_every_event():
    event = HostMetricsReported(
        host_id="h",
        hostname="web-01",
        timestamp="2026-01-01T00:00:00.000Z",
        metrics={"cpu_usage": 1.0, "disk_usage": {"/": 2.0}, "load_average": [0.1, 0.2, 0.3]},
        cpu_count=2,
    )
    assert event.data() == dataclasses.asdict(event)
