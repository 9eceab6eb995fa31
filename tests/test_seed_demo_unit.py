"""seed_demo's parts in process: the simulated host, the outage notice, the server check."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest
from django.core.management.base import CommandError

from hosts.management.commands import seed_demo
from hosts.metrics import clean_metrics


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_demo_host_reports_valid_facts_and_metrics():
    host = seed_demo.DemoHost("demo-web-01", "tok", "Debian GNU/Linux", "12", 4, random.Random(1))
    assert host.facts()["hostname"] == "demo-web-01"
    for _ in range(20):
        clean_metrics(host.metrics())  # what the server accepts, report after report


def test_an_outage_is_said_once_and_its_end_once():
    said: list[str] = []
    outage = seed_demo.Outage(said.append)
    outage.connected()
    for _ in range(5):
        outage.failed("ws://x/ws/agent", OSError("refused"))
    outage.connected()
    outage.connected()
    assert len(said) == 2
    assert "cannot reach ws://x/ws/agent (refused)" in said[0]
    assert said[1] == "connected again"


def test_a_server_that_does_not_answer_is_refused_at_once():
    with pytest.raises(CommandError, match="nothing answers at"):
        seed_demo._check_server(f"http://127.0.0.1:{closed_port()}")


async def test_a_host_retries_quietly_until_stopped():
    host = seed_demo.DemoHost("demo-db-02", "tok", "Ubuntu", "24.04", 2, random.Random(2))
    said: list[str] = []
    stop = asyncio.Event()
    url = f"ws://127.0.0.1:{closed_port()}/ws/agent"
    running = asyncio.ensure_future(
        seed_demo.run_host(host, url, 1.0, stop, seed_demo.Outage(said.append))
    )
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(running, 5)
    assert len(said) == 1
    assert url in said[0]
