"""
Fixtures of the browser tests: the integration tests' servers (re-exported from
``tests/integration/conftest.py``), one headless Chromium per module, and screenshots
and console lines of the browser when a test fails.

Chromium and chromedriver are the Debian packages ``chromium`` and ``chromium-driver``
(``scripts/test`` installs them). Without them these tests are skipped, or fail when
``CI`` is set.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser import support

# The integration tests' fixtures and hooks: a seeded SQLite database, Daphne servers,
# server log tails in failure reports, and failing on server tracebacks.
from tests.integration.conftest import (  # noqa: F401
    _servers_log_no_tracebacks,
    launch_sqlite,
    pytest_runtest_makereport,
    sqlite_template,
)
from tests.integration.harness import Deployment
from tests.integration.test_agent_e2e import AGENT_SETTINGS

#: Open browsers, for the failure screenshots.
_OPEN: list[support.Browser] = []


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium() -> None:
    """Skip (or fail under CI) when Chromium, chromedriver or Selenium is missing."""
    problem = support.chromium_missing()
    if problem:
        _unavailable(problem)


@pytest.fixture(scope="module")
def deployment(chromium: None, launch_sqlite: Any) -> Iterator[Deployment]:  # noqa: F811
    """One server on SQLite (in-memory layer) with short agent intervals."""
    with launch_sqlite("browser", **AGENT_SETTINGS) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def browser(deployment: Deployment, request: pytest.FixtureRequest) -> Iterator[support.Browser]:
    """One headless Chromium for the module, not logged in at first."""
    shutil.rmtree(support.SCREENSHOTS / "failed", ignore_errors=True)
    instance = support.Browser(deployment.server.base_url, log_dir=deployment.work_dir)
    _OPEN.append(instance)
    try:
        yield instance
    finally:
        _OPEN.remove(instance)
        try:
            instance.read_console()
            module = request.module.__name__.rsplit(".", 1)[-1]
            instance.write_console(support.ARTIFACTS / f"browser-console-{module}.log")
        finally:
            instance.quit()


@pytest.fixture(autouse=True)
def _read_console_after_each_test() -> Iterator[None]:
    """Keep the console lines of each test (a later test checks them all)."""
    yield
    for instance in _OPEN:
        with contextlib.suppress(Exception):
            instance.read_console()


def pytest_exception_interact(
    node: pytest.Item, call: pytest.CallInfo[Any], report: pytest.TestReport
) -> None:
    """When a test fails: a screenshot and the HTML of every open browser's page, and its
    console lines, under ``test-artifacts/screenshots/failed/``."""
    if not _OPEN:
        return
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", node.name)
    directory = support.SCREENSHOTS / "failed"
    for index, instance in enumerate(_OPEN):
        stem = f"{name}-{index}" if len(_OPEN) > 1 else name
        try:
            path = instance.screenshot(stem, directory)
            (directory / f"{stem}.html").write_text(instance.driver.page_source)
            instance.read_console()
            lines = "\n".join(
                f"{e.level} {'(expected) ' if e.expected else ''}{e.page}: {e.message}"
                for e in instance.console
            )
            report.sections.append(
                (
                    f"browser {index}: {instance.driver.current_url}",
                    f"screenshot: {path}\nconsole:\n{lines or '(empty)'}",
                )
            )
        except Exception as exc:
            report.sections.append((f"browser {index}", f"no screenshot: {exc!r}"))
