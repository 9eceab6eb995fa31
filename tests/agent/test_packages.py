"""``package_operation`` through the real apt-get, with a tiny locally built package."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent.conftest import StartAgent
from tests.agent.fake_server import FakeServer

PACKAGE = "sysmanage-agent-selftest"
PAYLOAD = Path("/usr/share/sysmanage-agent-selftest/README")
#: Another apt run on this machine may hold the dpkg lock; the agent's apt waits up to
#: 120 s for it, so the tests do too (they take a few seconds when apt is idle).
LOCK_WAIT = 120

needs_apt_as_root = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("apt-get", "dpkg-deb", "dpkg")),
    reason="needs root, apt-get and dpkg-deb",
)


def package_status() -> str:
    """dpkg's status line for the self-test package ('' when unknown)."""
    found = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", PACKAGE], capture_output=True, text=True, check=False
    )
    return found.stdout.strip() if found.returncode == 0 else ""


def is_installed() -> bool:
    """Whether dpkg reports the self-test package as installed."""
    return package_status() == "install ok installed"


def build_deb(directory: Path) -> Path:
    """Build ``sysmanage-agent-selftest_1.0_all.deb`` with one file in it."""
    root = directory / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {PACKAGE}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: SysManage <agent-selftest@example.invalid>\n"
        "Description: SysManage agent self-test package\n"
    )
    payload = root / PAYLOAD.relative_to("/")
    payload.parent.mkdir(parents=True)
    payload.write_text("installed by the SysManage agent tests\n")
    deb = directory / f"{PACKAGE}_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


def purge() -> None:
    """Remove the self-test package if dpkg knows it (waiting for the dpkg lock if busy)."""
    if package_status():
        subprocess.run(
            ["apt-get", "-o", f"DPkg::Lock::Timeout={LOCK_WAIT}", "purge", "-y", PACKAGE],
            check=False,
            capture_output=True,
            timeout=LOCK_WAIT + 60,
        )


@pytest.fixture
def selftest_deb(tmp_path: Path) -> Iterator[Path]:
    """The self-test package file; the package is purged before and after the test."""
    purge()
    assert not package_status()
    yield build_deb(tmp_path)
    purge()


async def operate(
    server: FakeServer,
    operation_id: str,
    operation: str,
    package: str,
    timeout: float = LOCK_WAIT + 60,
) -> dict[str, Any]:
    """Ask for a package operation and wait for its result."""
    await server.send(
        "package_operation",
        {"operation_id": operation_id, "operation": operation, "package": package},
    )
    found = await server.wait_for(
        "package_result", lambda item: item.data["operation_id"] == operation_id, timeout
    )
    return found[0].data


def progress_of(server: FakeServer, operation_id: str) -> list[dict[str, Any]]:
    """The progress reports received for ``operation_id``."""
    return [
        item.data
        for item in server.messages(
            "package_progress", lambda item: item.data["operation_id"] == operation_id
        )
    ]


@needs_apt_as_root
async def test_install_update_and_remove_a_local_deb(
    fake_server: FakeServer,
    start_agent: StartAgent,
    selftest_deb: Path,
) -> None:
    await start_agent()
    [hello] = await fake_server.wait_for("hello")
    assert "packages:apt" in hello.data["capabilities"]
    assert not is_installed()

    installed = await operate(fake_server, "pkg-install", "install", str(selftest_deb))
    assert installed["status"] == "completed", installed
    assert installed["exit_code"] == 0
    assert is_installed()
    assert PAYLOAD.exists()
    progress = progress_of(fake_server, "pkg-install")
    assert any(
        "Installing" in item["message"] or "Unpacking" in item["message"] for item in progress
    ), progress
    values = [item["progress"] for item in progress]
    assert values == sorted(values)
    assert values[0] >= 0
    assert values[-1] == 100

    updated = await operate(fake_server, "pkg-update", "update", PACKAGE)
    assert updated["status"] == "completed", updated
    assert "already the newest version" in updated["output"]

    removed = await operate(fake_server, "pkg-remove", "remove", PACKAGE)
    assert removed["status"] == "completed", removed
    assert not is_installed()
    assert not PAYLOAD.exists()
    assert any("Removing" in item["message"] for item in progress_of(fake_server, "pkg-remove"))


@needs_apt_as_root
async def test_unknown_package_fails_with_apts_message(
    fake_server: FakeServer,
    start_agent: StartAgent,
) -> None:
    await start_agent()
    await fake_server.wait_for("hello")
    result = await operate(fake_server, "pkg-missing", "install", "sysmanage-agent-no-such-package")
    assert result["status"] == "failed"
    assert result["exit_code"] == 100
    assert "Unable to locate package" in result["message"]


@pytest.mark.parametrize(
    "package",
    [
        "-oAPT::Get::Fix-Broken=1",
        "foo; rm -rf /",
        "foo bar",
        "$(reboot)",
        "foo|bar",
        "",
    ],
)
async def test_unsafe_package_names_are_refused(
    fake_server: FakeServer,
    start_agent: StartAgent,
    package: str,
) -> None:
    await start_agent()
    await fake_server.wait_for("hello")
    result = await operate(fake_server, "pkg-bad", "install", package)
    assert result["status"] == "failed"
    assert result["exit_code"] is None
    assert result["message"]
    assert progress_of(fake_server, "pkg-bad") == []


async def test_missing_local_deb_and_bad_operation_are_refused(
    fake_server: FakeServer,
    start_agent: StartAgent,
    tmp_path: Path,
) -> None:
    await start_agent()
    await fake_server.wait_for("hello")
    missing = await operate(fake_server, "pkg-nofile", "install", str(tmp_path / "gone.deb"))
    assert missing["status"] == "failed"
    assert "does not exist" in missing["message"]
    wrong = await operate(fake_server, "pkg-badop", "purge", "curl")
    assert wrong["status"] == "failed"
    assert "operation" in wrong["message"]
