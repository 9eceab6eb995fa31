"""
What the browser tests drive: headless Chromium through chromedriver (Selenium), a Daphne
server that can come back on the port it had, and small waits on what pages show.

Nothing here sleeps for correctness: every wait is a :class:`WebDriverWait` (or a bounded
poll) on something the page or the server shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration import harness
from tests.integration.relay import Relay

CHROMIUM = Path(os.environ.get("SYSMANAGE_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("SYSMANAGE_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))
ARTIFACTS = harness.REPO_ROOT / "test-artifacts"
SCREENSHOTS = ARTIFACTS / "screenshots"

#: The laptop-sized viewport of the tests and of the README screenshots.
WINDOW_SIZE = (1366, 900)

#: Chromium flags: headless, no sandbox (root in containers), nothing fetched from outside.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--no-proxy-server",
    "--lang=en-US",
)

#: Default bound of a wait on the page.
WAIT = 20.0


def chromium_missing() -> str | None:
    """None if Chromium, chromedriver and Selenium are all here, else what is missing."""
    missing = [
        str(path)
        for path in (CHROMIUM, CHROMEDRIVER)
        if not (path.is_file() and os.access(path, os.X_OK))
    ]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (requirements-dev.txt)")
    if missing:
        return (
            "browser tests need "
            + ", ".join(missing)
            + " (Debian: apt-get install chromium chromium-driver)"
        )
    return None


# -- the browser ---------------------------------------------------------------------------


@dataclass
class ConsoleEntry:
    """One line of the browser console, and whether a test said to expect it."""

    level: str
    message: str
    timestamp: float  # epoch ms
    page: str
    expected: bool = False


class Browser:
    """One headless Chromium with the helpers the tests share.

    Keeps every console line it has read (``console``), and the WebSocket frames the pages
    received and the URLs they requested (``frames``, ``requests``: from the performance
    log) since the last :meth:`forget_frames`.
    """

    def __init__(
        self, base_url: str, *, size: tuple[int, int] = WINDOW_SIZE, log_dir: Path | None = None
    ) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.base_url = base_url.rstrip("/")
        self._profile = tempfile.mkdtemp(prefix="sysmanage-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self._profile}")
        options.add_argument(f"--window-size={size[0]},{size[1]}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        log_output = str(log_dir / "chromedriver.log") if log_dir else subprocess.DEVNULL
        # The driver's path is given, so Selenium Manager never runs (nor downloads).
        service = Service(
            executable_path=str(CHROMEDRIVER),
            log_output=log_output,
            service_args=["--log-level=WARNING"],
        )
        try:
            self.driver = webdriver.Chrome(service=service, options=options)
        except BaseException:
            shutil.rmtree(self._profile, ignore_errors=True)
            raise
        self.driver.set_page_load_timeout(30)
        self.set_viewport(*size)
        self.console: list[ConsoleEntry] = []
        self.frames: list[dict[str, Any]] = []
        self.requests: list[str] = []
        self._expect_console: list[re.Pattern[str]] = []

    def set_viewport(self, width: int, height: int) -> None:
        """Size the window so that the page itself gets ``width`` x ``height``."""
        self.driver.set_window_size(width, height)
        inner = self.driver.execute_script("return [window.innerWidth, window.innerHeight]")
        self.driver.set_window_size(width + width - inner[0], height + height - inner[1])

    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.driver.quit()
        shutil.rmtree(self._profile, ignore_errors=True)

    # -- navigation and waits --

    def url(self, path: str) -> str:
        return self.base_url + path

    def wait(
        self, condition: Callable[[Any], Any], timeout: float = WAIT, message: str = ""
    ) -> Any:
        """Wait until ``condition(driver)`` is truthy; return its value."""
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(
            self.driver,
            timeout,
            poll_frequency=0.1,
            ignored_exceptions=(StaleElementReferenceException,),
        ).until(condition, message)

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def visible(self, css: str, timeout: float = WAIT) -> Any:
        """Wait until an element matching ``css`` is displayed; return it."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        return self.wait(
            ec.visibility_of_element_located((By.CSS_SELECTOR, css)),
            timeout,
            f"nothing visible matches {css!r}",
        )

    def text_of(self, css: str) -> str:
        elements = self.find_all(css)
        return elements[0].text if elements else ""

    def wait_text(
        self, css: str, predicate: Callable[[str], bool], timeout: float = WAIT, what: str = ""
    ) -> str:
        """Wait until the text of the first ``css`` element satisfies ``predicate``."""

        def check(_driver: Any) -> str | bool:
            text = self.text_of(css)
            return text if predicate(text) else False

        try:
            return self.wait(check, timeout)
        except Exception as exc:
            raise AssertionError(
                f"{what or css}: text is {self.text_of(css)!r} after {timeout}s"
            ) from exc

    def connection_state(self) -> str:
        elements = self.find_all("#connection")
        return elements[0].get_attribute("data-state") if elements else ""

    def wait_live(self, timeout: float = WAIT) -> None:
        """Wait until the header's indicator says the page is live."""
        self.wait(
            lambda d: self.connection_state() == "open",
            timeout,
            "the connection indicator never said Live",
        )
        assert self.text_of("#connection .connection-label") == "Live"

    def open(self, path: str, *channels: str, timeout: float = WAIT) -> None:
        """Load a page, wait until it is live and the server has confirmed its
        subscriptions to ``channels`` (so no event the test causes next is missed)."""
        self.forget_frames()
        self.driver.get(self.url(path))
        self.wait_live(timeout)
        self.wait_subscribed(*channels, timeout=timeout)

    # -- WebSocket frames (from Chromium's performance log) --

    def read_frames(self) -> list[dict[str, Any]]:
        """Collect the JSON WebSocket frames received (and the URLs requested) since the
        last call."""
        for entry in self.driver.get_log("performance"):
            try:
                message = json.loads(entry["message"])["message"]
            except (KeyError, ValueError):
                continue
            if message.get("method") == "Network.requestWillBeSent":
                self.requests.append(str(message["params"].get("request", {}).get("url", "")))
            if message.get("method") != "Network.webSocketFrameReceived":
                continue
            payload = message["params"].get("response", {}).get("payloadData", "")
            with contextlib.suppress(ValueError):
                frame = json.loads(payload)
                if isinstance(frame, dict):
                    self.frames.append(frame)
        return self.frames

    def forget_frames(self) -> None:
        self.read_frames()
        self.frames.clear()
        self.requests.clear()

    def subscribed(self) -> set[str]:
        """Channels whose subscription the server confirmed since :meth:`forget_frames`."""
        return {
            f["data"]["channel"]
            for f in self.read_frames()
            if f.get("type") == "response"
            and isinstance(f.get("data"), dict)
            and f["data"].get("action") == "subscribe"
            and f["data"].get("status") == "subscribed"
        }

    def wait_subscribed(self, *channels: str, timeout: float = WAIT) -> None:
        if channels:
            self.wait(
                lambda d: set(channels) <= self.subscribed(),
                timeout,
                f"the server did not confirm the subscriptions to {channels} "
                f"(confirmed: {sorted(self.subscribed())})",
            )

    # -- console ---

    @contextlib.contextmanager
    def expecting_console(self, *patterns: str) -> Iterator[None]:
        """Console lines matching ``patterns`` (regular expressions) are expected while
        the block runs (and are read at its end)."""
        compiled = [re.compile(p) for p in patterns]
        self._expect_console.extend(compiled)
        try:
            yield
        finally:
            self.read_console()
            for pattern in compiled:
                self._expect_console.remove(pattern)

    def read_console(self) -> list[ConsoleEntry]:
        """Read the console lines logged since the last call; return them."""
        page = self._current_url()
        fresh = []
        for entry in self.driver.get_log("browser"):
            message = str(entry.get("message", ""))
            fresh.append(
                ConsoleEntry(
                    level=str(entry.get("level", "")),
                    message=message,
                    timestamp=float(entry.get("timestamp", 0)),
                    page=page,
                    expected=any(p.search(message) for p in self._expect_console),
                )
            )
        self.console.extend(fresh)
        return fresh

    def write_console(self, path: Path) -> None:
        """Save every console line read so far (the expected ones marked)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "".join(
                f"{e.timestamp:.0f} {e.level}{' (expected)' if e.expected else ''} "
                f"{e.page}: {e.message}\n"
                for e in self.console
            )
        )

    def console_problems(self) -> list[ConsoleEntry]:
        """Errors and warnings in the console that no test expected."""
        self.read_console()
        return [e for e in self.console if e.level in ("SEVERE", "WARNING") and not e.expected]

    def _current_url(self) -> str:
        try:
            return self.driver.current_url
        except Exception:
            return "?"

    # -- artifacts --

    def screenshot(self, name: str, directory: Path = SCREENSHOTS) -> Path:
        """Save the viewport as ``directory/name.png``."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def full_page_screenshot(self, name: str, directory: Path = SCREENSHOTS) -> Path:
        """Save the whole page (the window grown to the page's height) as a PNG."""
        width, height = self.driver.execute_script("return [window.innerWidth, window.innerHeight]")
        page_height = self.driver.execute_script(
            "return Math.ceil(document.documentElement.scrollHeight)"
        )
        try:
            self.set_viewport(width, max(height, page_height))
            return self.screenshot(name, directory)
        finally:
            self.set_viewport(width, height)


# -- logging in ------------------------------------------------------------------------------


def log_in(browser: Browser, username: str, password: str) -> None:
    """Log in through the ``/login/`` form and wait for the overview."""
    browser.driver.get(browser.url("/login/"))
    fill_login_form(browser, username, password)
    browser.wait(
        lambda d: d.current_url.rstrip("/") == browser.base_url,
        message="the login did not lead to the overview",
    )


def fill_login_form(browser: Browser, username: str, password: str) -> None:
    user = browser.visible("#id_username")
    user.clear()
    user.send_keys(username)
    secret = browser.find("#id_password")
    secret.clear()
    secret.send_keys(password)
    browser.find(".login-box button[type=submit]").click()


def ensure_logged_in(browser: Browser, username: str, password: str) -> None:
    """Log in unless the browser's session already is."""
    browser.driver.get(browser.url("/"))
    if browser.find_all(".login-box"):  # anonymous: / shows the login form
        fill_login_form(browser, username, password)
        browser.wait(
            lambda d: not browser.find_all(".login-box"),
            message="the login did not leave the login page",
        )


# -- a server that comes back on the same port ------------------------------------------------


class FixedPortServer(harness.DaphneServer):
    """A Daphne server bound with ``-b 127.0.0.1 -p PORT``: started again on the port an
    earlier server had, as an operator restarting it would."""

    def start(self) -> FixedPortServer:
        assert self.port, "a FixedPortServer needs its port"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                harness.PYTHON,
                "-m",
                "sysmanage.serve",
                "-b",
                "127.0.0.1",
                "-p",
                str(self.port),
                "--application-close-timeout",
                "5",
                "sysmanage.asgi:application",
            ],
            cwd=harness.REPO_ROOT,
            env=self.env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=harness._die_with_parent if sys.platform == "linux" else None,
        )
        harness.LIVE_SERVERS.append(self)
        return self


def restart_on_same_port(deployment: harness.Deployment, name: str) -> FixedPortServer:
    """Start a server with the environment and port of ``deployment.server`` (which must
    be stopped), wait until it serves, and put it in the deployment's place (so the
    deployment's teardown stops it)."""
    old = deployment.server
    assert not old.alive(), "stop the old server first"
    server = FixedPortServer(
        name=name, env=old.env, log_path=deployment.work_dir / f"{name}.log", port=old.port
    )
    server.start().wait_ready()
    deployment.servers[deployment.servers.index(old)] = server
    return server


# -- a network that can go down ---------------------------------------------------------------


class RelayThread:
    """A :class:`~tests.integration.relay.Relay` to a server's port, run on an event loop
    of its own thread so that the (synchronous) browser tests can cut it: a browser that
    loads pages from :attr:`port` talks to the server through it, HTTP and WebSocket."""

    def __init__(self, target_port: int) -> None:
        self.relay = Relay(target_port)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="relay", daemon=True)
        self.thread.start()
        self.port: int = self._run(self.relay.start())

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def _call(self, action: Callable[[], None]) -> None:
        async def run() -> None:
            action()

        self._run(run())

    def go_down(self) -> None:
        """Drop every relayed connection and refuse new ones."""
        self._call(self.relay.refuse)
        self._call(self.relay.cut)

    def come_back(self) -> None:
        """Relay new connections again."""
        self._call(self.relay.accept)

    def close(self) -> None:
        async def shut() -> None:
            await self.relay.close()  # the relayed connections end, and their tasks with them
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if tasks:
                await asyncio.wait(tasks, timeout=5)

        try:
            self._run(shut())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


# -- a package to install --------------------------------------------------------------------


def build_deb(workdir: Path, package: str) -> Path:
    """A tiny architecture-independent .deb named ``package`` (one file, no dependencies)."""
    root = workdir / "pkg"
    share = root / "usr/share" / package
    (root / "DEBIAN").mkdir(parents=True)
    share.mkdir(parents=True)
    (share / "README").write_text("installed by the SysManage browser tests\n")
    (root / "DEBIAN/control").write_text(
        f"Package: {package}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: SysManage tests <tests@example.invalid>\n"
        "Description: package installed and removed by the browser tests\n"
    )
    target = workdir / f"{package}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(root), str(target)], check=True, capture_output=True)
    return target


def dpkg_installed(package: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    )
    return "install ok installed" in result.stdout


# -- the REST API ------------------------------------------------------------------------------


def api(
    deployment: harness.Deployment, method: str, path: str, body: Any = None, user: str = "admin"
) -> Any:
    """A REST API call as ``user`` (bearer token); return the JSON body, checking 2xx."""
    from tests.integration.client import http_request

    response = http_request(
        method, deployment.server.base_url + path, token=deployment.token(user), json_body=body
    )
    assert 200 <= response.status < 300, f"{method} {path}: {response.status} {response.body}"
    return response.body


def poll(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Call ``check`` until it returns something truthy (for waits outside the browser)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
