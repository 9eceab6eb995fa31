"""Applying updates and rebooting on the agent's side: which package manager run an
``upgrade`` is, what a ``package_operation`` may ask for, and the reboot command."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import DEFAULT_REBOOT_COMMAND, build_config
from agent.errors import RequestError
from agent.packages import upgrade
from agent.packages.managers import APK, APT, DNF
from agent.packages.operation import parse_operation
from agent.processes import ProcessGroups
from agent.reboot import run_reboot
from agent.sources import ConfigError

APT_OPTIONS = APT.options


def argv(manager, package: str) -> list[str] | None:
    plan = asyncio.run(upgrade.upgrade_argv(manager, package))
    return None if plan is None else plan(None)


def test_every_update_or_named_ones():
    assert argv(APT, "*") == ["apt-get", *APT_OPTIONS, "upgrade", "--with-new-pkgs", "-y"]
    assert argv(APT, "curl libssl3") == [
        "apt-get",
        *APT_OPTIONS,
        "install",
        "--only-upgrade",
        "-y",
        "curl",
        "libssl3",
    ]
    assert argv(DNF, "*security") == ["dnf", "upgrade", "--security", "-y"]
    with pytest.raises(RequestError, match="cannot tell security updates apart"):
        argv(APK, "*security")


def test_apt_security_updates_are_those_a_security_suite_offers(monkeypatch):
    listed = [
        {"name": "libssl3", "current": "1", "available": "2", "security": True},
        {"name": "tzdata", "current": "1", "available": "2", "security": False},
    ]
    monkeypatch.setattr(upgrade, "list_updates", lambda manager: listed)
    assert argv(APT, "*security")[-4:] == ["install", "--only-upgrade", "-y", "libssl3"]
    monkeypatch.setattr(upgrade, "list_updates", lambda manager: listed[1:])
    assert argv(APT, "*security") is None  # nothing to apply


def message(operation: str, package: object) -> dict:
    return {
        "type": "package_operation",
        "data": {"operation_id": "op-1", "operation": operation, "package": package},
    }


@pytest.mark.parametrize("package", ["*", "*security", "curl", "curl libssl3=3.0.15-1"])
def test_upgrades_the_agent_takes(package):
    assert parse_operation(message("upgrade", package)).package == package


@pytest.mark.parametrize("package", ["", "*all", "curl;reboot", "-o x", "curl $(id)"])
def test_upgrades_the_agent_refuses(package):
    with pytest.raises(RequestError):
        parse_operation(message("upgrade", package))


def test_a_reboot_names_no_package():
    assert parse_operation(message("reboot", None)).package == ""


def config(tmp_path: Path, **values: object):
    return build_config({"server": "http://s", "token": "t", **values}, {"HOME": str(tmp_path)})


def test_the_reboot_command_setting(tmp_path):
    assert config(tmp_path).reboot_command == DEFAULT_REBOOT_COMMAND == ("systemctl", "reboot")
    assert config(tmp_path, reboot_command="shutdown -r 'now'").reboot_command == (
        "shutdown",
        "-r",
        "now",
    )
    assert config(tmp_path, reboot_command=["touch", "/x y"]).reboot_command == ("touch", "/x y")
    for bad in ("", [], [1], "a 'b"):
        with pytest.raises(ConfigError, match="reboot_command"):
            config(tmp_path, reboot_command=bad)


def test_the_reboot_began_when_its_command_succeeds(tmp_path):
    marker = tmp_path / "rebooted"
    done = asyncio.run(run_reboot("op", ("touch", str(marker)), 1000, ProcessGroups()))
    assert (done["status"], done["exit_code"]) == ("completed", 0)
    assert marker.exists()
    failed = asyncio.run(run_reboot("op", ("false",), 1000, ProcessGroups()))
    assert (failed["status"], failed["message"]) == ("failed", "false exited with status 1")
    missing = asyncio.run(run_reboot("op", (str(tmp_path / "nope"),), 1000, ProcessGroups()))
    assert missing["status"] == "failed"
    assert "could not start" in missing["message"]


async def test_after_a_reboot_began_the_agent_leaves_and_comes_back(
    tmp_path, fake_server, start_agent
):
    """The reboot command only simulates a reboot here: the agent reports that it
    began, leaves its connection and connects again, every time."""
    config = tmp_path / "agent.toml"
    marker = tmp_path / "rebooted"
    config.write_text(f'reboot_command = ["sh", "-c", "echo x >> {marker}"]\n')
    await start_agent("--config", str(config))
    await fake_server.wait_for_connections(1)
    for attempt in range(1, 6):
        await fake_server.wait_for("hello", count=attempt)
        await fake_server.send(
            "package_operation", {"operation_id": f"r{attempt}", "operation": "reboot"}
        )
        (result,) = await fake_server.wait_for(
            "package_result", lambda m, a=attempt: m.data["operation_id"] == f"r{a}"
        )
        assert (result.data["status"], result.data["exit_code"]) == ("completed", 0)
        await fake_server.wait_for_connections(attempt + 1, timeout=10)
    assert marker.read_text() == "x\n" * 5
