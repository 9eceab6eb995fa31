"""
A host's "Updates and reboot" panel in headless Chromium, against a real Daphne server and
the real agent program (a stand-in ``apt`` on its PATH and a reboot flag file of its own):
the panel shows what the agent reported, security updates first, and "Check for updates
now" reaches the agent, whose fresh report the page shows once reloaded from its notice.
"Apply updates" (security updates only) and "Reboot" reach the agent too (with a stand-in
``apt-get``, and a reboot command that only removes the flag file): their operations go
by live among the host's package operations, and so does the host going and coming back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.browser import support
from tests.browser.support import Browser, ensure_logged_in
from tests.integration.harness import Deployment
from tests.integration.test_patch_apply import agent_program
from tests.integration.test_patching import UPGRADABLE

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
    # The agent looks only on connecting and when asked: the second report is the button's.
    with agent_program(deployment, tmp_path, "patch-page") as (host_id, programs, flag):
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


#: Each row of the host's package operations: title, status badge, message.
OPERATION_ROWS = """
return [...document.querySelectorAll('#package-operations > li')].map((li) => [
  li.querySelector('.history-command').textContent,
  li.querySelector('.history-head .badge').textContent,
  li.querySelector('.progress-message').textContent,
]);
"""

#: Records, as the page changes, the host's status badge and each operation's status
#: badge (in ``window.__seen``; gone if the page reloads).
RECORD_CHANGES = """
const seen = { status: [], operations: {} };
window.__seen = seen;
const note = (list, value) => { if (list[list.length - 1] !== value) list.push(value); };
const status = document.getElementById('host-status');
new MutationObserver(() => note(seen.status, status.textContent.trim()))
  .observe(status, { childList: true, subtree: true, characterData: true });
const operations = document.getElementById('package-operations');
new MutationObserver(() => {
  for (const li of operations.children) {
    const title = li.querySelector('.history-command').textContent;
    note(seen.operations[title] ??= [], li.querySelector('.history-head .badge').textContent);
  }
}).observe(operations, { childList: true, subtree: true, characterData: true });
"""


def operation_rows(browser: Browser) -> list[list[str]]:
    return list(browser.driver.execute_script(OPERATION_ROWS))


def wait_operation(browser: Browser, title: str, status: str, timeout: float) -> list[str]:
    """The row of the operation ``title`` once its badge says ``status``."""

    def found(_driver: Any) -> list[str] | None:
        return next((r for r in operation_rows(browser) if r[:2] == [title, status]), None)

    try:
        return list(browser.wait(found, timeout))
    except Exception as exc:
        raise AssertionError(
            f"no {title!r} operation {status} after {timeout}s: {operation_rows(browser)}"
        ) from exc


def test_apply_updates_and_reboot_from_the_host_page(
    browser: Browser, deployment: Deployment, tmp_path: Path
) -> None:
    ensure_logged_in(browser, "admin", deployment.password)
    with agent_program(deployment, tmp_path, "patch-apply-page") as (host_id, programs, flag):
        support.poll(
            lambda: updates(deployment, host_id)["update_count"] == 2,
            40,
            "the agent's first report",
        )
        channels = ("host_status", "package_operations")
        browser.open(f"/hosts/{host_id}/", *channels)
        browser.wait_text("#host-status", lambda t: t == "Online", what="the host's status")
        assert browser.text_of("#patch-reboot").startswith("Reboot required")
        browser.driver.execute_script(RECORD_CHANGES)

        # Security updates only: apt cannot, so the agent names the security package.
        from selenium.webdriver.support.ui import Select

        Select(browser.find("#apply-which")).select_by_visible_text("security updates only")
        browser.find("#apply-updates").click()
        browser.wait_text(
            "#notices [data-key=apply-updates]",
            lambda t: "Applying security updates." in t,
            what="the notice of Apply updates",
        )
        row = wait_operation(browser, "Apply updates: security updates", "Completed", 60)
        assert row[2] == "apply security updates: completed"
        assert browser.find("#apply-updates").is_enabled()
        asked = (programs / "apt-get.log").read_text().splitlines()
        assert len(asked) == 1, asked
        assert "install --only-upgrade -y libssl3" in asked[0]
        assert "tzdata" not in asked[0]
        body = support.poll(
            lambda: (b := updates(deployment, host_id))["update_count"] == 1 and b,
            40,
            "the agent's report after applying the security updates",
        )
        assert [u["name"] for u in body["updates"]] == ["tzdata"]
        assert body["reboot_required"] is True

        # Reboot, confirmed: in progress until the host is back online.
        browser.driver.execute_script(
            "window.confirm = (text) => { window.__confirmed = text; return true; };"
        )
        browser.find("#reboot-host").click()
        assert browser.driver.execute_script("return window.__confirmed;") == (
            "Reboot patch-apply-page? Every service on it stops until it is back."
        )
        browser.wait_text(
            "#notices [data-key=reboot]",
            lambda t: "Rebooting: the reboot ends when the host is back online." in t,
            what="the notice of Reboot",
        )
        row = wait_operation(browser, "Reboot", "Completed", 60)
        assert row[2].startswith("Rebooted: the host is back online after"), row
        browser.wait_text("#host-status", lambda t: t == "Online", what="the host's status")
        browser.wait_text(
            "#notices [data-key=host-status]",
            lambda t: "patch-apply-page is online (was offline)." in t,
            what="the notice of the host's return",
        )
        seen = browser.driver.execute_script("return window.__seen;")
        assert seen is not None, "the page reloaded"
        operations = seen["operations"]
        # each row appeared before its operation ended
        assert operations["Apply updates: security updates"][-2:] == ["In progress", "Completed"]
        assert operations["Reboot"][-2:] == ["In progress", "Completed"], operations
        assert seen["status"][-2:] == ["Offline", "Online"], seen["status"]
        assert not flag.exists()  # the reboot command ran
        browser.driver.execute_script(
            "document.getElementById('package-operations').closest('.panel')"
            ".scrollIntoView({block: 'start'});"
        )
        browser.screenshot("host-apply-updates")

        # The agent looked again as it came back: no reboot needed, tzdata still pending.
        support.poll(
            lambda: updates(deployment, host_id)["reboot_required"] is False,
            40,
            "the agent's report after the reboot",
        )
        browser.open(f"/hosts/{host_id}/", *channels)
        assert browser.text_of("#patch-reboot") == "Not needed"
        assert browser.text_of("#patch-update-count") == "1"
        assert listed(browser) == [("tzdata", "2024b-0+deb12u1", "2025a-0+deb12u1", "No")]
