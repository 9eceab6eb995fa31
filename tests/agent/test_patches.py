"""The agent's ``patch_status`` report: apt's upgradable list, the reboot flag, settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import DEFAULT_REBOOT_REQUIRED_FILE, ConfigError, build_config
from agent.packages.managers import DNF
from agent.patches import collect_patch_status, parse_apt_upgradable

APT_OUTPUT = """Listing...
openssl/bookworm-security,stable-security 3.0.15-1~deb12u1 amd64 [upgradable from: 3.0.14-1~deb12u2]
tzdata/stable-updates 2025a-0+deb12u1 all [upgradable from: 2024b-0+deb12u1]
N: There is 1 additional version. Please use the '-a' switch to see it
"""


def test_apt_upgradable_lines_become_updates_with_security_marked() -> None:
    assert parse_apt_upgradable(APT_OUTPUT) == [
        {
            "name": "openssl",
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
    assert parse_apt_upgradable("Listing...\n") == []


def test_without_apt_only_the_reboot_flag_is_reported(tmp_path: Path) -> None:
    flag = tmp_path / "reboot-required"
    assert collect_patch_status(DNF, flag) == {
        "updates": None,
        "update_count": None,
        "security_count": None,
        "reboot_required": False,
    }
    flag.touch()
    assert collect_patch_status(None, flag)["reboot_required"] is True


def test_patch_settings(tmp_path: Path) -> None:
    base = {"server": "http://fleet:8000", "token": "t"}
    config = build_config(base, {})
    assert config.reboot_required_file == DEFAULT_REBOOT_REQUIRED_FILE
    assert config.patch_interval == 900
    config = build_config(
        {**base, "patch_interval": "60", "reboot_required_file": str(tmp_path / "f")}, {}
    )
    assert (config.patch_interval, config.reboot_required_file) == (60, tmp_path / "f")
    with pytest.raises(ConfigError):
        build_config({**base, "patch_interval": "0"}, {})
    with pytest.raises(ConfigError):
        build_config({**base, "reboot_required_file": ""}, {})
