"""
Mistakes a new operator makes, tried as they would make them: each gives one line that
names what to change and a non-zero exit, never a traceback, a long wait or silence.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration import harness
from tests.integration.conftest import POSTGRES_ADMIN_URL, REDIS_TEST_URL, require_postgres

pytestmark = pytest.mark.integration

#: Bound of each command: a check that waits longer than this is itself the defect.
QUICK = 15.0


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(
    args: list[str], tmp_path: Path, **settings: str | None
) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` with a server's environment plus ``settings``; never raises."""
    defaults: dict[str, str | None] = {
        "SYSMANAGE_VAR_DIR": str(tmp_path / "var"),
        "DATABASE_URL": harness.sqlite_url(tmp_path / "db.sqlite3"),
    }
    env = harness.server_env(**{**defaults, **settings})
    started = time.monotonic()
    done = subprocess.run(
        [harness.PYTHON, *args],
        cwd=harness.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=QUICK * 2,
        check=False,
    )
    assert time.monotonic() - started < QUICK, f"{args} took too long:\n{done.stderr}"
    return done


def one_error_line(done: subprocess.CompletedProcess[str], *words: str) -> str:
    """The run failed with status 2 and said why in one ``error:`` line holding ``words``."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


PREFLIGHT = ["-m", "sysmanage.preflight", "--host", "127.0.0.1"]


def test_a_variable_the_settings_refuse_is_one_line(tmp_path):
    one_error_line(run(PREFLIGHT, tmp_path, DJANGO_DEBUG="maybe"), "DJANGO_DEBUG", "'maybe'")
    one_error_line(run(["manage.py", "check"], tmp_path, DJANGO_DEBUG="maybe"), "DJANGO_DEBUG")


def test_a_fallback_key_that_is_the_key_itself_is_one_line(tmp_path):
    """An environment file edited for a key rotation without swapping the two values."""
    key, old = harness.new_secret(), harness.new_secret()
    settings = {"DJANGO_SECRET_KEY": key, "DJANGO_SECRET_KEY_FALLBACKS": f"{old},{key}"}
    line = one_error_line(run(PREFLIGHT, tmp_path, **settings), "DJANGO_SECRET_KEY_FALLBACKS")
    assert key not in line
    assert old not in line
    one_error_line(run(["manage.py", "check"], tmp_path, **settings), "DJANGO_SECRET_KEY")
    settings["DJANGO_SECRET_KEY_FALLBACKS"] = f" {old} ,"
    assert run(PREFLIGHT, tmp_path, **settings).returncode == 0


def test_a_database_url_of_an_unknown_kind_is_named(tmp_path):
    url = "postgress://postgres@127.0.0.1:5432/test"
    one_error_line(run(PREFLIGHT, tmp_path, DATABASE_URL=url), "DATABASE_URL", "'postgress'")
    one_error_line(run(["manage.py", "migrate"], tmp_path, DATABASE_URL=url), "DATABASE_URL")


def test_a_postgres_database_that_does_not_exist_is_named_at_once(tmp_path):
    require_postgres()
    url = harness.with_database(POSTGRES_ADMIN_URL, "no_such_fleet_db")
    line = one_error_line(run(PREFLIGHT, tmp_path, DATABASE_URL=url), "DATABASE_URL")
    assert "no database 'no_such_fleet_db'" in line
    assert "createdb no_such_fleet_db" in line
    migrate = run(["manage.py", "migrate"], tmp_path, DATABASE_URL=url)
    one_error_line(migrate, "DATABASE_URL", "no database 'no_such_fleet_db'")


def test_a_postgres_port_where_nothing_listens_is_named(tmp_path):
    url = f"postgres://postgres@127.0.0.1:{_closed_port()}/test"
    one_error_line(run(PREFLIGHT, tmp_path, DATABASE_URL=url), "DATABASE_URL", "cannot reach")


def test_a_redis_url_where_nothing_listens_is_named(tmp_path):
    url = f"redis://:hunter2@127.0.0.1:{_closed_port()}/0"
    line = one_error_line(run(PREFLIGHT, tmp_path, REDIS_URL=url), "REDIS_URL", "no Redis")
    assert "hunter2" not in line


def test_a_reachable_configuration_passes(tmp_path):
    require_postgres()
    if harness.redis_reachable(REDIS_TEST_URL):
        pytest.skip("the test Redis does not answer")
    done = run(PREFLIGHT, tmp_path, DATABASE_URL=POSTGRES_ADMIN_URL, REDIS_URL=REDIS_TEST_URL)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_a_public_address_needs_the_names_clients_use(tmp_path):
    public = ["-m", "sysmanage.preflight", "--host", "0.0.0.0"]  # checked, not bound
    one_error_line(run(public, tmp_path), "HOST=0.0.0.0", "DJANGO_ALLOWED_HOSTS")
    allowed = run(public, tmp_path, DJANGO_ALLOWED_HOSTS="fleet.example.com")
    assert allowed.returncode == 0, allowed.stderr


def test_the_server_does_not_start_on_a_broken_configuration(tmp_path):
    port = _closed_port()
    serve = ["-m", "sysmanage.serve", "-b", "0.0.0.0", "-p", str(port)]
    done = run([*serve, "sysmanage.asgi:application"], tmp_path)
    one_error_line(done, "DJANGO_ALLOWED_HOSTS")
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass


def test_seed_demo_against_nothing_says_so(tmp_path):
    harness.run_python(
        ["manage.py", "migrate", "-v", "0"],
        harness.server_env(
            SYSMANAGE_VAR_DIR=str(tmp_path / "var"),
            DATABASE_URL=harness.sqlite_url(tmp_path / "db.sqlite3"),
        ),
    )
    server = f"http://127.0.0.1:{_closed_port()}"
    done = run(["manage.py", "seed_demo", "--server", server, "--hosts", "1"], tmp_path)
    assert done.returncode != 0, done.stdout
    assert "Streaming" not in done.stdout
    assert f"nothing answers at {server}" in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_host_not_allowed_is_one_line_per_host_and_minute(sqlite_server: Any):
    server = sqlite_server.servers[0]
    offset = server.log_size()
    for _ in range(3):
        status = _raw_status(server.port, b"fleet.internal.example")
        assert status == 400
    deadline = time.monotonic() + 5
    while "Refused a request" not in server.log_since(offset) and time.monotonic() < deadline:
        time.sleep(0.1)
    text = server.log_since(offset)
    refused = [line for line in text.splitlines() if "Refused a request for host" in line]
    assert len(refused) == 1, text
    assert "'fleet.internal.example'" in refused[0]
    assert "DJANGO_ALLOWED_HOSTS" in refused[0]
    assert "Invalid HTTP_HOST" not in text  # the traceback and its message are gone


def _raw_status(port: int, host: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        head = conn.recv(64)
    return int(head.split(b" ", 2)[1])


def test_ws_watch_shows_why_the_server_refused_its_token(sqlite_server: Any):
    server = sqlite_server.servers[0]
    done = subprocess.run(
        [
            harness.PYTHON,
            "scripts/ws_watch.py",
            "--url",
            server.base_url,
            "--token",
            "not-a-jwt",
            "--channel",
            "host_status",
        ],
        cwd=harness.REPO_ROOT,
        env=harness.server_env(),
        capture_output=True,
        text=True,
        timeout=QUICK,
        check=False,
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert "the server refused the token: Invalid or expired JWT token (AUTH_FAILED)" in (
        done.stderr
    )


def test_a_second_database_keeps_the_first_ones_admin_password(tmp_path):
    """``scripts/serve`` on PostgreSQL, in a var/ that already holds the default SQLite
    database's admin password: the new database's admin gets a file of its own."""
    require_postgres()
    name = harness.create_postgres_database(POSTGRES_ADMIN_URL)
    var = tmp_path / "var"
    var.mkdir(mode=0o700)
    first = var / "admin-password"
    first.write_text("the-first-databases-password\n")
    port = _closed_port()
    env = harness.server_env(
        SYSMANAGE_VAR_DIR=str(var),
        DATABASE_URL=harness.with_database(POSTGRES_ADMIN_URL, name),
        PORT=str(port),
        HOST="127.0.0.1",
        DEMO="0",
        **harness.COMMON_SETTINGS,
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(harness.REPO_ROOT / "scripts" / "serve")],
            cwd=harness.REPO_ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not _answers(port):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert first.read_text() == "the-first-databases-password\n"
        owns = list(var.glob(f"admin-password-*{name}"))
        assert len(owns) == 1, sorted(p.name for p in var.iterdir())
        own = owns[0]
        assert own.stat().st_mode & 0o777 == 0o600
        assert own.read_text().strip() in log.read_text()  # the password shown once
        assert f"--password-file {own}" in log.read_text()  # and the watch hint names it
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
        harness.drop_postgres_database(POSTGRES_ADMIN_URL, name)


def _answers(port: int) -> bool:
    try:
        return harness.http_get(f"http://127.0.0.1:{port}/healthz", timeout=1.0)[0] == 200
    except OSError:
        return False


def test_management_commands_of_a_first_run_print_no_warning(tmp_path):
    """The embedded default (no REDIS_URL) is a supported setup: a command that publishes
    events (a host enrolled) must not warn about it on every run."""
    assert run(["manage.py", "migrate", "-v", "0"], tmp_path).returncode == 0
    done = run(["manage.py", "register_host", "web-01"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    assert "REDIS_URL" not in done.stderr, done.stderr
