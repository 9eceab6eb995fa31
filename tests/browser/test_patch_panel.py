"""
A host's "Updates and reboot" panel in headless Chromium, against a real Daphne server and
the real agent program (a stand-in ``apt`` on its PATH and a reboot flag file of its own):
the panel shows what the agent reported, security updates first, and "Check for updates
now" reaches the agent, whose fresh report the page shows once reloaded from its notice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.browser import support
from tests.browser.support import Browser, ensure_logged_in
from tests.integration.harness import Deployment
from tests.integration.test_agent_e2e import AgentProcess, register
from tests.integration.test_patching import UPGRADABLE, fake_programs

pytestmark = [pytest.mark.browser, pytest.mark.integration]


def updates(deployment: Deployment, host_id: str) -> Any:
    return support.api(deployment, "GET", f"/api/hosts/{host_id}/updates/")


def listed(browser: Browser) -> list[tuple[str, str, str, str]]:
    """The rows of the panel's table: package, current, available, security."""
    return [
        tuple(cell.text for cell in row.find_elements("css selector", "th, td"))  # type: ignore[misc]
        for row in browser.find_all("#patch-updates tbody tr")
    ]


def test_the_panel_shows_the_agents_report_and_a_check_reaches_it(
    browser: Browser, deployment: Deployment, tmp_path: Path
) -> None:
    ensure_logged_in(browser, "admin", deployment.password)
    programs = fake_programs(tmp_path)
    flag = tmp_path / "reboot-required"
    flag.write_text("*** System restart required ***\n")
    config = tmp_path / "agent.toml"
    # It looks only on connecting and when asked: the second report is the button's.
    config.write_text(f'patch_interval = 3600\nreboot_required_file = "{flag}"\n')
    enrolled = register(deployment, "patch-page")
    host_id = enrolled["host_id"]
    agent = AgentProcess(
        deployment.server.base_url,
        enrolled["token"],
        tmp_path / "state",
        tmp_path / "agent.log",
        config=config,
    )
    agent.env["PATH"] = f"{programs}{os.pathsep}{agent.env.get('PATH', os.defpath)}"
    agent.start()
    try:
        support.poll(
            lambda: updates(deployment, host_id)["update_count"] == 2,
            40,
            "the agent's first report",
        )
        channels = ("host_status", "host_metrics", "system_alerts", "package_operations")
        browser.open(f"/hosts/{host_id}/", *channels)
        assert browser.visible("#patch-heading").text == "Updates and reboot"
        assert browser.text_of("#patch-update-count") == "2"
        assert browser.text_of("#patch-security-count") == "1"
        assert "inventory-security" in browser.find("#patch-security-count").get_attribute("class")
        assert browser.text_of("#patch-reboot").startswith("Reboot required")
        assert listed(browser) == [
            ("libssl3", "3.0.14-1~deb12u2", "3.0.15-1~deb12u1", "Security"),
            ("tzdata", "2024b-0+deb12u1", "2025a-0+deb12u1", "No"),
        ]
        browser.driver.execute_script(
            "document.getElementById('patch-status').scrollIntoView({block: 'center'});"
        )
        browser.screenshot("host-updates")

        # libssl3 is installed and the host rebooted; the agent would not look for an hour.
        (programs / "upgradable.txt").write_text(UPGRADABLE.splitlines()[1] + "\n")
        flag.unlink()
        browser.find("#check-updates").click()
        notice = "#notices [data-key=check-updates]"
        browser.wait_text(notice, lambda t: "The agent was asked to check for updates" in t)
        support.poll(
            lambda: updates(deployment, host_id)["update_count"] == 1,
            40,
            "the agent's report after the check",
        )
        browser.driver.execute_script("window.__beforeReload = true;")
        browser.find(f"{notice} button").click()  # "Reload"
        browser.wait(
            lambda d: d.execute_script("return window.__beforeReload === undefined;"),
            message="the notice's Reload did not reload the page",
        )
        browser.wait_live()
        browser.wait_text("#patch-update-count", lambda t: t == "1")
        assert browser.text_of("#patch-security-count") == "0"
        assert browser.text_of("#patch-reboot") == "Not needed"
        assert listed(browser) == [("tzdata", "2024b-0+deb12u1", "2025a-0+deb12u1", "No")]
    finally:
        agent.stop()
