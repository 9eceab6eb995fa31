"""In-process listeners of events: where they run, and in which order."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest

from hosts.events import HostMetricsReported, HostStatusChanged
from sysmanage import events
from sysmanage.node import Node


def metrics(n: int) -> HostMetricsReported:
    return HostMetricsReported(
        host_id=str(uuid.uuid4()), hostname=f"web-{n}", timestamp="t", metrics={}
    )


def on_a_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.mark.django_db(transaction=True)
async def test_listeners_of_events_published_on_the_loop_run_off_it_in_order(monkeypatch):
    node = await Node.for_running_loop()
    loop = asyncio.get_running_loop()
    heard: list[tuple[str, bool]] = []
    all_heard = asyncio.Event()

    def listener(data):
        heard.append((data["hostname"], on_a_loop()))
        if len(heard) == 3:
            loop.call_soon_threadsafe(all_heard.set)

    monkeypatch.setitem(events._LISTENERS, HostMetricsReported.name, [listener])
    for n in range(3):
        events.publish_now(metrics(n))
    await asyncio.wait_for(all_heard.wait(), 5)
    assert heard == [("web-0", False), ("web-1", False), ("web-2", False)]
    await node.close()


@pytest.mark.django_db
def test_listeners_of_events_published_after_commit_run_in_the_committing_thread(
    monkeypatch, django_capture_on_commit_callbacks
):
    heard: list[threading.Thread] = []
    monkeypatch.setitem(
        events._LISTENERS,
        HostStatusChanged.name,
        [lambda data: heard.append(threading.current_thread())],
    )
    monkeypatch.setattr("sysmanage.node.send_to_nodes", lambda message: None)
    change = HostStatusChanged(
        host_id="h", hostname="web", status="online", previous_status="offline", timestamp="t"
    )
    with django_capture_on_commit_callbacks(execute=True):
        events.publish(change)
        assert heard == []  # not before the commit
    assert heard == [threading.current_thread()]


@pytest.mark.django_db(transaction=True)
async def test_a_non_blocking_listener_runs_at_once_on_the_loop_and_defers_its_writes(
    monkeypatch,
):
    node = await Node.for_running_loop()
    loop = asyncio.get_running_loop()
    judged: list[tuple[str, bool]] = []
    written: list[tuple[str, bool]] = []
    all_written = asyncio.Event()

    def write(hostname):
        written.append((hostname, on_a_loop()))
        if len(written) == 2:
            loop.call_soon_threadsafe(all_written.set)

    def judge(data):
        judged.append((data["hostname"], on_a_loop()))
        events.defer(write, data["hostname"])

    monkeypatch.setitem(events._LISTENERS, HostMetricsReported.name, [])
    monkeypatch.setitem(events._QUICK_LISTENERS, HostMetricsReported.name, [judge])
    events.publish_now(metrics(0))
    events.publish_now(metrics(1))
    assert judged == [("web-0", True), ("web-1", True)]  # at once, on the loop
    await asyncio.wait_for(all_written.wait(), 5)
    assert written == [("web-0", False), ("web-1", False)]  # in order, off the loop
    await node.close()


def test_a_deferred_job_runs_at_once_off_the_loop():
    ran: list[int] = []
    events.defer(ran.append, 1)
    assert ran == [1]
