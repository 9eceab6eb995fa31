"""
A host page in headless Chromium whose network goes down while things happen on the host
(through a relay between the browser and the server, cut and refusing for a while): once
the page reconnects by itself it shows, without a reload, the command result, the alert
changes and the host status change of the gap.

The server and the agent (``python -m agent``) talk directly; only the browser's traffic
goes through the relay.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.browser import support
from tests.browser.support import Browser, RelayThread, ensure_logged_in
from tests.integration.harness import Deployment
from tests.integration.test_agent_e2e import AgentProcess, register

pytestmark = [pytest.mark.browser, pytest.mark.integration]

AGENT_HOSTNAME = "resume-agent-01"
#: Console lines while the relay refuses the page's connections.
WS_REFUSED = (r"WebSocket connection to '[^']*/ws' failed",)
#: The channels the host page subscribes to.
HOST_PAGE_CHANNELS = (
    "host_status",
    "host_metrics",
    "system_alerts",
    "command_execution",
    "package_operations",
)


@dataclass
class Agent:
    """The enrolled host and its running agent."""

    deployment: Deployment
    host_id: str
    process: AgentProcess

    def status(self) -> str:
        return str(support.api(self.deployment, "GET", f"/api/hosts/{self.host_id}/")["status"])

    def wait_status(self, status: str, timeout: float = 60) -> None:
        support.poll(lambda: self.status() == status, timeout, f"{AGENT_HOSTNAME} {status}")


@pytest.fixture(scope="module")
def agent(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    work: Path = tmp_path_factory.mktemp("resume-agent")
    enrolled = register(deployment, AGENT_HOSTNAME)
    process = AgentProcess(
        deployment.server.base_url, enrolled["token"], work / "state", work / "agent.log"
    ).start()
    host = Agent(deployment, enrolled["host_id"], process)
    try:
        host.wait_status("online")
        yield host
    finally:
        process.stop()


@pytest.fixture
def relay(deployment: Deployment) -> Iterator[RelayThread]:
    instance = RelayThread(deployment.server.port)
    try:
        yield instance
    finally:
        instance.close()


@dataclass
class Gap:
    """What happened on the host while the page was cut off."""

    command: str
    output: str
    raised: str  # an alert raised and left open
    acknowledged: str  # an alert raised and acknowledged


def command_state(deployment: Deployment, host_id: str, command: str) -> str | None:
    """The status of the latest execution of ``command`` on the host, if any."""
    page = support.api(deployment, "GET", f"/api/commands/?host={host_id}&limit=20")
    for execution in page["results"]:
        if execution["command"] == command:
            return str(execution["status"])
    return None


def cut_off_while_things_happen(
    browser: Browser, deployment: Deployment, agent: Agent, relay: RelayThread, *, stop_agent: bool
) -> Gap:
    """Open the host page through the relay, start a command that ends after the cut, cut
    the network, raise and acknowledge alerts (and stop the agent), then let the network
    come back and wait until the page is live again."""
    ensure_logged_in(browser, "admin", deployment.password)
    browser.forget_frames()
    browser.driver.get(f"http://127.0.0.1:{relay.port}/hosts/{agent.host_id}/")
    browser.wait_live()
    browser.wait_subscribed(*HOST_PAGE_CHANNELS)
    browser.driver.execute_script("window.__sameDocument = true;")

    tag = secrets.token_hex(3)
    gap = Gap(
        command=f"sleep 3; echo finished-{tag}",
        output=f"finished-{tag}",
        raised="",
        acknowledged="",
    )
    box = browser.find("#console-command")
    box.clear()
    box.send_keys(gap.command)
    browser.find("#console-form button[type=submit]").click()
    support.poll(
        lambda: command_state(deployment, agent.host_id, gap.command) == "running",
        20,
        "the command to run",
    )

    with browser.expecting_console(*WS_REFUSED):
        relay.go_down()
        browser.wait(
            lambda d: browser.connection_state() == "offline", 30, "the page did not go offline"
        )
        raise_alert = {"severity": "warning", "category": "resume-test", "host": agent.host_id}
        gap.raised = support.api(
            deployment, "POST", "/api/alerts/", {**raise_alert, "title": f"Raised {tag}"}
        )["id"]
        gap.acknowledged = support.api(
            deployment, "POST", "/api/alerts/", {**raise_alert, "title": f"Acknowledged {tag}"}
        )["id"]
        support.api(deployment, "POST", f"/api/alerts/{gap.acknowledged}/acknowledge/")
        support.poll(
            lambda: command_state(deployment, agent.host_id, gap.command) == "completed",
            30,
            "the command to finish",
        )
        if stop_agent:
            agent.process.stop()
            agent.wait_status("offline", 30)
        browser.forget_frames()
        relay.come_back()
        browser.wait_live(timeout=60)  # by itself: no "Retry now", no reload
    return gap


def assert_page_shows(browser: Browser, gap: Gap) -> None:
    """The page shows the gap's command result and alert changes, and was not reloaded."""
    item = browser.wait(
        lambda d: next(
            (
                li
                for li in browser.find_all("#console-history > li")
                if li.find_element("css selector", ".history-command").text == gap.command
                and li.find_element("css selector", ".history-head .badge").text == "Exit 0"
            ),
            False,
        ),
        30,
        "the command's result did not appear",
    )
    assert item.find_element("css selector", "pre.output").text == gap.output
    raised = f'#alert-rows tr[data-alert-id="{gap.raised}"]'
    acknowledged = f'#alert-rows tr[data-alert-id="{gap.acknowledged}"]'
    browser.wait_text(f"{raised} [data-cell=status]", lambda t: t == "Open")
    browser.wait_text(f"{acknowledged} [data-cell=status]", lambda t: t == "Acknowledged")
    assert browser.driver.execute_script("return window.__sameDocument === true;"), (
        "the page reloaded"
    )


def test_host_page_shows_what_happened_while_it_was_cut_off(
    browser: Browser, deployment: Deployment, agent: Agent, relay: RelayThread
) -> None:
    try:
        gap = cut_off_while_things_happen(browser, deployment, agent, relay, stop_agent=True)
        assert_page_shows(browser, gap)
        browser.wait_text("#host-status .badge", lambda t: t == "Offline")
        # The metrics of the gap: replayed, or else read from the per-minute history.
        browser.wait_subscribed("host_metrics")
        metrics = [
            f["data"]
            for f in browser.read_frames()
            if f.get("type") == "response" and f.get("channel") == "host_metrics"
        ]
        if metrics[-1].get("recovered") is not True:
            backfill = f"/api/hosts/{agent.host_id}/metrics/?since="

            def backfilled(_driver: Any) -> bool:
                browser.read_frames()
                return any(backfill in url and "&until=" in url for url in browser.requests)

            browser.wait(backfilled, message=f"no back-fill request among {browser.requests}")
        browser.screenshot("host-after-cut")
    finally:
        agent.process.start()  # for the next test
        agent.wait_status("online")


def test_host_page_streams_resume_and_the_gap_is_replayed(
    browser: Browser, deployment: Deployment, agent: Agent, relay: RelayThread
) -> None:
    gap = cut_off_while_things_happen(browser, deployment, agent, relay, stop_agent=False)
    assert_page_shows(browser, gap)
    frames = browser.read_frames()
    renewed = {
        f["data"]["channel"]: f["data"].get("recovered")
        for f in frames
        if f.get("type") == "response"
        and isinstance(f.get("data"), dict)
        and f["data"].get("action") == "subscribe"
    }
    assert renewed == dict.fromkeys(HOST_PAGE_CHANNELS, True), renewed
    replayed: list[Any] = [
        f["data"].get("alert_id") or f["data"].get("stdout")
        for f in frames
        if f.get("type") == "event" and f.get("channel") in ("system_alerts", "command_execution")
    ]
    assert gap.raised in replayed, replayed
    assert gap.acknowledged in replayed, replayed
    assert f"{gap.output}\n" in replayed, replayed
