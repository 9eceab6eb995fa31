"""Results reach the server exactly as the protocol promises: spooled, acked, deduplicated."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from tests.agent.conftest import StartAgent, kill_processes, wait_until_gone
from tests.agent.fake_server import FakeServer


async def test_result_is_spooled_until_acked_and_resent_after_reconnect(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    fake_server.auto_ack = False
    agent = await start_agent()
    await fake_server.wait_for("hello")
    await fake_server.run_command("spool-1", "echo kept")
    first = await fake_server.result("spool-1")
    [path] = await agent.wait_spool(1)
    assert json.loads(path.read_text())["message"]["data"] == first

    fake_server.auto_ack = True
    await fake_server.drop()
    await fake_server.wait_for("hello", count=2)
    resent = await fake_server.wait_for(
        "command_result", lambda item: item.connection == 1, timeout=10
    )
    assert resent[0].data == first
    assert await agent.wait_spool(0) == []


async def test_a_result_the_server_could_not_store_is_sent_again_after_retry_after(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    """A SERVICE_UNAVAILABLE error (the server's database is away) is followed, once its
    retry_after has passed, by the unacknowledged results, on the same connection: not
    only at the next reconnect."""
    fake_server.auto_ack = False
    agent = await start_agent()
    await fake_server.wait_for("hello")
    await fake_server.run_command("busy-1", "echo kept")
    first = await fake_server.result("busy-1")
    await fake_server.send(
        "error",
        {
            "code": "SERVICE_UNAVAILABLE",
            "message": "The server cannot reach its database; try again in a moment",
            "retry_after": 0.5,
        },
    )
    again = await fake_server.wait_for("command_result", count=2, timeout=5)
    assert again[1].data == first
    assert again[1].connection == again[0].connection == 0
    await fake_server.ack("command_result", "busy-1")
    assert await agent.wait_spool(0) == []


async def test_ack_deletes_the_spool_file(fake_server: FakeServer, start_agent: StartAgent) -> None:
    fake_server.auto_ack = False
    agent = await start_agent()
    await fake_server.wait_for("hello")
    await fake_server.run_command("ack-1", "true")
    await fake_server.result("ack-1")
    await agent.wait_spool(1)
    await fake_server.ack("command_result", "ack-1")
    await agent.wait_spool(0)
    # Acknowledged results are not sent again after a reconnect.
    await fake_server.drop()
    await fake_server.wait_for("metrics", lambda item: item.connection == 1)
    assert len(fake_server.messages("command_result")) == 1


async def test_results_made_while_disconnected_are_delivered_later(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    agent = await start_agent()
    await fake_server.wait_for("hello")
    await fake_server.run_command("offline-1", "sleep 1; echo later")
    await fake_server.wait_for("command_started")
    await fake_server.stop()
    await agent.wait_spool(1, timeout=5)
    assert fake_server.messages("command_result") == []

    await fake_server.start()
    result = await fake_server.result("offline-1", timeout=15)
    assert result["status"] == "completed"
    assert result["stdout"] == "later\n"
    await agent.wait_spool(0)


async def test_repeated_run_command_runs_once(
    fake_server: FakeServer,
    start_agent: StartAgent,
    tmp_path: Path,
) -> None:
    marker = tmp_path / "runs"
    fake_server.auto_ack = False
    agent = await start_agent()
    await fake_server.wait_for("hello")
    command = f"echo run >> {marker}; sleep 0.5"
    await fake_server.run_command("dup-1", command)
    await fake_server.wait_for("command_started")
    await fake_server.run_command("dup-1", command)  # still running: ignored
    first = await fake_server.result("dup-1")
    await asyncio.sleep(0.3)
    assert len(fake_server.messages("command_result")) == 1

    await fake_server.run_command("dup-1", command)  # finished, not acked: result again
    results = await fake_server.wait_for("command_result", count=2)
    assert results[1].data == first

    await fake_server.ack("command_result", "dup-1")
    await agent.wait_spool(0)
    await fake_server.run_command("dup-1", command)  # acknowledged: nothing to do
    await asyncio.sleep(0.5)
    assert len(fake_server.messages("command_result")) == 2
    assert len(fake_server.messages("command_started")) == 1
    assert marker.read_text() == "run\n"


async def test_auth_failure_waits_the_maximum_delay(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    fake_server.token = "the-server-expects-another-token"
    agent = await start_agent()
    await fake_server.wait_for_connections(1)
    await asyncio.sleep(3)
    assert len(fake_server.connections) == 1, "retried quickly after close code 4001"
    log = agent.log()
    assert "4001" in log
    assert "Reconnecting in 60.0s" in log


async def test_http_forbidden_handshake_also_waits_the_maximum_delay(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    fake_server.http_status = 403
    agent = await start_agent()
    await fake_server.wait_for_connections(1)
    await asyncio.sleep(2)
    assert len(fake_server.connections) == 1
    assert "Reconnecting in 60.0s" in agent.log()


async def test_other_closes_reconnect_with_short_backoff(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    fake_server.reject_code = 1011
    agent = await start_agent()
    await fake_server.wait_for_connections(3, timeout=8)
    assert "Reconnecting in 60.0s" not in agent.log()


async def test_sigterm_stops_children_and_closes_cleanly(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    sleeper = ["sleep", "32.5"]
    agent = await start_agent()
    await fake_server.wait_for("hello")
    try:
        await fake_server.run_command("long-1", "sleep 32.5", timeout=60)
        await fake_server.wait_for("command_started")
        assert await agent.stop(signal.SIGTERM) == 0
        assert await wait_until_gone(sleeper) == []
        result = await fake_server.result("long-1", timeout=2)
        assert result["status"] == "failed"
        assert "shut down" in result["error"]
        await asyncio.wait_for(fake_server.connections[0].closed.wait(), 5)
        assert fake_server.connections[0].websocket.close_code == 1001
    finally:
        kill_processes(sleeper)


async def test_job_interrupted_by_a_crash_is_reported_after_restart(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    sleeper = ["sleep", "33.5"]
    agent = await start_agent()
    await fake_server.wait_for("hello")
    try:
        await fake_server.run_command("crash-1", "sleep 33.5", timeout=60)
        await fake_server.wait_for("command_started")
        await agent.stop(signal.SIGKILL)
        kill_processes(sleeper)

        await start_agent()
        result = await fake_server.result("crash-1")
        assert result["status"] == "failed"
        assert "stopped" in result["error"]
        await fake_server.run_command("crash-1", "sleep 33.5", timeout=60)
        await asyncio.sleep(0.5)
        assert len(fake_server.messages("command_started")) == 1, "ran a second time"
    finally:
        kill_processes(sleeper)
