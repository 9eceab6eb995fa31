"""``run_command``: output, exit codes, timeouts, truncation, concurrency."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.agent.conftest import StartAgent, kill_processes, wait_until_gone
from tests.agent.fake_server import TOKEN, FakeServer


async def test_echo_command(fake_server: FakeServer, start_agent: StartAgent) -> None:
    await start_agent()
    await fake_server.wait_for("hello")
    await fake_server.run_command(
        "echo-1", "echo hello; echo oops >&2; printf 'caf\\303\\251 \\377'"
    )
    result = await fake_server.result("echo-1")
    assert result["status"] == "completed"
    assert result["exit_code"] == 0
    assert result["stdout"] == "hello\ncafé \ufffd"
    assert result["stderr"] == "oops\n"
    assert result["stdout_truncated"] is False
    assert result["stderr_truncated"] is False
    assert 0 <= result["execution_time"] < 5
    assert result["error"] == ""
    [started] = fake_server.messages("command_started")
    assert started.data == {"execution_id": "echo-1"}
    assert fake_server.received.index(started) < fake_server.received.index(
        fake_server.messages("command_result")[0]
    )


async def test_nonzero_exit_is_completed_with_its_code(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    await start_agent()
    await fake_server.wait_for("hello")
    await fake_server.run_command("exit-3", "echo partial; exit 3")
    result = await fake_server.result("exit-3")
    assert result["status"] == "completed"
    assert result["exit_code"] == 3
    assert result["stdout"] == "partial\n"


async def test_timeout_kills_the_whole_process_group(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    sleeper = ["sleep", "31.5"]
    await start_agent()
    await fake_server.wait_for("hello")
    try:
        await fake_server.run_command("slow-1", "sleep 31.5 & sleep 31.5; wait", timeout=1)
        result = await fake_server.result("slow-1", timeout=8)
        assert result["status"] == "timeout"
        assert result["exit_code"] is None
        assert 0.9 <= result["execution_time"] < 5
        assert await wait_until_gone(sleeper) == []
    finally:
        kill_processes(sleeper)


async def test_output_is_capped(
    fake_server: FakeServer,
    start_agent: StartAgent,
    tmp_path: Path,
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("max_output_bytes = 1000\n")
    await start_agent("--config", str(config))
    await fake_server.wait_for("hello")
    await fake_server.run_command("big-1", "head -c 5000000 /dev/zero | tr '\\0' a; echo short >&2")
    result = await fake_server.result("big-1")
    assert result["status"] == "completed"
    assert result["stdout"] == "a" * 1000
    assert result["stdout_truncated"] is True
    assert result["stdout_bytes"] == 5000000  # everything the command wrote, kept or not
    assert result["stderr"] == "short\n"
    assert result["stderr_truncated"] is False
    assert result["stderr_bytes"] == 6


async def test_commands_run_concurrently_within_the_limit(
    fake_server: FakeServer,
    start_agent: StartAgent,
    tmp_path: Path,
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("max_concurrent_commands = 2\n")
    await start_agent("--config", str(config))
    await fake_server.wait_for("hello")
    loop = asyncio.get_running_loop()
    began = loop.time()
    for number in range(4):
        await fake_server.run_command(f"par-{number}", "sleep 1")
    await fake_server.wait_for("command_result", count=4, timeout=10)
    elapsed = loop.time() - began
    # Two at a time: two start at once, the others only when a slot frees up.
    kinds = [
        item.type
        for item in fake_server.received
        if item.type in ("command_started", "command_result")
    ]
    assert kinds[:3] == ["command_started", "command_started", "command_result"], kinds
    assert 1.9 <= elapsed < 3.8, elapsed  # one at a time would take 4 s
    results = fake_server.messages("command_result")
    assert all(item.data["status"] == "completed" for item in results)


async def test_many_commands_at_once_finish_in_parallel_time(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    await start_agent()
    await fake_server.wait_for("hello")
    loop = asyncio.get_running_loop()
    began = loop.time()
    for number in range(6):
        await fake_server.run_command(f"wide-{number}", "sleep 1; echo done")
    results = await fake_server.wait_for("command_result", count=6, timeout=10)
    assert loop.time() - began < 3.5  # one after the other would take 6 s
    kinds = [
        item.type
        for item in fake_server.received
        if item.type in ("command_started", "command_result")
    ]
    assert kinds[:6] == ["command_started"] * 6, kinds
    assert all(item.data["stdout"] == "done\n" for item in results)


async def test_commands_do_not_see_the_agent_settings(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    await start_agent(token=None, env={"SYSMANAGE_AGENT_TOKEN": TOKEN})
    await fake_server.wait_for("hello")
    await fake_server.run_command("env-1", "env")
    result = await fake_server.result("env-1")
    assert result["status"] == "completed"
    assert "PATH=" in result["stdout"]
    assert TOKEN not in result["stdout"]
    assert "SYSMANAGE_AGENT_" not in result["stdout"]


async def test_invalid_request_fails_without_running(
    fake_server: FakeServer,
    start_agent: StartAgent,
    tmp_path: Path,
) -> None:
    marker = tmp_path / "ran"
    await start_agent()
    await fake_server.wait_for("hello")
    await fake_server.run_command("bad-timeout", f"touch {marker}", timeout=-1)
    result = await fake_server.result("bad-timeout")
    assert result["status"] == "failed"
    assert "timeout" in result["error"]
    assert result["exit_code"] is None
    assert not marker.exists()
