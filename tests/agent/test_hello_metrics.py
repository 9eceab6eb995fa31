"""The agent connects correctly, introduces its host and reports heartbeats and metrics."""

from __future__ import annotations

import ipaddress
import platform
import socket

import psutil

import agent
from tests.agent.conftest import StartAgent
from tests.agent.fake_server import TOKEN, FakeServer


async def test_connects_with_bearer_token_and_no_origin(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    await start_agent()
    await fake_server.wait_for("hello")
    connection = fake_server.connections[0]
    assert connection.path == "/ws/agent"
    assert connection.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "Origin" not in connection.headers
    assert TOKEN not in connection.path


async def test_hello_reports_real_host_facts(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    await start_agent()
    [hello] = await fake_server.wait_for("hello")
    facts = hello.data
    assert fake_server.received[0].type == "hello", "hello must be the first message"
    assert facts["hostname"] == socket.gethostname()
    assert facts["fqdn"]
    for address in facts["ip_addresses"]:
        assert not ipaddress.ip_address(address).is_loopback
    assert facts["os_name"] == platform.freedesktop_os_release()["NAME"]
    assert facts["os_version"]
    assert facts["kernel"] == platform.release()
    assert facts["architecture"] == platform.machine()
    assert facts["cpu_count"] == psutil.cpu_count()
    assert facts["memory_total"] == psutil.virtual_memory().total
    assert facts["agent_version"] == agent.__version__
    assert "commands" in facts["capabilities"]


async def test_heartbeats_and_metrics_follow_welcome_intervals(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    await start_agent()
    await fake_server.wait_for("heartbeat", count=3, timeout=5)
    metrics = await fake_server.wait_for("metrics", count=3, timeout=5)
    assert all(item.data == {} for item in fake_server.messages("heartbeat"))
    for item in metrics:
        values = item.data["metrics"]
        assert item.data["timestamp"].endswith("Z")
        assert 0.0 <= values["cpu_usage"] <= 100.0
        assert abs(values["memory_usage"] - psutil.virtual_memory().percent) < 20
        assert 0.0 < values["memory_usage"] <= 100.0
        assert abs(values["disk_usage"]["/"] - psutil.disk_usage("/").percent) < 5
        assert all(0.0 <= percent <= 100.0 for percent in values["disk_usage"].values())
        assert not any(
            mount.startswith(("/proc", "/sys", "/dev", "/snap")) for mount in values["disk_usage"]
        )
        assert len(values["load_average"]) == 3
        assert all(isinstance(load, float) and load >= 0 for load in values["load_average"])


async def test_explicit_interval_wins_over_welcome(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    fake_server.intervals = {"heartbeat_interval": 60, "metrics_interval": 60}
    await start_agent("--heartbeat-interval", "0.2")
    await fake_server.wait_for("heartbeat", count=4, timeout=3)
    # Metrics follow the welcome's 60 s: only the report sent on connecting.
    assert len(fake_server.messages("metrics")) == 1
