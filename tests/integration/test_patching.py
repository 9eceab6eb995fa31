"""
Pending updates and reboots, end to end: the fake SysManage agent and the real agent
program (with a stand-in ``apt`` and reboot flag file) report to a real server; the
host's REST answer, its page and the fleet figures show what they reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import harness
from tests.integration.client import api, browser_login, http_request, ws_connect
from tests.integration.smagent import WAIT, admin, online_agent
from tests.integration.test_agent_e2e import AGENT_SETTINGS, AgentProcess, register

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deployment(launch_sqlite: Any) -> Iterator[harness.Deployment]:
    """One server for both agents, with short agent intervals and a reboot check every
    second."""
    with launch_sqlite("patching", **AGENT_SETTINGS, ALERT_REBOOT_CHECK_SECONDS="1") as deployment:
        yield deployment


async def updates_of(d: harness.Deployment, host_id: str, user: str = "admin") -> Any:
    return await admin(d, "GET", f"/api/hosts/{host_id}/updates/", user=user)


async def wait_updates(
    d: harness.Deployment, host_id: str, ready: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The host's ``updates`` answer once ``ready`` says it shows what was reported."""
    deadline = time.monotonic() + WAIT
    last = None
    while time.monotonic() < deadline:
        last = await updates_of(d, host_id)
        assert last.status == 200, last
        if ready(last.body):
            return last.body
        await asyncio.sleep(0.1)
    raise AssertionError(f"the updates of {host_id} never became as expected: {last}")


async def fleet_figures(d: harness.Deployment) -> dict[str, Any]:
    """The ``fleet_status`` snapshot a fresh subscriber gets."""
    async with ws_connect(d.server.ws_url, token=d.token("admin")) as ws:
        _, status = await ws.subscribe_with_status("fleet_status")
        return status["data"]


async def wait_figure(d: harness.Deployment, name: str, value: int) -> None:
    deadline = time.monotonic() + WAIT
    figures: dict[str, Any] = {}
    while time.monotonic() < deadline:
        figures = await fleet_figures(d)
        if figures[name] == value:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{name} never became {value}: {figures}")


def host_page(d: harness.Deployment, host_id: str) -> str:
    session = browser_login(d.server.base_url, "admin", d.password)
    page = http_request(
        "GET",
        f"{d.server.base_url}/hosts/{host_id}/",
        opener=session.opener,
        headers={"Accept": "text/html"},
    )
    assert page.status == 200, page
    return str(page.body)


# -- the SysManage agent -----------------------------------------------------------------


async def test_sysmanage_agent_checks_updates_on_connect_and_reports_reboots(deployment):
    d = deployment
    before = await fleet_figures(d)
    async with online_agent(d, "patch") as agent:
        # The server asked for a check as the agent came online; its report is stored.
        body = await wait_updates(d, agent.host_id, lambda b: b["update_count"] == 2)
        assert len(agent.update_checks) == 1
        assert body["security_count"] == 1
        assert body["updates"] == [
            # with the package manager each was reported with (apply_updates needs it)
            {
                "name": "openssl",
                "current": "3.0.11-1",
                "available": "3.0.13-1",
                "security": True,
                "manager": "apt",
            },
            {
                "name": "curl",
                "current": "7.88.1-10",
                "available": "7.88.1-11",
                "security": False,
                "manager": "apt",
            },
        ]
        assert body["reboot_required"] is None
        await wait_figure(
            d, "hosts_with_security_updates", before["hosts_with_security_updates"] + 1
        )

        ack = await agent.send_acked("reboot_status_update", agent.reboot_status_data(True))
        assert ack["data"]["status"] == "received"
        body = await wait_updates(d, agent.host_id, lambda b: b["reboot_required"] is True)
        assert body["reboot_required_since"] is not None
        await wait_figure(d, "hosts_needing_reboot", before["hosts_needing_reboot"] + 1)
        page = await asyncio.to_thread(host_page, d, agent.host_id)
        assert "Reboot required" in page
        assert "openssl" in page
        assert "3.0.13-1" in page

        # On demand: a fresh check, whose report replaces the last one.
        agent.available_updates = []
        refused = await admin(d, "POST", f"/api/hosts/{agent.host_id}/check-updates/", "viewer")
        assert refused.status == 403, refused
        asked = await admin(d, "POST", f"/api/hosts/{agent.host_id}/check-updates/")
        assert asked.status == 202, asked
        body = await wait_updates(d, agent.host_id, lambda b: b["update_count"] == 0)
        assert len(agent.update_checks) == 2
        assert (body["security_count"], body["updates"]) == (0, [])
        await wait_figure(d, "hosts_with_security_updates", before["hosts_with_security_updates"])

        await agent.send_acked("reboot_status_update", agent.reboot_status_data(False))
        body = await wait_updates(d, agent.host_id, lambda b: b["reboot_required"] is False)
        assert body["reboot_required_since"] is None
        await wait_figure(d, "hosts_needing_reboot", before["hosts_needing_reboot"])


# -- this project's agent ------------------------------------------------------------------

#: Stands in for ``apt`` on the agent's PATH: ``apt list --upgradable`` as apt prints it.
FAKE_APT = """#!/bin/sh
[ "$1 $2" = "list --upgradable" ] || exit 100
echo "WARNING: apt does not have a stable CLI interface." >&2
echo "Listing..."
cat "$(dirname "$0")/upgradable.txt"
"""
#: Stands in for ``apt-get``: "upgrading" a package takes it off the upgradable list.
FAKE_APT_GET = """#!/bin/bash
package="${@: -1}"
here="$(dirname "$0")"
grep -v "^$package/" "$here/upgradable.txt" > "$here/upgradable.new"
mv "$here/upgradable.new" "$here/upgradable.txt"
echo "Setting up $package"
"""
UPGRADABLE = (
    "libssl3/stable-security 3.0.15-1~deb12u1 amd64 [upgradable from: 3.0.14-1~deb12u2]\n"
    "tzdata/stable-updates,stable 2025a-0+deb12u1 all [upgradable from: 2024b-0+deb12u1]\n"
)


def fake_programs(tmp_path: Path) -> Path:
    """A directory with the stand-in ``apt`` (and ``apt-get`` and ``dpkg``, so that the
    agent picks apt as its package manager)."""
    programs = tmp_path / "programs"
    programs.mkdir()
    for name, script in (("apt", FAKE_APT), ("apt-get", FAKE_APT_GET)):
        (programs / name).write_text(script)
        (programs / name).chmod(0o755)
    dpkg = shutil.which("dpkg")
    (programs / "dpkg").symlink_to(dpkg or "/bin/true")
    (programs / "upgradable.txt").write_text(UPGRADABLE)
    return programs


@contextlib.asynccontextmanager
async def patch_agent(
    d: harness.Deployment, tmp_path: Path, hostname: str, interval: float = 1
) -> Any:
    """The agent program with the stand-in apt, a reboot flag file of its own and
    ``patch_interval`` of ``interval`` seconds."""
    programs = fake_programs(tmp_path)
    flag = tmp_path / "reboot-required"
    config = tmp_path / "agent.toml"
    config.write_text(f'patch_interval = {interval}\nreboot_required_file = "{flag}"\n')
    enrolled = register(d, hostname)
    agent = AgentProcess(
        d.server.base_url,
        enrolled["token"],
        tmp_path / "state",
        tmp_path / "agent.log",
        config=config,
    )
    agent.env["PATH"] = f"{programs}{os.pathsep}{agent.env.get('PATH', os.defpath)}"
    agent.start()
    try:
        yield enrolled["host_id"], programs, flag
    finally:
        agent.stop()


async def test_agent_reports_pending_updates_and_the_reboot_flag(deployment, tmp_path):
    d = deployment
    before = await fleet_figures(d)
    async with patch_agent(d, tmp_path, "patch-native") as (host_id, programs, flag):
        body = await wait_updates(d, host_id, lambda b: b["update_count"] == 2)
        assert body["security_count"] == 1
        assert body["updates"] == [
            {
                "name": "libssl3",
                "current": "3.0.14-1~deb12u2",
                "available": "3.0.15-1~deb12u1",
                "security": True,
            },
            {
                "name": "tzdata",
                "current": "2024b-0+deb12u1",
                "available": "2025a-0+deb12u1",
                "security": False,
            },
        ]
        assert body["reboot_required"] is False
        await wait_figure(
            d, "hosts_with_security_updates", before["hosts_with_security_updates"] + 1
        )

        # The flag file appears: reported at the next look (the interval is 1 s).
        flag.write_text("*** System restart required ***\n")
        body = await wait_updates(d, host_id, lambda b: b["reboot_required"] is True)
        await wait_figure(d, "hosts_needing_reboot", before["hosts_needing_reboot"] + 1)
        page = await asyncio.to_thread(host_page, d, host_id)
        assert "Reboot required" in page
        assert "libssl3" in page

        # The updates are installed and the host rebooted: both clear.
        (programs / "upgradable.txt").write_text("")
        flag.unlink()
        body = await wait_updates(
            d, host_id, lambda b: b["update_count"] == 0 and b["reboot_required"] is False
        )
        await wait_figure(d, "hosts_needing_reboot", before["hosts_needing_reboot"])
        await wait_figure(d, "hosts_with_security_updates", before["hosts_with_security_updates"])


async def test_a_check_asked_for_reaches_the_agent_program(deployment, tmp_path):
    """With a long interval the agent looks only when connecting, and when asked."""
    d = deployment
    async with patch_agent(d, tmp_path, "patch-asked", 3600) as (host_id, programs, _):
        await wait_updates(d, host_id, lambda b: b["update_count"] == 2)
        (programs / "upgradable.txt").write_text(UPGRADABLE.splitlines()[1] + "\n")
        asked = await api(
            "POST",
            d.server.base_url,
            f"/api/hosts/{host_id}/check-updates/",
            token=d.token("admin"),
        )
        assert asked.status == 202, asked
        body = await wait_updates(d, host_id, lambda b: b["update_count"] == 1)
        assert body["security_count"] == 0


# -- the reboot alert ----------------------------------------------------------------------


def set_reboot_rule(d: harness.Deployment, warning_hours: float) -> None:
    """Set the default "Reboot pending" rule's warning threshold (as in the admin)."""
    code = (
        "from alerts.models import AlertRule; "
        "AlertRule.objects.filter(metric='reboot_required')"
        f".update(warning_threshold={warning_hours})"
    )
    harness.run_python(["manage.py", "shell", "-c", code], d.env, what="set the reboot rule")


async def reboot_alerts(d: harness.Deployment, host_id: str, status: str) -> list[Any]:
    reply = await admin(d, "GET", f"/api/alerts/?host={host_id}&status={status}")
    assert reply.status == 200, reply
    body = reply.body["results"] if isinstance(reply.body, dict) else reply.body
    return [a for a in body if a["category"] == "patching"]


async def wait_reboot_alerts(
    d: harness.Deployment, host_id: str, status: str, count: int
) -> list[Any]:
    deadline = time.monotonic() + WAIT
    found: list[Any] = []
    while time.monotonic() < deadline:
        found = await reboot_alerts(d, host_id, status)
        if len(found) == count:
            return found
        await asyncio.sleep(0.2)
    raise AssertionError(f"{count} {status} reboot alert(s) expected for {host_id}: {found}")


async def test_a_reboot_pending_too_long_raises_an_alert_resolved_by_the_reboot(deployment):
    d = deployment
    async with online_agent(d, "reboot") as agent:
        await agent.send_acked("reboot_status_update", agent.reboot_status_data(True))
        await wait_updates(d, agent.host_id, lambda b: b["reboot_required"] is True)
        # Under the default 24 hours: no alert.
        await asyncio.sleep(2.5)
        assert await reboot_alerts(d, agent.host_id, "open") == []
        set_reboot_rule(d, 0.0)
        try:
            (alert,) = await wait_reboot_alerts(d, agent.host_id, "open", 1)
            assert alert["severity"] == "warning"
            assert alert["title"] == f"Reboot pending: {agent.hostname}"
            # Rebooted: the agent says so, and the alert is resolved by itself.
            await agent.send_acked("reboot_status_update", agent.reboot_status_data(False))
            (resolved,) = await wait_reboot_alerts(d, agent.host_id, "resolved", 1)
            assert resolved["id"] == alert["id"]
            assert await reboot_alerts(d, agent.host_id, "open") == []
        finally:
            set_reboot_rule(d, 24.0)


async def test_a_package_operation_is_followed_by_a_fresh_report(deployment, tmp_path):
    """The pending updates change with a package operation: the agent looks again when
    it ends (the interval here is an hour)."""
    d = deployment
    async with (
        patch_agent(d, tmp_path, "patch-upgrade", 3600) as (host_id, _, _),
        ws_connect(d.server.ws_url, token=d.token("admin")) as ws,
    ):
        await wait_updates(d, host_id, lambda b: b["security_count"] == 1)
        reply = await ws.request(
            {
                "type": "command",
                "channel": "package_operations",
                "data": {"host_id": host_id, "operation": "update", "package": "libssl3"},
            },
            timeout=30,
        )
        assert reply["type"] == "response", reply
        body = await wait_updates(d, host_id, lambda b: b["update_count"] == 1)
        assert body["security_count"] == 0
        assert [u["name"] for u in body["updates"]] == ["tzdata"]
