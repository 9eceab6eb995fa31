"""
The dashboard pages in headless Chromium, against a real Daphne server and the real
agent program (``python -m agent``).

The tests run in order on one server and one browser (module fixtures), as an operator
would: log in, watch an agent come online, use its page (charts, console, packages),
handle an alert, live through a server restart, and look at every page once more.
Each test can also run alone (``-k``): what it needs from earlier ones (a session, the
agent) is made when missing.

Screenshots of every page go to ``test-artifacts/screenshots/``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.browser import support
from tests.browser.support import Browser, ensure_logged_in
from tests.integration import harness
from tests.integration.harness import Deployment
from tests.integration.test_agent_e2e import AgentProcess, register

pytestmark = [pytest.mark.browser, pytest.mark.integration]

AGENT_HOSTNAME = "browser-agent-01"
#: Not the end-to-end tests' package, so that both may run on one machine at once.
PACKAGE = "sysmanage-browser-selftest"
PERCENT = re.compile(r"^\d+(\.\d+)? %$")

#: Console lines a browser logs while the server it talks to is down.
WS_REFUSED = (r"WebSocket connection to '[^']*/ws' failed", r"net::ERR_CONNECTION_REFUSED")


@dataclass
class Fleet:
    """The agent host the tests enroll (once), and what they raised."""

    deployment: Deployment
    work_dir: Path
    host_id: str = ""
    agent: AgentProcess | None = None
    alerts: dict[str, str] = field(default_factory=dict)

    def enroll_and_start(self) -> str:
        """``manage.py register_host``, then start the agent; return the host id."""
        enrolled = register(self.deployment, AGENT_HOSTNAME)
        self.host_id = enrolled["host_id"]
        self.agent = AgentProcess(
            self.deployment.server.base_url,
            enrolled["token"],
            self.work_dir / "agent-state",
            self.work_dir / "agent.log",
        ).start()
        return self.host_id

    def online_host(self) -> str:
        """The agent host's id, enrolling it and waiting until it is online if need be."""
        if not self.host_id:
            self.enroll_and_start()
        support.poll(
            lambda: (
                support.api(self.deployment, "GET", f"/api/hosts/{self.host_id}/")["status"]
                == "online"
            ),
            60,
            f"{AGENT_HOSTNAME} to be online",
        )
        return self.host_id

    def raise_alert(self, title: str, severity: str = "critical") -> str:
        """``POST /api/alerts/`` as admin; return the alert's id."""
        alert = support.api(
            self.deployment,
            "POST",
            "/api/alerts/",
            {
                "severity": severity,
                "category": "browser-test",
                "title": title,
                "message": "Raised through the REST API.",
                "host": self.host_id or None,
            },
        )
        self.alerts[title] = alert["id"]
        return alert["id"]


@pytest.fixture(scope="module")
def fleet(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    state = Fleet(deployment, tmp_path_factory.mktemp("browser-fleet"))
    try:
        yield state
    finally:
        if state.agent is not None:
            state.agent.stop()


@pytest.fixture
def admin(browser: Browser, deployment: Deployment) -> Browser:
    """The browser, logged in as ``admin``."""
    ensure_logged_in(browser, "admin", deployment.password)
    return browser


# -- helpers ---------------------------------------------------------------------------------


def row_of_host(browser: Browser, host_id: str) -> str:
    return f'#host-rows tr[data-host-id="{host_id}"]'


def alert_ids(browser: Browser) -> list[str]:
    """The alerts in the table, top to bottom."""
    return [row.get_attribute("data-alert-id") for row in browser.find_all("#alert-rows tr")]


def legend(browser: Browser, chart: str) -> list[str]:
    """The legend of a chart: one "name value" text per series."""
    return [
        " ".join(li.text.split())
        for li in browser.find_all(f'[data-chart="{chart}"] [data-legend] li')
    ]


def history_item(browser: Browser, list_id: str, title: str) -> Any:
    """The first item of a console or package history list whose title is ``title``."""
    for item in browser.find_all(f"#{list_id} > li"):
        if item.find_element("css selector", ".history-command").text == title:
            return item
    return None


def wait_history_badge(
    browser: Browser, list_id: str, title: str, predicate: Any, timeout: float = support.WAIT
) -> Any:
    """Wait until the item ``title`` of a history list has a badge satisfying
    ``predicate(text)``; return the item."""

    def check(_driver: Any) -> Any:
        item = history_item(browser, list_id, title)
        if item is None:
            return False
        badge = item.find_element("css selector", ".history-head .badge").text
        return item if predicate(badge) else False

    try:
        return browser.wait(check, timeout)
    except Exception as exc:
        item = history_item(browser, list_id, title)
        raise AssertionError(
            f"{title!r} in #{list_id}: {item.text if item is not None else 'no such item'!r}"
        ) from exc


def run_in_console(browser: Browser, command: str) -> Any:
    """Type ``command`` into the console, run it, and wait for its result."""
    box = browser.find("#console-command")
    box.clear()
    box.send_keys(command)
    browser.find("#console-form button[type=submit]").click()
    return wait_history_badge(
        browser,
        "console-history",
        command,
        lambda text: (
            text.startswith("Exit")
            or text in ("Failed", "Timed out", "Not run", "Error", "Not allowed")
        ),
        timeout=45,
    )


def package_operation(browser: Browser, operation: str, package: str) -> Any:
    """Start an operation with the package form and wait until it completes or fails,
    noting the progress values seen on the way; return ``(item, progress values)``."""
    field_ = browser.find("#package-name")
    field_.clear()
    field_.send_keys(package)
    browser.find(f'#package-form button[value="{operation}"]').click()
    title = f"{operation.capitalize()} {package}"
    seen: list[str] = []

    def done(_driver: Any) -> Any:
        item = history_item(browser, "package-operations", title)
        if item is None:
            return False
        # The badge first: read after it, the bar is at least as new (a final badge and a
        # bar read before it could disagree when the last update lands in between).
        badge = item.find_element("css selector", ".history-head .badge").text
        value = item.find_element("css selector", "progress").get_attribute("value")
        if not seen or seen[-1] != value:
            seen.append(value)
        return item if badge in ("Completed", "Failed") else False

    item = browser.wait(done, 240, f"{title} did not finish")
    return item, seen


# -- the tests ---------------------------------------------------------------------------------


def test_log_in_through_the_login_page(browser: Browser, deployment: Deployment) -> None:
    browser.driver.get(browser.url("/"))  # anonymous: / itself shows the login form (200)
    assert browser.visible(".login-box h1").text == "Log in"
    browser.screenshot("login")

    support.fill_login_form(browser, "admin", "not the password")
    error = browser.visible(".login-box .notice-error")
    assert "username" in error.text.lower() or "password" in error.text.lower(), error.text
    assert "/login/" in browser.driver.current_url

    support.fill_login_form(browser, "admin", deployment.password)
    browser.wait(
        lambda d: d.current_url.rstrip("/") == browser.base_url,
        message="the login did not lead to the overview",
    )
    assert browser.visible("h1").text == "Fleet overview"
    assert browser.text_of(".account-name") == "admin"
    browser.wait_live()
    nav = [a.text for a in browser.find_all(".site-nav a")]
    assert nav == ["Overview", "Hosts", "Alerts", "Fleet runs", "Activity", "Admin"], nav


def test_hosts_page_shows_the_agent_coming_online(admin: Browser, fleet: Fleet) -> None:
    browser = admin
    if fleet.host_id:
        pytest.skip("the agent host was enrolled already (tests run out of order)")
    browser.open("/hosts/", "host_status")
    assert browser.text_of("#host-count") == "6 hosts."
    browser.driver.execute_script("window.__sameDocument = true;")

    host_id = fleet.enroll_and_start()
    row = row_of_host(browser, host_id)
    browser.wait_text(
        f"{row} [data-cell=status] .badge", lambda t: t == "Online", 40, "the agent's status badge"
    )
    assert browser.driver.execute_script("return window.__sameDocument === true;"), (
        "the page reloaded"
    )
    assert (
        browser.find(f"{row} [data-cell=status] .badge").get_attribute("class")
        == "badge status-online"
    )
    assert browser.text_of(f"{row} [data-cell=last-seen]") == "now"
    assert browser.text_of(f"{row} th a") == AGENT_HOSTNAME
    browser.wait_text("#host-count", lambda t: t == "7 hosts.")

    # Typing in the search box filters at once and keeps ?q= in the address.
    search = browser.find("#host-search")
    search.send_keys("browser-agent")
    browser.wait_text("#host-count", lambda t: t.startswith("1 of 7 hosts match"))
    assert "q=browser-agent" in browser.driver.current_url
    visible = [r for r in browser.find_all("#host-rows tr") if r.is_displayed()]
    assert [r.get_attribute("data-host-id") for r in visible] == [host_id]
    search.clear()
    search.send_keys(" ")  # an input event with an empty query shows every host again
    browser.wait_text("#host-count", lambda t: t == "7 hosts.")
    browser.screenshot("hosts")


def test_hosts_page_shows_every_hosts_metrics_through_one_subscription(
    admin: Browser, fleet: Fleet
) -> None:
    browser = admin
    host_id = fleet.online_host()
    browser.open("/hosts/", "host_status", "host_metrics")
    row = row_of_host(browser, host_id)
    browser.wait_text(f"{row} [data-cell=cpu]", lambda t: bool(PERCENT.match(t)), 30, "CPU")
    browser.wait_text(f"{row} [data-cell=memory]", lambda t: bool(PERCENT.match(t)))

    # one subscription to every host, answered by summaries (not an event per report)
    def metrics_frames(kind: str) -> list[dict[str, Any]]:
        return [
            f
            for f in browser.read_frames()
            if f.get("channel") == "host_metrics" and f["type"] == kind
        ]

    [answer] = metrics_frames("response")
    assert answer["data"]["filters"] == {"host_id": "*", "metrics": ["cpu", "memory"]}
    assert metrics_frames("status"), "no snapshot of every host"
    browser.wait(lambda d: metrics_frames("event"), message="no summary within the wait")
    summaries = metrics_frames("event")
    assert all("hosts" in f["data"] and "offset" not in f for f in summaries), summaries
    # hosts that never reported keep a dash
    assert (
        browser.text_of(
            f"{row_of_host(browser, fleet.deployment.host_id('web-01'))} [data-cell=cpu]"
        )
        == "—"
    )


def test_host_page_charts_console_and_failing_command(admin: Browser, fleet: Fleet) -> None:
    browser = admin
    host_id = fleet.online_host()
    browser.open("/hosts/", "host_status")
    browser.forget_frames()
    browser.find(f"{row_of_host(browser, host_id)} th a").click()
    browser.wait(lambda d: d.current_url.endswith(f"/hosts/{host_id}/"))
    browser.wait_live()
    browser.wait_subscribed("host_status", "host_metrics", "system_alerts", "package_operations")
    assert browser.visible("h1").text == AGENT_HOSTNAME
    browser.wait_text("#host-status .badge", lambda t: t == "Online")
    assert browser.find(".host-offline-hint").is_displayed() is False

    # Live metrics: the current value of the CPU chart appears, then follows each report
    # (read from the frames: a busy host may report the same figure twice running).
    cpu = '[data-chart="cpu"] [data-latest]'
    browser.wait_text(cpu, lambda t: bool(PERCENT.match(t)), 20, "CPU chart value")
    browser.forget_frames()

    def reported_cpu() -> list[float]:
        return [
            f["data"]["metrics"]["cpu_usage"]
            for f in browser.read_frames()
            if f.get("channel") == "host_metrics"
            and f.get("type") == "event"
            and f.get("data", {}).get("host_id") == host_id
        ]

    browser.wait(lambda d: len(reported_cpu()) >= 2, 30, "fewer than two live CPU reports")
    browser.wait_text(
        cpu,
        lambda t: bool(PERCENT.match(t)) and abs(float(t.split()[0]) - reported_cpu()[-1]) <= 0.051,
        10,
        "CPU chart value against the latest report",
    )
    browser.wait_text('[data-chart="memory"] [data-latest]', lambda t: bool(PERCENT.match(t)))
    disk_legend = browser.wait(lambda d: legend(browser, "disk") or False)
    assert any(re.fullmatch(r"/ \d+(\.\d+)? %", text) for text in disk_legend), disk_legend
    load_legend = legend(browser, "load")
    assert [text.rsplit(" ", 1)[0] for text in load_legend] == ["1 min", "5 min", "15 min"], (
        load_legend
    )
    label = browser.find('[data-chart="cpu"] canvas').get_attribute("aria-label")
    assert label.startswith("CPU usage over the last hour; latest: "), label

    # The console: a command's output and exit status, then a failing one.
    item = run_in_console(browser, "echo hello-from-browser")
    badge = item.find_element("css selector", ".history-head .badge")
    assert (badge.text, badge.get_attribute("class")) == ("Exit 0", "badge status-completed")
    assert item.find_element("css selector", "pre.output").text == "hello-from-browser"
    assert item.get_attribute("aria-busy") is None
    assert " · took " in item.find_element("css selector", ".history-meta").text

    item = run_in_console(browser, "echo oops >&2; exit 3")
    badge = item.find_element("css selector", ".history-head .badge")
    assert (badge.text, badge.get_attribute("class")) == ("Exit 3", "badge status-failed")
    assert item.find_element("css selector", "pre.output-stderr").text == "oops"
    assert not item.find_elements("css selector", "pre.output:not(.output-stderr)")
    titles = [
        li.find_element("css selector", ".history-command").text
        for li in browser.find_all("#console-history > li")
    ]
    assert titles == ["echo oops >&2; exit 3", "echo hello-from-browser"]
    browser.screenshot("host")


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("apt-get") or not shutil.which("dpkg-deb"),
    reason="needs root, apt-get and dpkg-deb",
)
def test_package_install_and_remove_with_progress(
    admin: Browser, fleet: Fleet, tmp_path: Path
) -> None:
    browser = admin
    host_id = fleet.online_host()
    deb = support.build_deb(tmp_path, PACKAGE)
    subprocess.run(["dpkg", "-r", PACKAGE], capture_output=True, check=False)
    try:
        browser.open(f"/hosts/{host_id}/", "package_operations")
        item, seen = package_operation(browser, "install", str(deb))
        assert item.find_element("css selector", ".history-head .badge").text == "Completed", (
            item.text
        )
        assert item.find_element("css selector", "progress").get_attribute("value") == "100"
        assert item.find_element("css selector", ".progress-value").text == "100 %"
        assert seen[-1] == "100", seen
        assert support.dpkg_installed(PACKAGE)
        assert browser.find("#package-name").get_attribute("value") == ""
        browser.screenshot("host-package-installed")

        item, seen = package_operation(browser, "remove", PACKAGE)
        assert item.find_element("css selector", ".history-head .badge").text == "Completed", (
            item.text
        )
        assert item.find_element("css selector", ".progress-value").text == "100 %"
        assert not support.dpkg_installed(PACKAGE)
        titles = [
            li.find_element("css selector", ".history-command").text
            for li in browser.find_all("#package-operations > li")
        ]
        assert titles == [f"Remove {PACKAGE}", f"Install {deb}"], titles
    finally:
        subprocess.run(["dpkg", "-r", PACKAGE], capture_output=True, check=False)


def test_host_page_lists_the_package_operations_in_progress_when_it_opens(
    admin: Browser, deployment: Deployment
) -> None:
    """Operations started before the page opened come from the ``package_operations``
    snapshot: the page shows them with their progress, then follows their events."""
    browser = admin
    package = f"sysmanage-snapshot-{secrets.token_hex(3)}"
    started = harness.manage_shell(
        deployment.env,
        "from hosts import services; from hosts.models import Host, OperationStatus; "
        "op = services.package_operation_create(host=Host.objects.get(hostname='db-01'), "
        f"operation='install', package={package!r}, user=None); "
        "services.package_operation_update(operation=op, status=OperationStatus.IN_PROGRESS, "
        f"progress=40, message='Unpacking {package}'); print(op.id)",
    ).strip()
    finish = (
        "from hosts import services; from hosts.models import OperationStatus, "
        f"PackageOperation; services.package_operation_update(operation=PackageOperation."
        f"objects.get(id={started!r}), status=OperationStatus.COMPLETED, progress=100, "
        f"message='Installed {package}')"
    )
    try:
        browser.open(f"/hosts/{deployment.host_id('db-01')}/", "package_operations")
        title = f"Install {package}"
        item = wait_history_badge(
            browser, "package-operations", title, lambda text: text == "In progress"
        )
        assert item.find_element("css selector", "progress").get_attribute("value") == "40"
        assert item.find_element("css selector", ".progress-value").text == "40 %"
        assert item.find_element("css selector", ".progress-message").text == (
            f"Unpacking {package}"
        )
        # when it started is not known to the page: no time is made up
        assert not item.find_elements("css selector", ".history-meta")
    finally:
        harness.manage_shell(deployment.env, finish)


def test_alert_appears_live_and_is_acknowledged(
    admin: Browser, fleet: Fleet, deployment: Deployment
) -> None:
    browser = admin
    fleet.online_host()
    browser.open("/alerts/", "system_alerts")
    earlier = alert_ids(browser)

    title = f"Disk almost full ({secrets.token_hex(3)})"
    alert_id = fleet.raise_alert(title)
    row = f'#alert-rows tr[data-alert-id="{alert_id}"]'
    browser.visible(row)
    assert browser.text_of(f"{row} .alert-title") == title
    assert browser.text_of(f"{row} [data-cell=severity]") == "Critical"
    assert browser.text_of(f"{row} [data-cell=status]") == "Open"
    assert browser.text_of(f"{row} [data-cell=host]") == AGENT_HOSTNAME
    assert "is-new" in browser.find(row).get_attribute("class")
    # New alerts go on top (the agent's own rules may raise some meanwhile, too).
    shown = alert_ids(browser)
    assert shown[len(shown) - len(earlier) :] == earlier, (shown, earlier)
    # The count follows the rows (all on the first page here).
    browser.wait(
        lambda d: browser.text_of("#alert-count").startswith(f"{len(alert_ids(browser))} alert"),
        message="the alert count did not follow",
    )

    browser.find(f'{row} button[data-action="acknowledge"]').click()
    browser.wait_text(f"{row} [data-cell=status]", lambda t: t == "Acknowledged")
    assert browser.find(row).get_attribute("data-status") == "acknowledged"
    assert not browser.find(f'{row} button[data-action="acknowledge"]').is_displayed()
    assert browser.find(f'{row} button[data-action="resolve"]').is_displayed()
    browser.wait_text("#notices .notice-ok", lambda t: f"“{title}” acknowledged." in t)
    assert support.api(deployment, "GET", f"/api/alerts/{alert_id}/")["status"] == "acknowledged"
    browser.screenshot("alerts")


OFFLINE_INDICATOR_SCRIPT = """
const indicator = document.querySelector("#connection");
const retry = indicator.querySelector(".connection-retry");
return {
  state: indicator.dataset.state,
  label: indicator.querySelector(".connection-label").textContent,
  countdown: indicator.querySelector(".connection-countdown").textContent,
  retryShown: !retry.hidden && retry.offsetParent !== null,
};
"""


@pytest.fixture
def restored_after(deployment: Deployment) -> Iterator[None]:
    """Start the server again if a test that stops it fails before starting it, so that the
    module's later tests report their own outcome, not a refused connection."""
    yield
    if not deployment.server.alive():
        support.restart_on_same_port(deployment, "browser-restored")


@pytest.mark.usefixtures("restored_after")
def test_server_restart_offline_then_live_again(
    admin: Browser, fleet: Fleet, deployment: Deployment
) -> None:
    browser = admin
    fleet.online_host()
    browser.open("/alerts/", "system_alerts")
    port = deployment.server.port
    browser.driver.execute_script("window.__sameDocument = true;")
    offline_title = f"Acknowledged while the server was down ({secrets.token_hex(3)})"
    offline_alert = fleet.raise_alert(offline_title, severity="warning")
    offline_row = f'#alert-rows tr[data-alert-id="{offline_alert}"]'
    browser.wait_text(f"{offline_row} [data-cell=status]", lambda t: t == "Open")

    with browser.expecting_console(*WS_REFUSED):
        deployment.server.stop()
        # The first retries come within a second, so the indicator is read in one script
        # call while it says offline, not element by element while it may move on.
        indicator = browser.wait(
            lambda d: (
                (shown := d.execute_script(OFFLINE_INDICATOR_SCRIPT))["state"] == "offline"
                and shown
            ),
            30,
            "the indicator did not go offline",
        )
        assert indicator["label"] == "Offline — retrying"
        assert re.fullmatch(r"in \d+ s", indicator["countdown"]), indicator
        assert indicator["retryShown"], indicator
        browser.screenshot("alerts-offline")
        # A change no running server could tell the page about: the restarted server has
        # no history to replay it from, so the page reads its alerts again.
        harness.manage_shell(
            deployment.server.env,
            "from alerts.services import alert_acknowledge\n"
            "from sysmanage.audit import Actor\n"
            f"alert_acknowledge(alert_id='{offline_alert}', actor=Actor.command_line('test'))",
        )

        browser.forget_frames()
        server = support.restart_on_same_port(deployment, "browser-restarted")
        assert server.port == port
        # No click on "Retry now": the page reconnects by itself.
        browser.wait_live(timeout=60)
        browser.wait_subscribed("system_alerts")
    assert not browser.find("#connection .connection-retry").is_displayed()
    browser.wait_text(f"{offline_row} [data-cell=status]", lambda t: t == "Acknowledged")
    assert browser.driver.execute_script("return window.__sameDocument === true;"), (
        "the page reloaded"
    )

    title = f"Raised after the restart ({secrets.token_hex(3)})"
    alert_id = fleet.raise_alert(title, severity="warning")
    row = f'#alert-rows tr[data-alert-id="{alert_id}"]'
    browser.visible(row)
    assert browser.text_of(f"{row} [data-cell=severity]") == "Warning"
    assert browser.text_of(f"{row} [data-cell=status]") == "Open"


def test_host_page_shows_updates_and_asks_for_a_fresh_check(
    admin: Browser, fleet: Fleet, deployment: Deployment
) -> None:
    browser = admin
    host_id = fleet.online_host()

    def reported() -> Any:
        return support.api(deployment, "GET", f"/api/hosts/{host_id}/updates/")[
            "updates_reported_at"
        ]

    # The agent reports on connecting (the reboot flag at least, updates where apt lists
    # them): wait for that, so that the next report is the one the button asks for.
    first = support.poll(
        lambda: support.api(deployment, "GET", f"/api/hosts/{host_id}/updates/")[
            "reboot_reported_at"
        ],
        30,
        "the agent's first patch status",
    )
    browser.open(
        f"/hosts/{host_id}/", "host_status", "host_metrics", "system_alerts", "package_operations"
    )
    assert browser.visible("#patch-heading").text == "Updates and reboot"
    assert browser.text_of("#patch-reboot") in ("Not needed", "Reboot required")
    before = reported()
    browser.find("#check-updates").click()
    browser.wait_text(
        "#notices [data-key=check-updates]",
        lambda t: "The agent was asked to check for updates" in t,
    )
    if before is not None:  # an agent without apt reports no updates, only the flag
        support.poll(lambda: reported() != before, 30, "a fresh report of pending updates")
    else:
        support.poll(
            lambda: (
                support.api(deployment, "GET", f"/api/hosts/{host_id}/updates/")[
                    "reboot_reported_at"
                ]
                != first
            ),
            30,
            "a fresh report of the reboot flag",
        )


def test_every_page_renders_live_without_console_errors(
    admin: Browser, fleet: Fleet, deployment: Deployment
) -> None:
    browser = admin
    host_id = fleet.online_host()  # the agent came back after the restart by itself

    browser.open("/", "fleet_status", "system_alerts", "user_activity")
    assert browser.visible("h1").text == "Fleet overview"
    browser.wait_text('[data-figure="online_hosts"]', lambda t: t.isdigit() and int(t) >= 2)
    assert browser.find_all("#activity-rows tr"), "no recent activity on the overview"
    browser.screenshot("overview")

    browser.open("/hosts/", "host_status")
    browser.wait_text(
        f"{row_of_host(browser, host_id)} [data-cell=status]", lambda t: t == "Online"
    )
    browser.screenshot("hosts")

    browser.open(
        f"/hosts/{host_id}/", "host_status", "host_metrics", "system_alerts", "package_operations"
    )
    browser.wait_text("#host-status .badge", lambda t: t == "Online")
    browser.wait_text('[data-chart="cpu"] [data-latest]', lambda t: bool(PERCENT.match(t)))
    browser.wait(
        lambda d: len(browser.find_all("#alert-rows tr")) >= len(fleet.alerts) or not fleet.alerts,
        message="the host's alerts did not load",
    )
    browser.screenshot("host")
    browser.full_page_screenshot("host-full")

    browser.open("/alerts/", "system_alerts")
    assert browser.visible("h1").text == "Alerts"
    browser.screenshot("alerts")

    browser.open("/activity/", "user_activity")
    assert browser.visible("h1").text == "User activity"
    actions = [cell.text for cell in browser.find_all("#activity-rows .action")]
    assert "Logged in" in actions, actions
    assert "Ran a command" in actions, actions
    # A new record arrives live: this browser's own acknowledgement through the API.
    if fleet.alerts:
        alert_id = list(fleet.alerts.values())[-1]
        support.api(deployment, "POST", f"/api/alerts/{alert_id}/resolve/")
        browser.wait_text(
            "#activity-rows tr:first-child .action", lambda t: t == "Resolved an alert"
        )
    browser.screenshot("activity")

    browser.find(".account button[type=submit]").click()  # Log out
    browser.wait(lambda d: "/login/" in d.current_url, message="logging out failed")
    browser.visible(".login-box")
    browser.screenshot("login-after-logout")

    problems = browser.console_problems()
    assert not problems, "unexpected browser console lines:\n" + "\n".join(
        f"{p.level} on {p.page}: {p.message}" for p in problems
    )
