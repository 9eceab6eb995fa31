"""
The deployment of ``deploy/``, tested: Debian's nginx with the shipped configuration
(``deploy/nginx/sysmanage-upstream.conf`` and ``sysmanage-locations.conf``, only the
upstream ports and the static files' directory changed) on loopback, in front of two
server processes on PostgreSQL and Redis; the WebSocket API, the agent
(``python -m agent``) and the REST API through it; and a rolling restart: each server
process in turn gets SIGTERM while 50 clients and the agent are connected through nginx.

nginx runs as the current user with a prefix of its own (``tests/integration/nginx.py``).
``scripts/test`` installs the ``nginx`` package; without it these tests are skipped (a
failure when ``CI`` is set).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from sysmanage import drain
from tests.integration import harness
from tests.integration.client import api
from tests.integration.nginx import DEPLOY, Nginx, find_nginx
from tests.integration.test_agent_e2e import AGENT_SETTINGS, AgentProcess, register

pytestmark = pytest.mark.integration

#: The drain window of the servers here (the default is 10 s).
DRAIN_SECONDS = 5.0
#: Clients connected through nginx during the rolling restart.
CLIENTS = 50


def nginx_binary() -> str:
    """Debian's nginx; skipped (failed when ``CI`` is set) if it is not installed."""
    found = find_nginx()
    if found is None:
        reason = "nginx is not installed (scripts/test installs Debian's nginx package)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this is a failure", pytrace=False)
        pytest.skip(reason)
    return found


@dataclass
class Stack:
    """Two servers, nginx in front, and the agent of one host connected through it."""

    deployment: harness.Deployment
    nginx: Nginx
    token: str
    host_id: str
    agent: AgentProcess


@pytest.fixture(scope="module")
def stack(launch_pg_redis: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = nginx_binary()
    settings = {
        **AGENT_SETTINGS,
        "DRAIN_SECONDS": str(DRAIN_SECONDS),
        # every client of the test is the admin, and all of them end up on one process
        "WS_MAX_SOCKETS_PER_USER": str(CLIENTS * 4),
    }
    with launch_pg_redis("deploy", **settings) as deployment:
        work = tmp_path_factory.mktemp("nginx")
        nginx = Nginx(binary, work / "nginx", [s.port for s in deployment.servers]).start()
        try:
            enrolled = register(deployment, "behind-nginx")
            agent = AgentProcess(
                nginx.base_url, enrolled["token"], work / "agent-state", work / "agent.log"
            ).start()
            try:
                yield Stack(
                    deployment, nginx, deployment.token("admin"), enrolled["host_id"], agent
                )
            finally:
                agent.stop()
        finally:
            nginx.stop()


def connect(url: str, token: str) -> Any:
    return websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10
    )


async def request(ws: Any, message: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    """Send ``message`` and return the reply with its id (other messages are skipped)."""
    await ws.send(json.dumps(message))
    async with asyncio.timeout(timeout):
        while True:
            reply = json.loads(await ws.recv())
            if reply.get("id") == message["id"]:
                return reply


async def host_online(stack: Stack, timeout: float = 20) -> None:
    """Wait until the REST API, through nginx, says the host is online."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await api(
            "GET", stack.nginx.base_url, f"/api/hosts/{stack.host_id}/", token=stack.token
        )
        if response.status == 200 and response.body["status"] == "online":
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"the host did not come online:\n{stack.agent.log.read_text()[-3000:]}")


def command(host_id: str, text: str, id_: str) -> dict[str, Any]:
    return {
        "type": "command",
        "channel": "command_execution",
        "id": id_,
        "data": {"host_id": host_id, "command": text, "timeout": 30},
    }


async def test_the_api_and_an_agent_through_nginx(stack):
    await host_online(stack)
    async with connect(stack.nginx.ws_url, stack.token) as ws:
        subscribed = await request(
            ws,
            {
                "type": "subscribe",
                "channel": "host_metrics",
                "filters": {"host_id": stack.host_id},
                "id": "s",
            },
        )
        assert subscribed["type"] == "response", subscribed
        async with asyncio.timeout(10):  # the agent reports every second
            while (event := json.loads(await ws.recv()))["type"] != "event":
                pass
        assert event["channel"] == "host_metrics"
        assert event["data"]["host_id"] == stack.host_id
        reply = await request(ws, command(stack.host_id, "echo through nginx", "c"), 40)
        assert reply["type"] == "response", reply
        assert (reply["data"]["status"], reply["data"]["stdout"]) == (
            "completed",
            "through nginx\n",
        )
    hosts = await api("GET", stack.nginx.base_url, "/api/hosts/", token=stack.token)
    assert hosts.status == 200
    assert harness.http_get(f"{stack.nginx.base_url}/readyz")[0] == 200
    assert harness.http_get(f"{stack.nginx.base_url}/metrics")[0] == 404  # scraped directly
    status, script = harness.http_get(f"{stack.nginx.base_url}/static/js/sysmanage-client.js")
    assert status == 200
    assert "export class" in script


@dataclass
class Follower:
    """A client through nginx that stays subscribed to ``host_status``: after a close it
    reconnects at once (a small random delay, as the browser client does after 1012) and
    resumes its subscription with ``since``."""

    url: str
    token: str
    #: (when, close code) of each close
    closes: list[tuple[float, int | None]] = field(default_factory=list)
    #: when each subscription was confirmed
    subscribed: list[float] = field(default_factory=list)
    #: ``recovered`` of each resumed subscription
    recovered: list[bool] = field(default_factory=list)
    #: handshakes refused (HTTP status) or failed (the error)
    refused: list[str] = field(default_factory=list)
    #: hosts this client was told went offline
    offline: list[str] = field(default_factory=list)
    position: dict[str, Any] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            ws = None
            try:
                async with connect(self.url, self.token) as ws:
                    await self._follow(ws)
            except InvalidStatus as exc:
                self.refused.append(f"HTTP {exc.response.status_code}")
            except ConnectionClosed:
                pass
            except (InvalidHandshake, OSError) as exc:
                self.refused.append(repr(exc))
            if ws is not None:
                self.closes.append((time.monotonic(), ws.close_code))
            await asyncio.sleep(random.uniform(0, 0.2))

    async def _follow(self, ws: Any) -> None:
        subscribe: dict[str, Any] = {"type": "subscribe", "channel": "host_status", "id": "s"}
        if self.position is not None:
            subscribe["since"] = self.position
        await ws.send(json.dumps(subscribe))
        async for raw in ws:
            message = json.loads(raw)
            if message.get("id") == "s" and message["type"] == "response":
                self.position = message["data"].get("position", self.position)
                if "recovered" in message["data"]:
                    self.recovered.append(message["data"]["recovered"])
                self.subscribed.append(time.monotonic())
            elif message["type"] == "event":
                self.position = {"epoch": message["epoch"], "offset": message["offset"]}
                if message["data"].get("status") == "offline":
                    self.offline.append(message["data"]["host_id"])

    def back_after(self, closed_at: float) -> float | None:
        """Seconds from a close to the next confirmed subscription, if there was one."""
        later = [t for t in self.subscribed if t > closed_at]
        return min(later) - closed_at if later else None


def agent_server(deployment: harness.Deployment) -> harness.DaphneServer:
    """The server process the agent is connected to, from their access logs."""
    for server in deployment.servers:
        log = server.log()
        if log.count('"WSCONNECT /ws/agent"') > log.count('"WSDISCONNECT /ws/agent"'):
            return server
    raise AssertionError("the agent is connected to neither server")


async def http_poller(url: str, token: str, stop: asyncio.Event, statuses: list[int]) -> None:
    """Ask the REST API through nginx every 0.1 s, noting each answer's status."""
    while not stop.is_set():
        response = await api("GET", url, "/api/hosts/", token=token)
        statuses.append(response.status)
        await asyncio.sleep(0.1)


async def restart(
    stack: Stack,
    followers: list[Follower],
    *,
    command_text: str,
    marker: str,
    requester_id: str,
) -> float:
    """SIGTERM the server process the agent is on while it runs ``command_text`` (sent by
    a client connected straight to the other process); check that the process drains and
    exits 0, that every client it closed comes back through nginx within the window, and
    that the command's result is stored; then start the process again.  Return how long
    the drain took."""
    deployment = stack.deployment
    leaving = agent_server(deployment)
    staying = next(s for s in deployment.servers if s is not leaving)
    async with connect(staying.ws_url, stack.token) as requester:
        await requester.send(json.dumps(command(stack.host_id, command_text, requester_id)))
        await wait_running(stack)
        began = time.monotonic()
        leaving.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(leaving.process.wait, DRAIN_SECONDS + 10)
        took = time.monotonic() - began
        assert leaving.stop() == 0, leaving.log()[-3000:]  # stopped by itself: exit 0
        async with asyncio.timeout(60):
            while (reply := json.loads(await requester.recv())).get("id") != requester_id:
                pass
    assert reply["type"] == "response", reply
    assert (reply["data"]["status"], reply["data"]["stdout"]) == ("completed", f"{marker}\n")
    await asyncio.sleep(1.5)  # the last clients closed come back
    moved, slowest = 0, 0.0
    for follower in followers:
        for closed_at, code in follower.closes:
            if closed_at < began:
                continue
            assert code == 1012, (
                f"closed {closed_at - began:.2f}s after SIGTERM with {code}; the drain took "
                f"{took:.2f}s; subscribed at {[round(t - began, 2) for t in follower.subscribed]}"
                f"\nnginx:\n{stack.nginx.errors()[-3000:]}"
            )
            back = follower.back_after(closed_at)
            assert back is not None, (follower.closes, follower.subscribed)
            assert back < 2.0, (back, follower.closes, follower.subscribed)
            # closed early enough in the window to be back on the other before it ends
            assert closed_at - began < drain.spread(DRAIN_SECONDS) + 0.5
            moved += 1
            slowest = max(slowest, back)
    assert moved > 0, "the restarted process held none of the clients"
    drained = [line for line in leaving.log().splitlines() if "drained in" in line]
    print(
        f"{leaving.name}: exit 0 {took:.1f}s after SIGTERM; {moved} clients moved, each back "
        f"within {slowest:.2f}s of its 1012; {drained[-1] if drained else 'no drain line'}"
    )
    # the process again, on its port
    index = deployment.servers.index(leaving)
    log = leaving.log_path.with_suffix(".2.log")
    again = harness.DaphneServer(f"{leaving.name}-again", deployment.env, log, leaving.port)
    deployment.servers[index] = again.start().wait_ready()
    return took


async def wait_running(stack: Stack, timeout: float = 15) -> None:
    """Wait until the agent has started the latest command."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = await api(
            "GET",
            stack.nginx.base_url,
            f"/api/commands/?host={stack.host_id}&status=running",
            token=stack.token,
        )
        if listing.status == 200 and listing.body["results"]:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the agent did not start the command")


async def test_a_rolling_restart_through_nginx(stack):
    await host_online(stack)
    stop = asyncio.Event()
    followers = [Follower(stack.nginx.ws_url, stack.token) for _ in range(CLIENTS)]
    statuses: list[int] = []
    tasks = [asyncio.create_task(f.run(stop)) for f in followers]
    poller = http_poller(stack.nginx.base_url, stack.token, stop, statuses)
    tasks.append(asyncio.create_task(poller))
    try:
        async with asyncio.timeout(20):
            while not all(f.subscribed for f in followers):
                await asyncio.sleep(0.1)
        # The first process the agent is on: its result arrives during the drain, which
        # waits for it before closing the agent.
        await restart(
            stack,
            followers,
            command_text="sleep 2; echo during-the-drain",
            marker="during-the-drain",
            requester_id="first",
        )
        await host_online(stack)
        # Then the other (the agent moved to it): the command outlasts the window, so the
        # agent is closed with it running and sends its result after reconnecting.
        await restart(
            stack,
            followers,
            command_text=f"sleep {DRAIN_SECONDS + 2:.0f}; echo after-the-drain",
            marker="after-the-drain",
            requester_id="second",
        )
        await host_online(stack)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    refused = [r for f in followers for r in f.refused]
    assert refused == [], refused  # no 5xx, no 403: nginx took every handshake elsewhere
    assert set(statuses) == {200}, sorted(set(statuses))
    assert all(all(f.recovered) for f in followers), "a resumed subscription lost events"
    assert sum(len(f.recovered) for f in followers) >= CLIENTS  # each moved at least once
    # The agent moved twice without its host going offline.
    assert not any(stack.host_id in f.offline for f in followers)
    # Only the two stops closed anything.
    assert {code for f in followers for _, code in f.closes} == {1012}


def test_the_tls_site_is_accepted_by_nginx(tmp_path):
    """``nginx -t`` on the whole site of ``deploy/nginx/sysmanage.conf`` (TLS, the
    redirect, the access log), with a throwaway certificate in place of the real one."""
    binary = nginx_binary()
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=fleet.example.com",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    site = (DEPLOY / "nginx/sysmanage.conf").read_text()
    for shipped, here in (
        ("/etc/nginx/sysmanage/", f"{DEPLOY / 'nginx'}/"),
        ("/etc/ssl/certs/fleet.example.com.pem", str(cert)),
        ("/etc/ssl/private/fleet.example.com.key", str(key)),
        ("/var/log/nginx/", f"{tmp_path}/"),
    ):
        assert shipped in site, f"deploy/nginx/sysmanage.conf lost {shipped!r}"
        site = site.replace(shipped, here)
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path / 'nginx.pid'};\nevents {{}}\n"
        f"http {{ access_log off; include {tmp_path / 'site.conf'}; }}\n"
    )
    checked = subprocess.run(
        [
            binary,
            "-t",
            "-p",
            str(tmp_path),
            "-c",
            str(tmp_path / "nginx.conf"),
            "-e",
            str(tmp_path / "error.log"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert "[warn]" not in checked.stderr, checked.stderr


def test_the_systemd_unit_is_valid_and_outlasts_the_drain(tmp_path):
    """``systemd-analyze verify`` finds nothing to say about the template (with its
    paths pointed at files that exist here), and it gives the drain time to finish."""
    unit = (DEPLOY / "systemd/sysmanage@.service").read_text()
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings["KillSignal"] == "SIGTERM"
    env_default = (DEPLOY / "systemd/sysmanage.env.example").read_text()
    assert "\nDRAIN_SECONDS=10\n" in env_default
    from sysmanage.drain import FINISH_SECONDS

    assert int(settings["TimeoutStopSec"]) >= 10 + FINISH_SECONDS + 10
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    (tmp_path / "sysmanage.env").write_text(env_default)
    local = unit.replace("/srv/sysmanage/.venv/bin/python", harness.PYTHON).replace(
        "/etc/sysmanage/sysmanage.env", str(tmp_path / "sysmanage.env")
    )
    (tmp_path / "sysmanage@8001.service").write_text(local)
    checked = subprocess.run(
        [analyze, "verify", "--man=no", "./sysmanage@8001.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.strip() == "", checked.stderr
