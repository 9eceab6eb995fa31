"""
Take the README's screenshots of the dashboard (laptop size, 1366 x 900):

    .venv/bin/python -m tests.browser.readme_screenshots [--out docs/screenshots] [--warmup 30]

Starts a server on a fresh SQLite database in a temporary directory, streams a simulated
fleet into it (``manage.py seed_demo --hosts 6 --interval 1``), enrolls one real host
running the agent program (``python -m agent``, on this machine), lets them report for
``--warmup`` seconds, then logs in as ``admin`` in headless Chromium, runs a command on
the real host, acknowledges an alert, and saves ``overview.png``, ``hosts.png``,
``host.png``, ``host-console.png`` and ``alerts.png``.  The real host's agent lists its
pending updates through a stand-in ``apt`` and has its reboot flag set (``host-updates.png``);
with two more real hosts and one never connected it makes up the group ``ops``, shown on
the hosts page (``hosts-group.png``), on which a fleet run is started from that page and
taken while it runs (``fleet-run.png``).  Needs the Debian packages ``chromium`` and
``chromium-driver``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.browser import support
from tests.integration import harness
from tests.integration.test_agent_e2e import AGENT_SETTINGS, AgentProcess
from tests.integration.test_patching import fake_programs

REAL_HOST = "ops-01"
#: The group of the real hosts: ``REAL_HOST``, these, and ``backup-01`` (never connected).
MORE_REAL_HOSTS = ("ops-02", "ops-03")
GROUP = "ops"


def enroll(deployment: harness.Deployment, hostname: str, *groups: str) -> dict[str, str]:
    """``manage.py register_host HOSTNAME --group G ...``: its JSON line."""
    args = ["manage.py", "register_host", hostname]
    for group in groups:
        args += ["--group", group]
    out = harness.run_python(args, deployment.env, what="register_host").stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def real_agent(url: str, enrolled: dict[str, str], work: Path, patched: bool) -> AgentProcess:
    """The agent program for an enrolled host; ``patched``: with a stand-in ``apt``
    listing two updates (one a security update) and its reboot flag set."""
    name = enrolled["host_id"]
    config = None
    programs = None
    if patched:
        (work / name).mkdir()
        programs = fake_programs(work / name)
        flag = work / f"{name}-reboot-required"
        flag.write_text("*** System restart required ***\n")
        config = work / f"{name}.toml"
        config.write_text(f'reboot_required_file = "{flag}"\n')
    agent = AgentProcess(
        url, enrolled["token"], work / f"{name}-state", work / f"{name}.log", config=config
    )
    if programs is not None:
        agent.env["PATH"] = f"{programs}{os.pathsep}{agent.env.get('PATH', os.defpath)}"
    return agent.start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=harness.REPO_ROOT / "docs/screenshots")
    parser.add_argument(
        "--warmup",
        type=float,
        default=120.0,
        help="seconds the fleet reports before the first screenshot",
    )
    args = parser.parse_args(argv)
    problem = support.chromium_missing()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="sysmanage-screenshots-") as tmp:
        take(Path(tmp), args.out, args.warmup)
    return 0


def take(work: Path, out: Path, warmup: float) -> None:
    password = secrets.token_urlsafe(12)
    env = harness.server_env(
        **harness.COMMON_SETTINGS,
        **AGENT_SETTINGS,
        DATABASE_URL=harness.sqlite_url(work / "db.sqlite3"),
        SYSMANAGE_VAR_DIR=str(work / "var"),
        DJANGO_SECRET_KEY=harness.new_secret(),
    )
    harness.run_python(["manage.py", "migrate", "--noinput"], env, what="migrate")
    harness.manage_shell(
        env,
        (
            "from django.contrib.auth import get_user_model; "
            f"get_user_model().objects.create_superuser('admin', 'admin@example.com', {password!r})"
        ),
    )
    servers = harness.start_servers([("screenshots", env)], work)
    deployment = harness.Deployment(
        env=env, seed={"password": password}, servers=servers, work_dir=work
    )
    url = deployment.server.base_url
    demo = browser = None
    agents: list[AgentProcess] = []
    try:
        demo = subprocess.Popen(
            [
                harness.PYTHON,
                "manage.py",
                "seed_demo",
                "--server",
                url,
                "--hosts",
                "6",
                "--interval",
                "1",
                "--seed",
                "7",
            ],
            cwd=harness.REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(work / "seed_demo.log").open("wb"),
        )
        enrolled = enroll(deployment, REAL_HOST, GROUP)
        enroll(deployment, "backup-01", GROUP)  # enrolled, its agent not started yet
        agents.append(real_agent(url, enrolled, work, patched=True))
        for name in MORE_REAL_HOSTS:
            agents.append(real_agent(url, enroll(deployment, name, GROUP), work, patched=False))
        host_id = enrolled["host_id"]
        support.poll(
            lambda: (
                support.api(deployment, "GET", "/api/hosts/?status=online&limit=50")["count"]
                >= 7 + len(MORE_REAL_HOSTS)
            ),
            60,
            "the demo hosts and the agent to be online",
        )
        time.sleep(warmup)  # let the fleet report for a while: charts and alerts fill in

        browser = support.Browser(url)
        support.log_in(browser, "admin", password)
        support.api(
            deployment,
            "POST",
            "/api/alerts/",
            {
                "severity": "info",
                "category": "maintenance",
                "host": host_id,
                "title": "Kernel update pending",
                "message": "A reboot is needed to use 6.1.0-28.",
            },
        )

        # The real host: a command run from its console, then its page.
        browser.open(f"/hosts/{host_id}/", "host_metrics", "system_alerts")
        for command in ("uname -sr", "df -h /"):
            box = browser.find("#console-command")
            box.clear()
            box.send_keys(command)
            browser.find("#console-form button[type=submit]").click()
            browser.wait(
                lambda d, c=command: any(
                    li.find_element("css selector", ".history-command").text == c
                    and li.find_element("css selector", ".badge").text.startswith("Exit")
                    for li in browser.find_all("#console-history > li")
                ),
                45,
            )
        browser.wait_text('[data-chart="cpu"] [data-latest]', lambda t: t.endswith("%"))
        browser.find("#console-command").clear()
        browser.driver.execute_script("window.scrollTo(0, 0); document.activeElement.blur();")
        browser.screenshot("host", out)
        # Further down: the last charts and the console's results in one view.
        browser.driver.execute_script(
            "document.querySelector('#console-history').scrollIntoView({block: 'end'});"
            "window.scrollBy(0, 24);"
        )
        browser.screenshot("host-console", out)

        # Its pending updates and reboot flag, as its agent reported them.
        browser.driver.execute_script(
            "document.getElementById('patch-status').scrollIntoView({block: 'center'});"
        )
        browser.screenshot("host-updates", out)

        fleet_run(browser, out)

        # Alerts: acknowledge the oldest open one through its button.
        browser.open("/alerts/", "system_alerts")
        buttons = [
            b
            for b in browser.find_all('#alert-rows button[data-action="acknowledge"]')
            if b.is_displayed()
        ]
        if buttons:
            row = buttons[-1].find_element("xpath", "./ancestor::tr")
            buttons[-1].click()
            browser.wait(lambda d: row.get_attribute("data-status") == "acknowledged")
        browser.screenshot("alerts", out)

        browser.open("/hosts/", "host_status")
        browser.screenshot("hosts", out)

        browser.open("/", "fleet_status", "system_alerts", "user_activity")
        browser.screenshot("overview", out)
        print(
            "saved the overview, hosts, hosts-group, host, host-console, host-updates, "
            f"fleet-run and alerts screenshots in {out}"
        )
    finally:
        if browser is not None:
            browser.quit()
        for agent in agents:
            agent.stop()
        if demo is not None:
            demo.terminate()
            demo.wait(10)
        for server in servers:
            server.stop()


def fleet_run(browser: support.Browser, out: Path) -> None:
    """The group's hosts page, then a command run on them from it, taken mid-run."""
    browser.open(f"/hosts/?group={GROUP}", "host_status")
    browser.wait(
        lambda d: (
            sum(b.text == "Online" for b in browser.find_all("#host-rows .badge"))
            >= 1 + len(MORE_REAL_HOSTS)
        ),
        30,
        "the group's real hosts online",
    )
    browser.screenshot("hosts-group", out)
    browser.find("#group-run a").click()
    browser.wait_live()
    browser.find("#run-command").send_keys("sleep 4; uptime")
    browser.find("#run-batch").clear()
    browser.find("#run-batch").send_keys("1")
    browser.find("#fleet-run-form button[type=submit]").click()
    browser.wait(lambda d: "/fleet-runs/" in d.current_url and d.current_url.count("/") > 4)
    browser.wait_live()
    browser.wait(
        lambda d: (
            browser.text_of('#run-counts [data-count="succeeded"]') == "1"
            and browser.text_of('#run-counts [data-count="running"]') == "1"
        ),
        60,
        "the run with one host done and the next running",
    )
    browser.screenshot("fleet-run", out)
    browser.wait_text("#run-state", lambda t: t not in ("", "Running"), 60, "the run's end")


if __name__ == "__main__":
    sys.exit(main())
