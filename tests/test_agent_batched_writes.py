"""What agent connections write together: last-seen times and finished minutes of metrics
history, gathered on the event loop and written in one trip (``sysmanage.writebatch``)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import types
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from hosts import consumers, services
from hosts.events import HostMetricsReported
from hosts.models import Host, MetricSample
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.writebatch import WriteBatch
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


def counting(monkeypatch, name: str) -> list[list[object]]:
    """Record the calls of ``services.<name>`` (its keyword arguments' values), then make them."""
    calls: list[list[object]] = []
    original = getattr(services, name)

    def counted(**kwargs):
        calls.append(list(kwargs.values()))
        original(**kwargs)

    monkeypatch.setattr(services, name, counted)
    return calls


async def connected_agents(count: int):
    enrolled = [
        await database_sync_to_async(services.host_register)(hostname=f"web-{i}")
        for i in range(count)
    ]
    sockets = [await agent_socket(token) for _, token in enrolled]
    for comm in sockets:
        await hello(comm)
    return [host for host, _ in enrolled], sockets


@override_settings(HOST_OFFLINE_AFTER_SECONDS=0.3)  # noted at most every 0.1 s
async def test_last_seen_times_of_several_agents_are_written_in_one_trip(monkeypatch):
    trips = counting(monkeypatch, "hosts_touch")
    hosts, sockets = await connected_agents(3)
    long_ago = timezone.now() - timedelta(hours=1)
    await database_sync_to_async(Host.objects.update)(last_seen=long_ago)
    await asyncio.sleep(0.15)  # past a third of the offline timeout since hello
    before = timezone.now()
    for comm in sockets:
        await comm.send_json_to({"type": "metrics", "data": {"metrics": METRICS}})
        await comm.send_json_to({"type": "heartbeat", "data": {}})
    # Nothing is written while the batch waits, and the reports were not held up by it.
    assert await database_sync_to_async(Host.objects.filter(last_seen=long_ago).count)() == 3
    await asyncio.sleep(services.BATCH_SECONDS + 0.5)

    assert len(trips) == 1
    assert set(trips[0][0]) == {str(host.id) for host in hosts}
    seen = await database_sync_to_async(lambda: dict(Host.objects.values_list("id", "last_seen")))()
    assert all(before <= seen[host.id] <= timezone.now() for host in hosts), seen
    for comm in sockets:
        await comm.disconnect()


async def test_finished_minutes_of_several_agents_are_written_in_one_trip(monkeypatch):
    trips = counting(monkeypatch, "metric_samples_save")
    clock = {"now": datetime(2026, 12, 1, 12, 0, 10, tzinfo=UTC)}
    monkeypatch.setattr(consumers, "timezone", types.SimpleNamespace(now=lambda: clock["now"]))
    hosts, sockets = await connected_agents(3)
    for comm in sockets:
        for _ in range(2):
            await comm.send_json_to({"type": "metrics", "data": {"metrics": METRICS}})
    await asyncio.sleep(0.3)
    clock["now"] = datetime(2026, 12, 1, 12, 1, 5, tzinfo=UTC)
    for comm in sockets:  # the first report of 12:01 ends 12:00
        await comm.send_json_to({"type": "metrics", "data": {"metrics": METRICS}})
    await asyncio.sleep(0.3)
    assert await database_sync_to_async(MetricSample.objects.count)() == 0  # not yet
    await asyncio.sleep(services.BATCH_SECONDS + 0.5)

    assert len(trips) == 1
    rows = await database_sync_to_async(
        lambda: list(MetricSample.objects.values_list("host_id", "minute", "samples", "cpu_usage"))
    )()
    assert sorted(rows) == sorted(
        (host.id, datetime(2026, 12, 1, 12, 0, tzinfo=UTC), 2, 23.5) for host in hosts
    )
    for comm in sockets:
        await comm.disconnect()  # and the unfinished 12:01 is written at once
    assert await database_sync_to_async(MetricSample.objects.filter(samples=1).count)() == 3


def test_minutes_saved_together_merge_with_each_other_and_with_stored_rows(db):
    host = services.host_register(hostname="web-01")[0]
    minute = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    services.metric_sample_save(
        host_id=host.id,
        minute=minute,
        samples=2,
        averages={"cpu_usage": 10.0, "memory_usage": None, "disk_usage": {"/": 5.0}},
    )
    later = minute + timedelta(minutes=1)
    services.metric_samples_save(
        rows=[
            (host.id, minute, 1, {"cpu_usage": 40.0, "memory_usage": 50.0, "disk_usage": {}}),
            (str(host.id), minute, 1, {"cpu_usage": 40.0, "load_average": [1.0, 1.0, 1.0]}),
            (host.id, later, 3, {"cpu_usage": 1.0, "memory_usage": 2.0}),
        ]
    )

    first, second = MetricSample.objects.order_by("minute")
    assert (first.samples, first.cpu_usage, first.memory_usage) == (4, 25.0, 50.0)
    assert (first.disk_usage, first.load_average) == ({"/": 5.0}, [1.0, 1.0, 1.0])
    assert (second.samples, second.cpu_usage, second.memory_usage) == (3, 1.0, 2.0)


def test_new_minutes_are_inserted_without_reading_first(db):
    hosts = [services.host_register(hostname=f"web-{i}")[0] for i in range(30)]
    minute = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    rows = [(host.id, minute, 2, {"cpu_usage": 1.0, "memory_usage": 2.0}) for host in hosts]
    with CaptureQueriesContext(connection) as queries:
        services.metric_samples_save(rows=rows)
    statements = [q["sql"].split()[0].upper() for q in queries.captured_queries]
    assert "SELECT" not in statements, statements
    assert MetricSample.objects.filter(minute=minute, samples=2).count() == 30


async def test_a_batch_that_cannot_be_written_is_logged_and_the_next_one_written(caplog):
    written: list[list[int]] = []

    def write(items: list[int]) -> None:
        if 1 in items:
            raise RuntimeError("no database")
        written.append(items)

    batch: WriteBatch[int] = WriteBatch(write, what="numbers", delay=0.05)
    with caplog.at_level(logging.ERROR, logger="sysmanage.writebatch"):
        batch.add(1)
        batch.add(2)
        await asyncio.sleep(0.3)
        batch.add(3)
        batch.add(4)
        await asyncio.sleep(0.3)
    assert written == [[3, 4]]
    assert "could not write 2 numbers" in caplog.text


@override_settings(HOST_OFFLINE_AFTER_SECONDS=90)
async def test_a_connection_notes_its_host_once_per_third_of_the_offline_timeout(monkeypatch):
    batch: WriteBatch[object] = WriteBatch(lambda items: None, what="test", delay=60)
    monkeypatch.setattr(services, "LAST_SEEN", batch)
    last_seen = services.LastSeen("host-1")
    last_seen.touch()
    last_seen.touch()
    assert [host_id for host_id, _ in batch.pending] == ["host-1"]
    batch.pending.clear()
    last_seen.touch()  # within 30 s of the last note
    assert batch.pending == []


def test_the_metrics_event_payload_is_that_of_every_event():
    event = HostMetricsReported(
        host_id="h",
        hostname="web-01",
        timestamp="2026-01-01T00:00:00.000Z",
        metrics={"cpu_usage": 1.0, "disk_usage": {"/": 2.0}, "load_average": [0.1, 0.2, 0.3]},
        cpu_count=2,
    )
    assert event.data() == dataclasses.asdict(event)


def test_what_a_batch_held_for_a_loop_that_stopped_goes_with_it():
    batch: WriteBatch[int] = WriteBatch(lambda items: None, what="numbers", delay=60)

    async def add(item: int) -> None:
        batch.add(item)

    asyncio.run(add(1))
    asyncio.run(add(2))
    assert batch.pending == [2]
