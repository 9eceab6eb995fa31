"""
Fixtures of the integration tests: real databases, real Daphne processes.

* ``sqlite_template`` (session): one migrated and seeded SQLite file, copied by every
  SQLite deployment so that ``migrate`` runs once per test session.
* ``sqlite_server`` (module): one server on a fresh copy, in-memory channel layer.
* ``launch_sqlite`` (session): a factory for modules that need other settings.
* ``pg_redis_cluster`` (module): a fresh PostgreSQL database, a Redis prefix of its own
  and two servers sharing both; ``launch_pg_redis`` (session) makes such clusters with
  other settings.  Skipped when PostgreSQL or Redis is unreachable, unless
  ``CI`` is set, in which case that is a failure.  Their URLs come from
  SYSMANAGE_TEST_POSTGRES_URL (an admin connection; the tests create and drop their own
  database beside it) and SYSMANAGE_TEST_REDIS_URL; set to an empty value, a service is
  disabled and these tests are skipped.

A test that fails gets the tails of the live servers' logs in its report; a test
during which a server logged a traceback fails (mark it ``server_errors_expected`` when
that is the point).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import harness
from tests.integration.harness import COMMON_SETTINGS, SQLITE_SERVER_SETTINGS, Deployment

POSTGRES_ADMIN_URL = os.environ.get(
    "SYSMANAGE_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test"
)
REDIS_TEST_URL = os.environ.get("SYSMANAGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
LOG_TAIL_CHARS = 20_000


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "server_errors_expected: the servers may log tracebacks during this test"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and harness.LIVE_SERVERS:
        for server in harness.LIVE_SERVERS:
            state = "running" if server.alive() else f"exited {server.process.returncode}"
            report.sections.append(
                (
                    f"server {server.name} ({server.base_url}, {state}) log tail",
                    server.log()[-LOG_TAIL_CHARS:],
                )
            )
    return report


@pytest.fixture(autouse=True)
def _servers_log_no_tracebacks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test during which a live server logged a traceback or died."""
    offsets = {id(s): s.log_size() for s in harness.LIVE_SERVERS}
    yield
    if request.node.get_closest_marker("server_errors_expected"):
        return
    problems = []
    for server in list(harness.LIVE_SERVERS):
        if id(server) not in offsets:
            continue
        if not server.alive():
            problems.append(f"server {server.name} died:\n{server.log()[-LOG_TAIL_CHARS:]}")
            continue
        text = server.log_since(offsets[id(server)])
        if "Traceback (most recent call last)" in text:
            problems.append(f"server {server.name} logged a traceback:\n{text[-LOG_TAIL_CHARS:]}")
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


def _stop_all(servers: list[harness.DaphneServer]) -> None:
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A migrated, seeded SQLite database to copy: ``(path, seed)``."""
    base = tmp_path_factory.mktemp("sqlite-template")
    path = base / "template.sqlite3"
    env = harness.server_env(
        **COMMON_SETTINGS,
        DATABASE_URL=harness.sqlite_url(path),
        SYSMANAGE_VAR_DIR=str(base / "var"),
        DJANGO_SECRET_KEY=harness.new_secret(),
    )
    seed = harness.seed_database(env)
    return path, seed


@pytest.fixture(scope="session")
def launch_sqlite(
    tmp_path_factory: pytest.TempPathFactory, sqlite_template: tuple[Path, dict[str, Any]]
) -> Any:
    """``with launch_sqlite("name", SETTING="value") as deployment:`` one server on a fresh
    copy of the template database, in-memory layer (REDIS_URL unset)."""

    @contextlib.contextmanager
    def launch(name: str, **settings: str) -> Iterator[Deployment]:
        work = tmp_path_factory.mktemp(name)
        database = work / "db.sqlite3"
        harness.copy_sqlite(sqlite_template[0], database)
        env = harness.server_env(
            DATABASE_URL=harness.sqlite_url(database),
            SYSMANAGE_VAR_DIR=str(work / "var"),
            DJANGO_SECRET_KEY=harness.new_secret(),
            **{**COMMON_SETTINGS, **settings},
        )
        servers = harness.start_servers([(name, env)], work)
        try:
            yield Deployment(env=env, seed=sqlite_template[1], servers=servers, work_dir=work)
        finally:
            _stop_all(servers)

    return launch


@pytest.fixture(scope="module")
def sqlite_server(launch_sqlite: Any) -> Iterator[Deployment]:
    """One server on SQLite with the in-memory channel layer."""
    with launch_sqlite("sqlite", **SQLITE_SERVER_SETTINGS) as deployment:
        yield deployment


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def launch_pg_redis(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``with launch_pg_redis("name", SETTING="value") as deployment:`` two servers on one
    fresh PostgreSQL database and one Redis prefix (skipped without those services); a
    ``REDIS_URL`` among the settings replaces the shared test Redis."""

    @contextlib.contextmanager
    def launch(name: str, **settings: str) -> Iterator[Deployment]:
        require_pg_redis()
        work = tmp_path_factory.mktemp(name)
        database = harness.create_postgres_database(POSTGRES_ADMIN_URL)
        prefix = f"sysmanage-it-{secrets.token_hex(6)}"
        servers: list[harness.DaphneServer] = []
        try:
            common = {
                **COMMON_SETTINGS,
                "DATABASE_URL": harness.with_database(POSTGRES_ADMIN_URL, database),
                "DJANGO_SECRET_KEY": harness.new_secret(),
                "SYSMANAGE_VAR_DIR": str(work / "var"),
                **settings,
            }
            seed = harness.seed_database(harness.server_env(**common))
            env = harness.server_env(
                **{"REDIS_URL": REDIS_TEST_URL, "SYSMANAGE_REDIS_PREFIX": prefix, **common}
            )
            servers = harness.start_servers([(f"{name}-a", env), (f"{name}-b", env)], work)
            yield Deployment(env=env, seed=seed, servers=servers, work_dir=work)
        finally:
            _stop_all(servers)
            harness.drop_postgres_database(POSTGRES_ADMIN_URL, database)
            harness.delete_redis_keys(REDIS_TEST_URL, prefix)

    return launch


def require_postgres() -> None:
    """Skip (fail when ``CI`` is set) unless the test PostgreSQL answers."""
    if not POSTGRES_ADMIN_URL:
        pytest.skip("SYSMANAGE_TEST_POSTGRES_URL is set empty: running without that service")
    problem = harness.postgres_reachable(POSTGRES_ADMIN_URL)
    if problem:
        _unavailable(problem)


def require_pg_redis() -> None:
    """Skip (fail when ``CI`` is set) unless the test PostgreSQL and Redis answer."""
    require_postgres()
    if not REDIS_TEST_URL:
        pytest.skip("SYSMANAGE_TEST_REDIS_URL is set empty: running without that service")
    problem = harness.redis_reachable(REDIS_TEST_URL)
    if problem:
        _unavailable(problem)


@pytest.fixture(scope="module")
def pg_redis_cluster(launch_pg_redis: Any) -> Iterator[Deployment]:
    """Two servers on one fresh PostgreSQL database and one Redis prefix."""
    with launch_pg_redis("pg") as deployment:
        yield deployment
