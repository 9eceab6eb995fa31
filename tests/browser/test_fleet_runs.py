"""
A fleet run started from its page in headless Chromium, against a real Daphne server and
the real agent program: the form on a group's page starts it over the socket, and the
run's page shows it as it happens, each host's outcome as it lands (one host of the
group never connected: skipped).  A run page whose socket connects only after the run
ended still shows every host's end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.browser import support
from tests.browser.support import Browser, ensure_logged_in
from tests.integration import harness
from tests.integration.harness import Deployment
from tests.integration.test_agent_e2e import AgentProcess

pytestmark = [pytest.mark.browser, pytest.mark.integration]

#: Run before a page's scripts: its WebSockets go to a closed port until
#: ``window.__releaseSockets`` is set.
HOLD_SOCKETS = """
const RealWebSocket = window.WebSocket;
window.WebSocket = class extends RealWebSocket {
  constructor(url, protocols) {
    super(window.__releaseSockets ? url : "ws://127.0.0.1:9/held", protocols);
  }
};
"""


def enroll(deployment: Deployment, hostname: str, group: str) -> dict[str, str]:
    """``manage.py register_host HOSTNAME --group GROUP``: its JSON line."""
    args = ["manage.py", "register_host", hostname, "--group", group]
    out = harness.run_python(args, deployment.env, what="register_host").stdout
    return json.loads(out.strip().splitlines()[-1])


def test_a_run_started_on_a_group_shows_live(
    browser: Browser, deployment: Deployment, tmp_path: Path
) -> None:
    ensure_logged_in(browser, "admin", deployment.password)
    hosts = {name: enroll(deployment, name, "batch") for name in ("run-a", "run-b", "run-c")}
    agents = [
        AgentProcess(
            deployment.server.base_url,
            hosts[name]["token"],
            tmp_path / f"{name}-state",
            tmp_path / f"{name}.log",
        ).start()
        for name in ("run-a", "run-b")
    ]
    try:
        browser.open("/hosts/?group=batch", "host_status")
        for name in ("run-a", "run-b"):
            browser.wait_text(
                f'#host-rows tr[data-host-id="{hosts[name]["host_id"]}"] [data-cell=status]',
                lambda t: t == "Online",
                40,
            )
        browser.find("#group-run a").click()
        browser.wait_live()
        assert browser.find("#run-group").get_attribute("value") == "batch"
        browser.find("#run-command").send_keys("sleep 2; echo done")
        browser.find("#run-batch").clear()
        browser.find("#run-batch").send_keys("1")
        browser.forget_frames()
        browser.find("#fleet-run-form button[type=submit]").click()

        browser.wait(lambda d: "/fleet-runs/" in d.current_url and d.current_url.count("/") > 4)
        browser.wait_live()
        browser.driver.execute_script("window.__sameDocument = true;")

        def count(key: str) -> str:
            return browser.text_of(f'#run-counts [data-count="{key}"]')

        def status_of(name: str) -> str:
            return browser.text_of(
                f'#run-host-rows tr[data-host-id="{hosts[name]["host_id"]}"] [data-cell=status]'
            )

        # Mid-run, as the progress arrives: the first host done, the second running (its
        # row says so: the progress names the hosts that started as well as those that ended).
        browser.wait(
            lambda d: (
                (count("succeeded"), count("running"), status_of("run-a"), status_of("run-b"))
                == ("1", "1", "Succeeded", "Running")
            ),
            40,
            "the run's page never showed the first host done and the second running",
        )
        assert browser.text_of("#run-state") == "Running"
        browser.wait_text("#run-state", lambda t: t == "Failed", 40, "the run's state")
        assert browser.driver.execute_script("return window.__sameDocument === true;"), (
            "the page reloaded"
        )
        counts = {
            key: browser.text_of(f'#run-counts [data-count="{key}"]')
            for key in ("queued", "running", "succeeded", "failed", "skipped")
        }
        assert counts == {
            "queued": "0",
            "running": "0",
            "succeeded": "2",
            "failed": "0",
            "skipped": "1",
        }
        assert browser.text_of("#run-reason") == "0 failed, 1 skipped"
        row = f'#run-host-rows tr[data-host-id="{hosts["run-c"]["host_id"]}"]'
        assert browser.text_of(f"{row} [data-cell=status]") == "Skipped"
        assert browser.text_of(f"{row} [data-cell=reason]") == "host unknown"
        row = f'#run-host-rows tr[data-host-id="{hosts["run-a"]["host_id"]}"]'
        assert browser.text_of(f"{row} [data-cell=exit-code]") == "0"
        # The page heard the run's progress over its run_id subscription, and nothing else
        # of command_execution.
        events = [
            f["data"]
            for f in browser.read_frames()
            if f.get("type") == "event" and f.get("channel") == "command_execution"
        ]
        assert events
        assert all("run_id" in data for data in events)
        assert events[-1]["final"] is True
    finally:
        for agent in agents:
            agent.stop()


def test_hosts_that_ended_before_the_page_subscribed_show_how_they_ended(
    browser: Browser, deployment: Deployment, tmp_path: Path
) -> None:
    """The page is rendered while the hosts are queued, and its socket connects only
    after the run ended: the snapshot has the counts but names no host, so the page reads
    the run again and every row shows its end."""
    ensure_logged_in(browser, "admin", deployment.password)
    hosts = {name: enroll(deployment, name, "gap") for name in ("gap-a", "gap-b")}
    agent = AgentProcess(
        deployment.server.base_url,
        hosts["gap-a"]["token"],
        tmp_path / "gap-a-state",
        tmp_path / "gap-a.log",
    ).start()
    try:
        support.poll(
            lambda: (
                support.api(deployment, "GET", f"/api/hosts/{hosts['gap-a']['host_id']}/")["status"]
                == "online"
            ),
            40,
            "gap-a online",
        )
        run = support.api(
            deployment,
            "POST",
            "/api/fleet-runs/",
            {"targets": {"groups": ["gap"]}, "command": "sleep 2; echo ok", "batch_size": 1},
        )
        # The page's sockets go nowhere until released (it retries, as after any failure).
        driver = browser.driver
        held = driver.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument", {"source": HOLD_SOCKETS}
        )["identifier"]
        try:
            driver.get(browser.url(f"/fleet-runs/{run['run_id']}/"))
            assert browser.text_of("#run-state") == "Running"
            assert browser.text_of(row_status(hosts["gap-b"])) == "Queued"
            support.poll(
                lambda: (
                    support.api(deployment, "GET", f"/api/fleet-runs/{run['run_id']}/")["state"]
                    != "running"
                ),
                40,
                "the run's end",
            )
            assert browser.connection_state() != "open"
            assert browser.text_of(row_status(hosts["gap-b"])) == "Queued"
            driver.execute_script("window.__releaseSockets = true;")
            browser.wait_live(60)
        finally:
            driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": held})
        browser.wait_text("#run-state", lambda t: t == "Failed", 20, "the run's state")
        browser.wait_text(row_status(hosts["gap-a"]), lambda t: t == "Succeeded", 20)
        browser.wait_text(row_status(hosts["gap-b"]), lambda t: t == "Skipped", 20)
    finally:
        agent.stop()


def row_status(enrolled: dict[str, str]) -> str:
    return f'#run-host-rows tr[data-host-id="{enrolled["host_id"]}"] [data-cell=status]'
