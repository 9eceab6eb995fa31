"""Fixtures for the agent tests: a fake protocol server and the real agent as a process.

These tests need no database: the agent is a separate program that never imports Django.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import psutil
import pytest

from tests.agent.fake_server import TOKEN, FakeServer

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Environment variables the agent reads; the tests set them explicitly or not at all.
_AGENT_ENV_PREFIXES = ("SYSMANAGE_AGENT_", "XDG_STATE_HOME")
_PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
)


class AgentProcess:
    """A running ``python -m agent`` and its log."""

    def __init__(
        self, process: asyncio.subprocess.Process, log_path: Path, state_dir: Path
    ) -> None:
        """Wrap a started agent process."""
        self.process = process
        self.log_path = log_path
        self.state_dir = state_dir

    @property
    def pid(self) -> int:
        """The agent's process id."""
        return self.process.pid

    def log(self) -> str:
        """Everything the agent logged so far."""
        return self.log_path.read_text(errors="replace")

    def spool_files(self) -> list[Path]:
        """The unacknowledged results in the agent's state directory."""
        directory = self.state_dir / "results"
        return sorted(directory.glob("*.json")) if directory.exists() else []

    async def wait_spool(self, count: int, timeout: float = 10.0) -> list[Path]:
        """Wait until the spool holds exactly ``count`` results."""
        async with asyncio.timeout(timeout):
            while len(self.spool_files()) != count:
                await asyncio.sleep(0.05)
        return self.spool_files()

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the agent and wait for it to exit; return its exit status."""
        if self.process.returncode is None:
            self.process.send_signal(sig)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError as exc:
                self.process.kill()
                await self.process.wait()
                raise AssertionError(
                    f"agent did not stop within {timeout}s:\n{self.log()}"
                ) from exc
        return self.process.returncode


def agent_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for an agent process: this one, minus agent settings and proxies."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(_AGENT_ENV_PREFIXES) and name not in _PROXY_VARIABLES
    }
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra or {})
    return env


StartAgent = Callable[..., Awaitable[AgentProcess]]


@pytest.fixture
async def fake_server() -> AsyncIterator[FakeServer]:
    """A started fake server; the test fails if the agent broke the protocol."""
    server = FakeServer()
    await server.start()
    yield server
    await server.stop()
    assert server.violations == []


@pytest.fixture
async def start_agent(tmp_path: Path, fake_server: FakeServer) -> AsyncIterator[StartAgent]:
    """Start the real agent against ``fake_server``; every agent is stopped afterwards.

    Every agent logs at DEBUG, and the test fails if the token appears in any log.
    """
    agents: list[AgentProcess] = []

    async def start(
        *args: str,
        token: str | None = TOKEN,
        env: dict[str, str] | None = None,
        state_dir: Path | None = None,
        server: bool = True,
    ) -> AgentProcess:
        """Start ``python -m agent`` with ``args`` after the standard test options."""
        state = state_dir or tmp_path / "state"
        argv = [sys.executable, "-m", "agent", "--state-dir", str(state), "--log-level", "DEBUG"]
        if server:
            argv += ["--server", fake_server.url]
        if token is not None:
            argv += ["--token", token]
        log_path = tmp_path / f"agent-{len(agents)}.log"
        with log_path.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                *argv,
                *args,
                cwd=REPO_ROOT,
                env=agent_environment(env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        agent = AgentProcess(process, log_path, state)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        await agent.stop()
    for agent in agents:
        assert TOKEN not in agent.log(), "the token appeared in the agent's log"


def live_processes(argv: list[str]) -> list[psutil.Process]:
    """Running (non-zombie) processes whose command line is exactly ``argv``."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["cmdline"] == argv and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


async def wait_until_gone(argv: list[str], timeout: float = 5.0) -> list[psutil.Process]:
    """Wait for processes running ``argv`` to disappear; return any that remain."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (remaining := live_processes(argv)) and loop.time() < deadline:
        await asyncio.sleep(0.1)
    return remaining


def kill_processes(argv: list[str]) -> None:
    """Kill leftover processes running ``argv`` (cleanup after a failed test)."""
    for process in live_processes(argv):
        with contextlib.suppress(psutil.Error):
            process.kill()
