"""
End to end: a real Daphne server, the real agent program (``python -m agent``) as a
subprocess, and real WebSocket clients speaking the seed protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import harness
from tests.integration.client import WsClient, api, ws_connect
from tests.integration.relay import Relay

pytestmark = pytest.mark.integration

AGENT_SETTINGS = {
    "AGENT_HEARTBEAT_INTERVAL": "2",
    "AGENT_METRICS_INTERVAL": "1",
    "AGENT_RECHECK_SECONDS": "1",
    "COMMAND_RESULT_GRACE_SECONDS": "5",
}


class AgentProcess:
    """The agent program running against a server, with its own state directory."""

    def __init__(
        self,
        server_url: str,
        token: str,
        state_dir: Path,
        log: Path,
        *,
        metrics_interval: float = 1,
        heartbeat_interval: float = 2,
        log_level: str = "DEBUG",
        config: Path | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.args = [
            sys.executable,
            "-m",
            "agent",
            "--server",
            server_url,
            "--state-dir",
            str(state_dir),
            "--metrics-interval",
            str(metrics_interval),
            "--heartbeat-interval",
            str(heartbeat_interval),
            "--log-level",
            log_level,
            *(["--config", str(config)] if config is not None else []),
        ]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SYSMANAGE_")}
        self.env["SYSMANAGE_AGENT_TOKEN"] = token
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        """Start the agent (it connects and reconnects by itself)."""
        handle = self.log.open("ab")
        self.proc = subprocess.Popen(
            self.args,
            cwd=harness.REPO_ROOT,
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture(scope="module")
def deployment(launch_sqlite: Any) -> Iterator[harness.Deployment]:
    """One server on SQLite with short agent intervals."""
    with launch_sqlite("agents", **AGENT_SETTINGS) as deployment:
        yield deployment


def register(deployment: harness.Deployment, hostname: str) -> dict[str, str]:
    """``manage.py register_host``: its last line is the JSON with host_id and token."""
    out = harness.run_python(
        ["manage.py", "register_host", hostname], deployment.env, what="register_host"
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@contextlib.asynccontextmanager
async def running_agent(
    deployment: harness.Deployment,
    tmp_path: Path,
    hostname: str,
    server_url: str | None = None,
    programs: Path | None = None,
) -> AsyncIterator[tuple[dict, AgentProcess]]:
    """Enroll ``hostname``, start its agent, wait until it is online (``programs``: a
    directory the agent looks in first for the programs it runs)."""
    enrolled = register(deployment, hostname)
    agent = AgentProcess(
        server_url or deployment.server.base_url,
        enrolled["token"],
        tmp_path / f"{hostname}-state",
        tmp_path / f"{hostname}.log",
    )
    if programs is not None:
        agent.env["PATH"] = f"{programs}{os.pathsep}{agent.env.get('PATH', os.defpath)}"
    agent.start()
    try:
        await wait_status(deployment, enrolled["host_id"], "online")
        yield enrolled, agent
    finally:
        agent.stop()
        assert enrolled["token"] not in agent.log.read_text(errors="replace")


async def wait_status(
    deployment: harness.Deployment, host_id: str, status: str, timeout: float = 20
) -> None:
    """Poll the REST API until the host has ``status``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await api(
            "GET",
            deployment.server.base_url,
            f"/api/hosts/{host_id}/",
            token=deployment.token("admin"),
        )
        if response.status == 200 and response.body["status"] == status:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"host {host_id} did not become {status}")


async def host_event(ws: WsClient, host_id: str) -> dict[str, Any]:
    """The next ``host_status`` event of ``host_id``."""
    return await ws.expect(
        lambda m: (
            m["type"] == "event"
            and m["channel"] == "host_status"
            and m["data"]["host_id"] == host_id
        ),
        20,
        what="host status event",
    )


async def client(
    stack: contextlib.AsyncExitStack, deployment: harness.Deployment, user: str = "admin"
) -> WsClient:
    """A client socket that closes when ``stack`` does."""
    return await stack.enter_async_context(
        ws_connect(deployment.server.ws_url, token=deployment.token(user))
    )


async def run(
    ws: WsClient, host_id: str, command: str, timeout: int = 10, wait: float = 30
) -> dict[str, Any]:
    return await ws.request(
        {
            "type": "command",
            "channel": "command_execution",
            "data": {"host_id": host_id, "command": command, "timeout": timeout},
        },
        timeout=wait,
    )


async def test_online_metrics_and_offline(deployment, tmp_path):
    async with contextlib.AsyncExitStack() as stack:
        ws = await client(stack, deployment)
        await ws.subscribe("host_status")
        async with running_agent(deployment, tmp_path, "e2e-status") as (enrolled, agent):
            host_id = enrolled["host_id"]
            online = await host_event(ws, host_id)
            assert (online["data"]["status"], online["data"]["previous_status"]) == (
                "online",
                "unknown",
            )
            watcher = await client(stack, deployment)
            await watcher.subscribe(
                "host_metrics", {"host_id": host_id, "metrics": ["cpu", "disk"]}
            )
            event = await watcher.next_event("host_metrics", timeout=10)
            metrics = event["data"]["metrics"]
            assert set(metrics) == {"cpu_usage", "disk_usage"}
            assert 0 <= metrics["cpu_usage"] <= 100
            assert "/" in metrics["disk_usage"]
            assert 0 < metrics["disk_usage"]["/"] <= 100
            agent.stop()
            offline = await host_event(ws, host_id)
            assert (offline["data"]["status"], offline["data"]["previous_status"]) == (
                "offline",
                "online",
            )


async def test_commands_echo_exit_code_timeout_and_concurrency(deployment, tmp_path):
    async with (
        contextlib.AsyncExitStack() as stack,
        running_agent(deployment, tmp_path, "e2e-commands") as (enrolled, _),
    ):
        host_id = enrolled["host_id"]
        ws = await client(stack, deployment)
        echo = await run(ws, host_id, "echo hello from the agent")
        assert echo["type"] == "response"
        assert echo["channel"] == "command_execution"
        data = echo["data"]
        assert (data["status"], data["exit_code"], data["stdout"], data["stderr"]) == (
            "completed",
            0,
            "hello from the agent\n",
            "",
        )
        assert data["execution_time"] >= 0
        assert data["host_id"] == host_id
        failing = await run(ws, host_id, "echo oops >&2; exit 3")
        assert (failing["data"]["exit_code"], failing["data"]["stderr"]) == (3, "oops\n")
        slow = await run(ws, host_id, "sleep 30", timeout=1)
        assert slow["data"]["status"] == "timeout"
        assert slow["data"]["exit_code"] is None
        sockets = [await client(stack, deployment) for _ in range(4)]
        started = time.monotonic()
        results = await asyncio.gather(
            *(run(sock, host_id, f"sleep 1; echo {i}") for i, sock in enumerate(sockets))
        )
        assert sorted(r["data"]["stdout"] for r in results) == [f"{i}\n" for i in range(4)]
        assert time.monotonic() - started < 3.5  # side by side, not one after another


async def test_command_failed_cases(deployment, tmp_path):
    async with contextlib.AsyncExitStack() as stack:
        ws = await client(stack, deployment)
        unknown = await run(ws, "00000000-0000-4000-8000-000000000000", "true")
        assert unknown["data"]["code"] == "COMMAND_FAILED"
        assert unknown["data"]["message"] == "Host not found"
        enrolled = register(deployment, "e2e-never-connected")
        offline = await run(ws, enrolled["host_id"], "true")
        assert offline["type"] == "error"
        assert offline["channel"] == "command_execution"
        assert offline["data"]["code"] == "COMMAND_FAILED"
        assert offline["data"]["message"].startswith("Host not reachable")
        assert offline["data"]["execution_id"]


async def test_result_made_while_disconnected_is_delivered_after_reconnect(deployment, tmp_path):
    proxy = Relay(deployment.server.port)
    port = await proxy.start()
    async with (
        contextlib.AsyncExitStack() as stack,
        running_agent(deployment, tmp_path, "e2e-reconnect", f"http://127.0.0.1:{port}") as (
            enrolled,
            _,
        ),
    ):
        host_id = enrolled["host_id"]
        ws = await client(stack, deployment)
        watcher = await client(stack, deployment)
        await watcher.subscribe("host_status", {"host_id": host_id})
        pending = asyncio.ensure_future(
            run(ws, host_id, "sleep 3; echo survived", timeout=30, wait=60)
        )
        await asyncio.sleep(1)
        proxy.cut()  # the agent loses its socket while the command runs
        offline = await host_event(watcher, host_id)
        online = await host_event(watcher, host_id)  # it reconnected by itself
        assert (offline["data"]["status"], online["data"]["status"]) == ("offline", "online")
        response = await pending
        assert response["type"] == "response", response
        assert (response["data"]["status"], response["data"]["stdout"]) == (
            "completed",
            "survived\n",
        )
        listing = await api(
            "GET",
            deployment.server.base_url,
            f"/api/commands/?host={host_id}",
            token=deployment.token("admin"),
        )
        assert [c["status"] for c in listing.body["results"]] == ["completed"]
    await proxy.close()


async def test_revoked_token_disconnects_the_agent(deployment, tmp_path):
    async with running_agent(deployment, tmp_path, "e2e-revoke") as (enrolled, agent):
        harness.run_python(
            ["manage.py", "revoke_host", "e2e-revoke"], deployment.env, what="revoke_host"
        )
        # Another process revoked it; without a shared layer the connection notices on
        # its next re-check (AGENT_RECHECK_SECONDS=1) and closes with 4001.
        await wait_status(deployment, enrolled["host_id"], "offline", timeout=15)
        log = agent.log.read_text()
        assert "AUTH_FAILED: Agent token was revoked or rotated" in log
        assert agent.proc is not None
        assert agent.proc.poll() is None


def _build_deb(workdir: Path) -> Path:
    root = workdir / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/share/sysmanage-e2e-selftest").mkdir(parents=True)
    (root / "usr/share/sysmanage-e2e-selftest/README").write_text("installed by a test\n")
    (root / "DEBIAN/control").write_text(
        "Package: sysmanage-e2e-selftest\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: SysManage tests <tests@example.invalid>\n"
        "Description: package installed and removed by the end-to-end tests\n"
    )
    target = workdir / "sysmanage-e2e-selftest_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(root), str(target)], check=True, capture_output=True)
    return target


def _installed() -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", "sysmanage-e2e-selftest"],
        capture_output=True,
        text=True,
    )
    return "install ok installed" in result.stdout


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("apt-get") or not shutil.which("dpkg-deb"),
    reason="needs root, apt-get and dpkg-deb",
)
async def test_package_install_and_remove_for_real(deployment, tmp_path):
    deb = _build_deb(tmp_path)
    subprocess.run(["dpkg", "-r", "sysmanage-e2e-selftest"], capture_output=True)
    async with (
        contextlib.AsyncExitStack() as stack,
        running_agent(deployment, tmp_path, "e2e-packages") as (enrolled, _),
    ):
        host_id = enrolled["host_id"]
        ws = await client(stack, deployment)
        await ws.subscribe("package_operations", {"host_id": host_id})
        for operation, package, installed in (
            ("install", str(deb), True),
            ("remove", "sysmanage-e2e-selftest", False),
        ):
            reply = await ws.request(
                {
                    "type": "command",
                    "channel": "package_operations",
                    "data": {"host_id": host_id, "operation": operation, "package": package},
                },
                timeout=30,
            )
            assert reply["type"] == "response", reply
            operation_id = reply["data"]["execution_id"]
            progress = []
            while True:
                event = await ws.expect(
                    lambda m, ref=operation_id: (
                        m["type"] == "event"
                        and m["channel"] == "package_operations"
                        and m["data"]["execution_id"] == ref
                    ),
                    240,
                    what="package progress",
                )
                progress.append(event["data"]["progress"])
                if event["data"]["status"] in ("completed", "failed"):
                    break
            assert event["data"]["status"] == "completed", event
            assert progress[-1] == 100
            assert len(progress) >= 2
            assert _installed() is installed


#: Stands in for apt-get on the agent's PATH: reports 40 % on apt's status descriptor,
#: then takes its time, so that a package operation stays in progress for a while.  In
#: bash: the descriptor may be above 9 (the agent may hold other pipes at that moment,
#: e.g. while it lists pending updates), which dash cannot redirect to.
SLOW_APT_GET = """#!/bin/bash
for arg in "$@"; do
  case "$arg" in APT::Status-Fd=*) fd="${arg#APT::Status-Fd=}" ;; esac
done
eval "echo 'pmstatus:sysmanage-e2e-slow:40:Unpacking sysmanage-e2e-slow' >&$fd"
sleep 5
echo "Setting up sysmanage-e2e-slow"
"""


def slow_package_manager(tmp_path: Path) -> Path:
    """A directory holding :data:`SLOW_APT_GET` as ``apt-get``."""
    programs = tmp_path / "programs"
    programs.mkdir()
    apt_get = programs / "apt-get"
    apt_get.write_text(SLOW_APT_GET)
    apt_get.chmod(0o755)
    return programs


async def subscribed_state(ws: WsClient, channel: str, filters: dict[str, Any]) -> dict[str, Any]:
    """Subscribe; the next message must be the channel's current state: return its data."""
    reply = await ws.subscribe(channel, filters)
    status = await ws.recv()
    assert (status["type"], status["channel"], status.get("id")) == (
        "status",
        channel,
        reply["id"],
    ), status
    return status["data"]


@pytest.mark.skipif(not shutil.which("dpkg"), reason="the agent picks apt only with dpkg")
async def test_a_new_subscriber_gets_what_is_running_open_and_in_progress(deployment, tmp_path):
    """A command running on a real agent, a package operation in progress and an open
    alert reach a subscriber who arrives meanwhile at once, as the ``status`` right after
    the ``response``: each item as that subscriber's events show it, the command's text
    for its requester only."""
    async with (
        contextlib.AsyncExitStack() as stack,
        running_agent(
            deployment, tmp_path, "e2e-snapshots", programs=slow_package_manager(tmp_path)
        ) as (enrolled, _),
    ):
        host_id = enrolled["host_id"]
        only_here = {"host_id": host_id}
        admin = await client(stack, deployment)
        idle = await subscribed_state(admin, "command_execution", only_here)
        assert idle == {"commands": [], "count": 0, "truncated": False}
        idle = await subscribed_state(admin, "package_operations", only_here)
        assert idle == {"operations": [], "count": 0, "truncated": False}

        await admin.send(
            {
                "type": "command",
                "channel": "command_execution",
                "id": "slow-command",
                "data": {"host_id": host_id, "command": "sleep 5; echo finished", "timeout": 30},
            }
        )
        running = await admin.expect(
            lambda m: (
                m["type"] == "event"
                and m["channel"] == "command_execution"
                and m["data"]["status"] == "running"
            ),
            15,
            what="the command running",
        )
        taken = await admin.request(
            {
                "type": "command",
                "channel": "package_operations",
                "data": {
                    "host_id": host_id,
                    "operation": "install",
                    "package": "sysmanage-e2e-slow",
                },
            },
            timeout=15,
        )
        assert taken["type"] == "response", taken
        progressing = await admin.expect(
            lambda m: (
                m["type"] == "event"
                and m["channel"] == "package_operations"
                and m["data"]["progress"] == 40
            ),
            15,
            what="the operation at 40 %",
        )
        alert = await api(
            "POST",
            deployment.server.base_url,
            "/api/alerts/",
            token=deployment.token("admin"),
            json_body={
                "severity": "critical",
                "category": "disk_space",
                "title": "Disk almost full",
                "message": "Disk usage on / is 97%",
                "host": host_id,
            },
        )
        assert alert.status == 201, alert

        for user in ("admin", "viewer"):
            ws = await client(stack, deployment, user)
            commands = await subscribed_state(ws, "command_execution", only_here)
            expected = running["data"]
            if user == "viewer":  # not the requester, without hosts.view_command_output
                private = dict.fromkeys(("command", "stdout", "stderr", "error"))
                expected = {**expected, **private, "redacted": True}
            assert commands == {"commands": [expected], "count": 1, "truncated": False}
            assert commands["commands"][0]["requested_by"] == "admin"
            assert ("sleep 5" in json.dumps(commands)) is (user == "admin")

            operations = await subscribed_state(ws, "package_operations", only_here)
            assert operations == {
                "operations": [progressing["data"]],
                "count": 1,
                "truncated": False,
            }
            assert (progressing["data"]["status"], progressing["data"]["message"]) == (
                "in_progress",
                "Unpacking sysmanage-e2e-slow",
            )

            alerts = await subscribed_state(
                ws, "system_alerts", {"severity": ["critical"], "host_id": host_id}
            )
            assert alerts["count"] == 1
            [item] = alerts["alerts"]
            assert {k: item[k] for k in ("alert_id", "action", "status", "hostname")} == {
                "alert_id": alert.body["id"],
                "action": "raised",
                "status": "open",
                "hostname": "e2e-snapshots",
            }
            assert await subscribed_state(
                ws, "system_alerts", {"severity": ["info"], "host_id": host_id}
            ) == {"alerts": [], "count": 0, "truncated": False}

        done = await admin.expect(lambda m: m.get("id") == "slow-command", 30, what="result")
        assert (done["data"]["status"], done["data"]["stdout"]) == ("completed", "finished\n")
        await admin.expect(
            lambda m: (
                m["type"] == "event" and m["channel"] == "package_operations" and m["data"]["final"]
            ),
            30,
            what="the operation's end",
        )
        later = await client(stack, deployment, "viewer")
        assert (await subscribed_state(later, "command_execution", only_here))["count"] == 0
        assert (await subscribed_state(later, "package_operations", only_here))["count"] == 0
        resolved = await api(
            "POST",
            deployment.server.base_url,
            f"/api/alerts/{alert.body['id']}/resolve/",
            token=deployment.token("admin"),
        )
        assert resolved.status == 200, resolved


async def test_fleet_status_is_right_after_a_server_restart(launch_sqlite, tmp_path):
    with launch_sqlite("restart", **AGENT_SETTINGS) as restart:
        proxy = Relay(restart.server.port)
        port = await proxy.start()
        async with (
            contextlib.AsyncExitStack() as stack,
            running_agent(restart, tmp_path, "e2e-restart", f"http://127.0.0.1:{port}") as (
                enrolled,
                _,
            ),
        ):
            ws = await client(stack, restart)
            _, before = await ws.subscribe_with_status("fleet_status")
            assert before["data"]["online_hosts"] >= 1
        # the agent is stopped: the host is offline now; restart the server process
        await wait_status(restart, enrolled["host_id"], "offline")
        old = restart.servers[0]
        old.stop()
        (new,) = harness.start_servers([("restart-2", restart.env)], tmp_path)
        restart.servers[0] = new
        proxy.target_port = new.port
        async with contextlib.AsyncExitStack() as stack:
            ws = await client(stack, restart)
            _, after = await ws.subscribe_with_status("fleet_status")
            figures = {k: after["data"][k] for k in ("total_hosts", "online_hosts")}
            assert figures == {
                "total_hosts": before["data"]["total_hosts"],
                "online_hosts": before["data"]["online_hosts"] - 1,
            }
            agent = AgentProcess(
                f"http://127.0.0.1:{port}",
                enrolled["token"],
                tmp_path / "restart-state",
                tmp_path / "restart2.log",
            ).start()
            try:
                event = await ws.expect(
                    lambda m: (
                        m["type"] == "event"
                        and m["channel"] == "fleet_status"
                        and m["data"]["online_hosts"] == before["data"]["online_hosts"]
                    ),
                    20,
                    what="fleet status with the host back online",
                )
                assert event["data"]["total_hosts"] == before["data"]["total_hosts"]
            finally:
                agent.stop()
        await proxy.close()


async def test_seed_demo_streams_a_live_fleet(deployment, tmp_path):
    async with contextlib.AsyncExitStack() as stack:
        ws = await client(stack, deployment)
        demo = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "seed_demo",
                "--server",
                deployment.server.base_url,
                "--hosts",
                "3",
                "--interval",
                "0.5",
                "--duration",
                "8",
                "--seed",
                "1",
            ],
            cwd=harness.REPO_ROOT,
            env=deployment.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            await asyncio.sleep(2)
            host_id = await asyncio.to_thread(
                harness.manage_shell,
                deployment.env,
                "from hosts.models import Host; print(Host.objects.get(hostname='demo-web-01').id)",
            )
            await ws.subscribe("host_metrics", {"host_id": host_id.strip()})
            event = await ws.next_event("host_metrics", timeout=10)
            assert set(event["data"]["metrics"]) == {
                "cpu_usage",
                "memory_usage",
                "disk_usage",
                "load_average",
            }
            await wait_status(deployment, host_id.strip(), "online")
        finally:
            output, _ = await asyncio.to_thread(demo.communicate, timeout=30)
        assert demo.returncode == 0, output
        assert b"Streaming metrics from 3 demo hosts" in output


async def wait_command(
    deployment: harness.Deployment, host_id: str, status: str, timeout: float = 40
) -> dict[str, Any]:
    """Poll the REST API until the host's latest command has ``status``; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = await api(
            "GET",
            deployment.server.base_url,
            f"/api/commands/?host={host_id}",
            token=deployment.token("admin"),
        )
        results = listing.body["results"] if listing.status == 200 else []
        if results and results[0]["status"] == status:
            return results[0]
        await asyncio.sleep(0.3)
    raise AssertionError(f"the command of {host_id} did not become {status}")


async def test_command_running_across_a_server_restart_ends_recorded(launch_sqlite, tmp_path):
    with launch_sqlite("restart-cmd", **AGENT_SETTINGS) as restart:
        proxy = Relay(restart.server.port)
        port = await proxy.start()
        async with running_agent(
            restart, tmp_path, "e2e-restart-cmd", f"http://127.0.0.1:{port}"
        ) as (enrolled, _):
            host_id = enrolled["host_id"]
            async with contextlib.AsyncExitStack() as stack:
                ws = await client(stack, restart)
                await ws.send(
                    {
                        "type": "command",
                        "channel": "command_execution",
                        "id": "r1",
                        "data": {
                            "host_id": host_id,
                            "timeout": 30,
                            "command": "sleep 4; echo after-restart",
                        },
                    }
                )
                await wait_command(restart, host_id, "running", timeout=15)
            restart.servers[0].stop()  # the server goes away while the command runs
            (new,) = harness.start_servers([("restart-cmd-2", restart.env)], tmp_path)
            restart.servers[0] = new
            proxy.target_port = new.port
            restart.tokens.clear()
            done = await wait_command(restart, host_id, "completed")
            assert (done["stdout_preview"], done["exit_code"]) == ("after-restart\n", 0)
            # a list carries outputs in short; the execution itself has them whole
            record = await api(
                "GET",
                restart.server.base_url,
                f"/api/commands/{done['id']}/",
                token=restart.token("admin"),
            )
            assert record.body["stdout"] == "after-restart\n"
        await proxy.close()


async def test_a_flood_of_garbage_on_the_agent_socket_is_rate_limited_and_closed(deployment):
    """Frames that do not parse, text or binary, take the rate like any other: past the
    burst they are refused unparsed, and an agent that keeps sending is closed (4029)."""
    enrolled = register(deployment, "garbage-flood")
    url = deployment.server.ws_url.replace("/ws", "/ws/agent")
    headers = {"Authorization": f"Bearer {enrolled['token']}"}
    async with ws_connect(url, headers=headers) as client:
        for i in range(1000):
            await client.ws.send(b"\x00garbage" if i % 2 else "{not json")
        closed = await client.expect_closed(timeout=20)
    assert closed.code == 4029, closed.code
    codes = [m["data"]["code"] for m in closed.messages]
    assert set(codes) == {"INVALID_JSON", "INVALID_MESSAGE", "RATE_LIMITED"}, set(codes)
    first_refused = codes.index("RATE_LIMITED")
    assert 200 <= first_refused <= 210, first_refused  # the burst allowance is 200
    assert codes.count("RATE_LIMITED") == 101, codes.count("RATE_LIMITED")
    assert closed.messages[-1]["data"]["message"] == "Too many messages; connection closed"


async def test_hosts_a_killed_server_left_online_follow_who_reconnects(launch_sqlite, tmp_path):
    """A server process killed outright cannot mark its agents' hosts offline. After it
    is started again, a host whose agent comes back stays online; a host whose agent does
    not is taken offline once silent for HOST_OFFLINE_AFTER_SECONDS, and ``host_status``
    says so -- no host stays "online" on a stale ``last_seen``."""
    settings = {
        **AGENT_SETTINGS,
        "HOST_OFFLINE_AFTER_SECONDS": "5",
        "MAINTENANCE_SWEEP_SECONDS": "1",
    }
    with launch_sqlite("stale-hosts", **settings) as deployment:
        proxy = Relay(deployment.server.port)
        port = await proxy.start()
        try:
            async with (
                running_agent(deployment, tmp_path, "stale-back", f"http://127.0.0.1:{port}") as (
                    back,
                    _,
                ),
                running_agent(deployment, tmp_path, "stale-gone") as (gone, gone_agent),
            ):
                deployment.servers[0].kill()
                gone_agent.stop()  # its host is still "online" in the database
                stored = await asyncio.to_thread(
                    harness.manage_shell,
                    deployment.env,
                    "from hosts.models import Host; "
                    "print(Host.objects.get(hostname='stale-gone').status)",
                )
                assert stored.strip() == "online", stored
                (new,) = harness.start_servers([("stale-hosts-2", deployment.env)], tmp_path)
                deployment.servers[0] = new
                proxy.target_port = new.port
                async with contextlib.AsyncExitStack() as stack:
                    ws = await client(stack, deployment)
                    await ws.subscribe("host_status")
                    went = await ws.expect(
                        lambda m: (
                            m["type"] == "event"
                            and m["channel"] == "host_status"
                            and m["data"].get("host_id") == gone["host_id"]
                            and m["data"].get("status") == "offline"
                        ),
                        20,
                        what="host_status: the host whose agent did not return went offline",
                    )
                    assert went["data"]["hostname"] == "stale-gone", went
                    await wait_status(deployment, back["host_id"], "online")
                    # the returning agent's host never went offline
                    offline_back = [
                        m
                        for m in ws.pending
                        if m.get("channel") == "host_status"
                        and m["data"].get("host_id") == back["host_id"]
                        and m["data"].get("status") == "offline"
                    ]
                    assert not offline_back, offline_back
        finally:
            await proxy.close()
