"""
The hosts page of one host group in headless Chromium, against a real Daphne server and
the real agent program: hosts enrolled into the group while the page is open appear live
with their groups, hosts outside it do not, and choosing another group loads that one.
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


def enroll(deployment: Deployment, hostname: str, *groups: str) -> dict[str, str]:
    """``manage.py register_host HOSTNAME --group G ...``: its JSON line."""
    args = ["manage.py", "register_host", hostname]
    for group in groups:
        args += ["--group", group]
    out = harness.run_python(args, deployment.env, what="register_host").stdout
    return json.loads(out.strip().splitlines()[-1])


def row(host_id: str) -> str:
    return f'#host-rows tr[data-host-id="{host_id}"]'


def test_a_groups_page_adds_its_hosts_live_and_no_others(
    browser: Browser, deployment: Deployment, tmp_path: Path
) -> None:
    ensure_logged_in(browser, "admin", deployment.password)
    static = enroll(deployment, "grp-static", "web")
    enroll(deployment, "grp-db-0", "db")  # a group the list offers
    browser.open("/hosts/?group=web", "host_status")
    assert browser.text_of("#host-count") == "1 host in group “web”."
    assert browser.text_of(f"{row(static['host_id'])} [data-cell=groups]") == "web"
    browser.driver.execute_script("window.__sameDocument = true;")

    inside = enroll(deployment, "grp-live-in", "web", "edge")
    outside = enroll(deployment, "grp-live-out", "db")
    agents = [
        AgentProcess(
            deployment.server.base_url,
            enrolled["token"],
            tmp_path / f"{name}-state",
            tmp_path / f"{name}.log",
        ).start()
        for name, enrolled in (("in", inside), ("out", outside))
    ]
    try:
        browser.wait_text(
            f"{row(inside['host_id'])} [data-cell=status] .badge", lambda t: t == "Online", 40
        )
        support.poll(
            lambda: (
                support.api(deployment, "GET", f"/api/hosts/{outside['host_id']}/")["status"]
                == "online"
            ),
            40,
            "the host outside the group to be online",
        )
        links = browser.find_all(f"{row(inside['host_id'])} [data-cell=groups] a")
        assert [a.text for a in links] == ["edge", "web"]
        assert links[1].get_attribute("href").endswith("/hosts/?group=web")
        browser.wait_text("#host-count", lambda t: t == "2 hosts in group “web”.")
        assert not browser.find_all(row(outside["host_id"]))
        assert browser.driver.execute_script("return window.__sameDocument === true;")

        # Another group, chosen in the list, is the server's to show.
        browser.driver.execute_script(
            "const s = document.getElementById('host-group'); s.value = 'db';"
            "s.dispatchEvent(new Event('change'));"
        )
        browser.wait(lambda d: "group=db" in d.current_url, message="no page for group db")
        browser.wait_live()
        browser.wait_text("#host-count", lambda t: t == "2 hosts in group “db”.")
        assert browser.find_all(row(outside["host_id"]))
        browser.screenshot("hosts-group")
    finally:
        for agent in agents:
            agent.stop()
