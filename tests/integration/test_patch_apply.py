"""
Applying updates and rebooting, end to end: the real agent program (with stand-ins for
``apt`` and ``apt-get`` on its PATH, and a reboot command that only removes the reboot
flag file) and the fake SysManage agent (``apply_updates``, ``reboot_system``, then
``check_reboot_status``) against a real server; who may ask for it (REST); the reboot
waits for the host to go and come back, and the patch status is fresh afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import harness
from tests.integration.client import api, obtain_tokens, ws_connect
from tests.integration.smagent import WAIT, admin, go_online, online_agent, wait_host_status
from tests.integration.test_agent_e2e import AGENT_SETTINGS, AgentProcess
from tests.integration.test_host_groups import manage
from tests.integration.test_patching import FAKE_APT, UPGRADABLE, wait_updates

pytestmark = pytest.mark.integration

#: Stands in for ``apt-get``: notes its arguments; ``upgrade`` empties the upgradable
#: list, ``install --only-upgrade NAMES`` takes the names off it.
FAKE_APT_GET = """#!/bin/bash
here="$(dirname "$0")"
echo "$*" >> "$here/apt-get.log"
case " $* " in *" upgrade "*) : > "$here/upgradable.txt"; exit 0;; esac
for name in "$@"; do
  case "$name" in -*|*=*|install) continue;; esac
  grep -v "^$name/" "$here/upgradable.txt" > "$here/upgradable.new"
  mv "$here/upgradable.new" "$here/upgradable.txt"
  echo "Setting up $name"
done
"""


@pytest.fixture(scope="module")
def deployment(launch_sqlite: Any) -> Iterator[harness.Deployment]:
    with launch_sqlite("patchapply", **AGENT_SETTINGS) as deployment:
        yield deployment


def programs_dir(tmp_path: Path) -> Path:
    programs = tmp_path / "programs"
    programs.mkdir(parents=True)
    for name, script in (("apt", FAKE_APT), ("apt-get", FAKE_APT_GET)):
        (programs / name).write_text(script)
        (programs / name).chmod(0o755)
    (programs / "dpkg").symlink_to("/bin/true")
    (programs / "upgradable.txt").write_text(UPGRADABLE)
    return programs


@contextlib.contextmanager
def agent_program(
    d: harness.Deployment, tmp_path: Path, hostname: str, *groups: str
) -> Iterator[tuple[str, Path, Path]]:
    """The agent program, enrolled in ``groups``, on a host that needs a reboot; its
    reboot command removes the reboot flag file (what a real reboot does to
    ``/var/run/reboot-required``)."""
    programs = programs_dir(tmp_path)
    flag = tmp_path / "reboot-required"
    flag.write_text("*** System restart required ***\n")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'patch_interval = 3600\nreboot_required_file = "{flag}"\n'
        f'reboot_command = ["rm", "-f", "{flag}"]\n'
    )
    args = [a for g in groups for a in ("--group", g)]
    enrolled, _ = manage(d, "register_host", hostname, *args)
    agent = AgentProcess(
        d.server.base_url, enrolled["token"], tmp_path / "state", tmp_path / "a.log", config=config
    )
    agent.env["PATH"] = f"{programs}{os.pathsep}{agent.env.get('PATH', os.defpath)}"
    agent.start()
    try:
        yield enrolled["host_id"], programs, flag
    finally:
        agent.stop()


async def operation_of(d: harness.Deployment, operation_id: str, status: str) -> dict[str, Any]:
    """The package operation once it has ``status``."""
    deadline = time.monotonic() + WAIT * 2
    last: Any = None
    while time.monotonic() < deadline:
        last = await admin(d, "GET", f"/api/package-operations/{operation_id}/")
        if last.status == 200 and last.body["status"] == status:
            return dict(last.body)
        await asyncio.sleep(0.1)
    raise AssertionError(f"operation {operation_id} never became {status}: {last}")


async def test_the_agent_program_applies_updates_and_reboots(deployment, tmp_path):
    d = deployment
    with agent_program(d, tmp_path, "pa-native") as (host_id, programs, flag):
        await wait_updates(d, host_id, lambda b: b["update_count"] == 2)

        asked = await admin(
            d, "POST", f"/api/hosts/{host_id}/apply-updates/", json_body={"which": "security"}
        )
        assert asked.status == 202, asked
        assert (asked.body["operation"], asked.body["package"]) == ("upgrade", "*security")
        done = await operation_of(d, asked.body["execution_id"], "completed")
        assert done["message"] == "apply security updates: completed"
        # apt cannot upgrade security updates only: the agent named the package
        assert "install --only-upgrade -y libssl3" in (programs / "apt-get.log").read_text()
        body = await wait_updates(d, host_id, lambda b: b["update_count"] == 1)
        assert [u["name"] for u in body["updates"]] == ["tzdata"]
        assert body["reboot_required"] is True

        async with ws_connect(d.server.ws_url, token=d.token("admin")) as ws:
            await ws.subscribe("host_status")
            await ws.subscribe("package_operations", {"host_id": host_id})
            reboot = await admin(d, "POST", f"/api/hosts/{host_id}/reboot/")
            assert reboot.status == 202, reboot
            ref = reboot.body["execution_id"]
            seen = await reboot_events(ws, host_id, ref)
        assert seen[0][:2] == ("package", "in_progress")
        assert seen[0][2] == (
            f"Rebooting: waiting for the host to come back. The reboot began (rm -f {flag})"
        )
        assert ("host", "offline") in seen
        assert seen.index(("host", "offline")) < seen.index(("host", "online"))
        assert seen[-1][:2] == ("package", "completed")
        assert seen[-1][2].startswith("Rebooted: the host is back online after")
        assert not flag.exists()  # the reboot command ran
        # fresh after the return: the flag is gone
        await wait_updates(d, host_id, lambda b: b["reboot_required"] is False)

        await apply_all(d, host_id, programs)


async def apply_all(d: harness.Deployment, host_id: str, programs: Path) -> None:
    asked = await admin(d, "POST", f"/api/hosts/{host_id}/apply-updates/", json_body={})
    assert asked.status == 202, asked
    await operation_of(d, asked.body["execution_id"], "completed")
    assert "upgrade --with-new-pkgs -y" in (programs / "apt-get.log").read_text()
    await wait_updates(d, host_id, lambda b: b["update_count"] == 0)


async def reboot_events(ws: Any, host_id: str, ref: str) -> list[tuple[str, ...]]:
    """The reboot's ``package_operations`` events and the host's ``host_status`` ones,
    in order, until the reboot ends."""
    seen: list[tuple[str, ...]] = []
    deadline = time.monotonic() + WAIT * 3
    while time.monotonic() < deadline:
        message = await ws.recv(timeout=deadline - time.monotonic())
        if message.get("type") != "event":
            continue
        data = message["data"]
        if message["channel"] == "host_status" and data.get("host_id") == host_id:
            seen.append(("host", data["status"]))
        elif message["channel"] == "package_operations" and data.get("execution_id") == ref:
            if data["final"] or data["message"].startswith("Rebooting"):
                seen.append(("package", data["status"], data["message"]))
            if data["final"]:
                return seen
    raise AssertionError(f"the reboot did not end: {seen}")


async def test_the_sysmanage_agent_applies_updates_reboots_and_is_checked_again(deployment):
    d = deployment
    async with online_agent(d, "pa-sm") as agent:
        await wait_updates(d, agent.host_id, lambda b: b["update_count"] == 2)
        agent.apply_delay = 1.5  # the agent answers "started", then applies them
        asked = await admin(
            d,
            "POST",
            f"/api/hosts/{agent.host_id}/apply-updates/",
            json_body={"which": "packages", "packages": ["curl", "not-pending"]},
        )
        assert asked.status == 202, asked
        ref = asked.body["execution_id"]
        applying = await operation_of(d, ref, "in_progress")
        deadline = time.monotonic() + WAIT
        while "applying the updates" not in applying["message"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            applying = (await admin(d, "GET", f"/api/package-operations/{ref}/")).body
        # ended by the update_apply_result, not by the command_result saying "started"
        assert applying["status"] == "in_progress", applying
        assert "applying the updates" in applying["message"], applying
        done = await operation_of(d, ref, "completed")
        assert done["message"] == "Applied 1 update", done
        assert done["output"] == "curl: 7.88.1-10 -> 7.88.1-11", done
        (applied,) = [e for e in agent.executions if e.command_type == "apply_updates"]
        # each pending update named with the package manager its report named
        assert applied.parameters["packages"] == [
            {"package_name": "curl", "package_manager": "apt"}
        ]
        # the agent looked again by itself: curl is gone, a reboot is needed
        body = await wait_updates(d, agent.host_id, lambda b: b["update_count"] == 1)
        assert [u["name"] for u in body["updates"]] == ["openssl"]
        await wait_updates(d, agent.host_id, lambda b: b["reboot_required"] is True)

        # every pending update: the list is spelt out (the agent has no "all" form)
        agent.apply_delay = 0.1
        everything = await admin(
            d, "POST", f"/api/hosts/{agent.host_id}/apply-updates/", json_body={"which": "all"}
        )
        assert everything.status == 202, everything
        done = await operation_of(d, everything.body["execution_id"], "completed")
        assert done["message"] == "Applied 1 update", done
        applied = [e for e in agent.executions if e.command_type == "apply_updates"][-1]
        assert applied.parameters["packages"] == [
            {"package_name": "openssl", "package_manager": "apt"}
        ]
        await wait_updates(d, agent.host_id, lambda b: b["update_count"] == 0)
        # nothing left: done without a word to the agent
        sent = len(agent.executions)
        idle = await admin(
            d, "POST", f"/api/hosts/{agent.host_id}/apply-updates/", json_body={"which": "all"}
        )
        done = await operation_of(d, idle.body["execution_id"], "completed")
        assert done["message"].startswith("No pending updates to apply"), done
        assert len(agent.executions) == sent

        reboot = await admin(d, "POST", f"/api/hosts/{agent.host_id}/reboot/")
        assert reboot.status == 202, reboot
        ref = reboot.body["execution_id"]
        waiting = await operation_of(d, ref, "in_progress")
        await wait_host_status(d, agent.host_id, "offline")
        assert len(agent.reboots) == 1
        assert (await admin(d, "GET", f"/api/package-operations/{ref}/")).body[
            "status"
        ] == "in_progress", waiting
        checks = len(agent.reboot_checks)
        await go_online(d, agent)  # the host booted and its agent connected
        done = await operation_of(d, ref, "completed")
        assert done["message"].startswith("Rebooted: the host is back online after")
        await wait_updates(d, agent.host_id, lambda b: b["reboot_required"] is False)
        assert len(agent.reboot_checks) > checks


async def test_who_may_apply_updates_and_reboot(deployment, tmp_path):
    """A user who sees a host but lacks the right gets 403; a host out of sight is 404;
    the grant flag gives the right on the group's hosts."""
    d = deployment
    with agent_program(d, tmp_path, "pa-scoped", "pa-web") as (host_id, _, _):
        other = d.seed["hosts"]["db-01"]["id"]  # online, in no group of the user's
        harness.manage_shell(
            d.env,
            "from django.contrib.auth import get_user_model\n"
            "from hosts.models import HostGroup, HostGroupGrant\n"
            "from hosts import services\n"
            f"user = get_user_model().objects.create_user('pa-user', password={d.password!r})\n"
            "services.host_group_grant_save(HostGroupGrant(host_group=HostGroup.objects.get("
            "name='pa-web'), user=user, can_run_commands=True, can_run_package_operations=True))",
        )
        token = obtain_tokens(d.server.base_url, "pa-user", d.password)["access"]

        async def post(path: str, host: str, **kw: Any) -> Any:
            url = f"/api/hosts/{host}/{path}/"
            return await api("POST", d.server.base_url, url, token=token, **kw)

        await wait_updates(d, host_id, lambda b: b["update_count"] == 2)
        for path in ("apply-updates", "reboot"):
            refused = await post(path, host_id, json_body={})
            assert refused.status == 403, refused
            assert "hosts.patch_host" in refused.body["detail"]
            assert (await post(path, other, json_body={})).status == 404
        viewer = await admin(d, "POST", f"/api/hosts/{host_id}/reboot/", user="viewer")
        assert viewer.status == 403, viewer

        harness.manage_shell(
            d.env,
            "from hosts.models import HostGroupGrant\n"
            "HostGroupGrant.objects.filter(user__username='pa-user')"
            ".update(can_patch_and_reboot=True)",
        )
        bad = await post("apply-updates", host_id, json_body={"which": "packages"})
        assert bad.status == 400, bad
        allowed = await post("apply-updates", host_id, json_body={"which": "all"})
        assert allowed.status == 202, allowed
        assert (await post("reboot", other, json_body={})).status == 404


# -- fleet-wide --------------------------------------------------------------------------


async def fleet_run_of(d: harness.Deployment, run_id: str) -> dict[str, Any]:
    """The run once it ended (with its hosts), following its progress meanwhile."""
    deadline = time.monotonic() + WAIT * 8
    last: Any = None
    while time.monotonic() < deadline:
        last = await admin(d, "GET", f"/api/fleet-runs/{run_id}/")
        if last.status == 200 and last.body["state"] != "running":
            return dict(last.body)
        await asyncio.sleep(0.2)
    operations = await admin(d, "GET", "/api/package-operations/?limit=20")
    raise AssertionError(f"fleet run {run_id} did not end: {last}\n{operations.body}")


def patch_run_message(kind: str) -> dict[str, Any]:
    return {
        "type": "command",
        "channel": "package_operations",
        "data": {
            "kind": kind,
            "which": "packages",
            "packages": ["tzdata"],
            "targets": {"groups": ["pa-fleet"]},
            "batch_size": 3,
        },
    }


async def test_a_fleet_reboot_in_batches_and_a_fleet_patch_run(deployment, tmp_path):
    """Four agent programs in a group: a reboot run in batches of two (a host succeeds
    once it is back online, and the next batch starts only then), then a patch run."""
    d = deployment
    with contextlib.ExitStack() as stack:
        hosts = [
            stack.enter_context(agent_program(d, tmp_path / f"h{i}", f"pa-fleet-{i}", "pa-fleet"))
            for i in range(4)
        ]
        for host_id, _, _ in hosts:
            await wait_updates(d, host_id, lambda b: b["reboot_required"] is True)
        started = await admin(
            d,
            "POST",
            "/api/fleet-runs/",
            json_body={"kind": "reboot", "targets": {"groups": ["pa-fleet"]}, "batch_size": 2},
        )
        assert started.status == 202, started
        run = await fleet_run_of(d, started.body["run_id"])
        assert (run["state"], run["counts"]["succeeded"]) == ("succeeded", 4), run
        rows = sorted(run["hosts"], key=lambda h: h["started_at"])
        # the second batch started after the first one's hosts were back
        assert min(r["started_at"] for r in rows[2:]) >= max(r["finished_at"] for r in rows[:2])
        for row in rows:
            done = await admin(d, "GET", f"/api/package-operations/{row['operation_id']}/")
            assert done.body["operation"] == "reboot"
            assert done.body["message"].startswith("Rebooted: the host is back online after")
        for host_id, _, flag in hosts:
            assert not flag.exists()
            await wait_updates(d, host_id, lambda b: b["reboot_required"] is False)

        # A patch run asked for over the WebSocket (``package_operations`` with targets)
        async with ws_connect(d.server.ws_url, token=d.token("admin")) as ws:
            wrong = await ws.request(patch_run_message(kind="command"))
            assert (wrong["type"], wrong["data"]["code"]) == ("error", "INVALID_COMMAND")
            assert "'kind' on package_operations must be one of" in wrong["data"]["message"]
            patched = await ws.request(patch_run_message(kind="patch"))
        assert patched["type"] == "response", patched
        assert (patched["data"]["kind"], patched["data"]["command"]) == ("patch", "apply tzdata")
        run = await fleet_run_of(d, patched["data"]["run_id"])
        assert (run["state"], run["counts"]["succeeded"]) == ("succeeded", 4), run
        for host_id, programs, _ in hosts:
            body = await wait_updates(d, host_id, lambda b: b["update_count"] == 1)
            assert [u["name"] for u in body["updates"]] == ["libssl3"]
            assert "install --only-upgrade -y tzdata" in (programs / "apt-get.log").read_text()

        # without the right, on any of the hosts: refused before anything runs
        refused = await admin(
            d,
            "POST",
            "/api/fleet-runs/",
            user="viewer",
            json_body={"kind": "reboot", "targets": {"groups": ["pa-fleet"]}},
        )
        assert refused.status == 403, refused
        assert refused.body["detail"] == (
            "You do not have permission to apply updates and reboot on 4 of the 4 targeted hosts"
        )
