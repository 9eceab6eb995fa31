"""The start-up checks in process (the subprocess tests in tests/integration see what a
person sees; these reach every branch)."""

from __future__ import annotations

import logging
import socket

import pytest

from sysmanage import preflight
from sysmanage.logfilters import DisallowedHostFilter

POSTGRES = {"ENGINE": "sysmanage.postgres", "USER": "postgres", "HOST": "127.0.0.1"}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_settings_that_load_are_no_problem():
    assert preflight.check_settings() is None


def test_sqlite_needs_no_connection():
    assert preflight.check_database() is None


def test_a_missing_postgres_database_is_named():
    problem = preflight.check_database({**POSTGRES, "NAME": "no_such_db_here", "PORT": 5432})
    if problem is not None and "cannot reach" in problem:
        pytest.skip("the test PostgreSQL does not answer")
    assert problem is not None
    assert "no database 'no_such_db_here'" in problem


def test_a_closed_postgres_port_and_a_refused_login_are_named():
    closed = {**POSTGRES, "NAME": "test", "PORT": closed_port()}
    assert "cannot reach PostgreSQL" in (preflight.check_database(closed) or "")
    stranger = {**POSTGRES, "NAME": "test", "PORT": 5432, "USER": "nobody_at_all"}
    problem = preflight.check_database(stranger) or ""
    if "cannot reach" in problem:
        pytest.skip("the test PostgreSQL does not answer")
    assert "refused the login" in problem


def test_redis_is_checked_only_when_configured(settings):
    settings.REDIS_URL = None
    assert preflight.check_redis() is None
    settings.REDIS_URL = f"redis://:pw-secret@127.0.0.1:{closed_port()}/0"
    problem = preflight.check_redis() or ""
    assert "REDIS_URL: no Redis answers" in problem
    assert "pw-secret" not in problem
    assert preflight._redacted("redis://127.0.0.1:1/0") == "redis://127.0.0.1:1/0"


def test_a_public_address_needs_allowed_names(settings):
    settings.ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]"]
    assert preflight.check_host("127.0.0.1") is None
    assert "DJANGO_ALLOWED_HOSTS" in (preflight.check_host("0.0.0.0") or "")
    assert "DJANGO_ALLOWED_HOSTS" in (preflight.check_host("::") or "")
    assert preflight.check_host("fleet.example.com") is None  # a name: not a wildcard
    settings.ALLOWED_HOSTS = ["fleet.example.com"]
    assert preflight.check_host("0.0.0.0") is None


def test_problems_and_the_command_line(settings, capsys):
    settings.ALLOWED_HOSTS = ["localhost"]
    settings.REDIS_URL = None
    assert preflight.problems("127.0.0.1") == []
    assert preflight.problems() == []
    with pytest.raises(SystemExit) as stopped:
        preflight.main(["--host", "0.0.0.0"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith("error: HOST=0.0.0.0")
    preflight.main(["--host", "127.0.0.1"])  # no problem: returns
    assert preflight.bound_host(["-b", "0.0.0.0", "-p", "1"]) == "0.0.0.0"
    assert preflight.bound_host(["--bind=::"]) == "::"
    assert preflight.bound_host(["-p", "1"]) is None


def test_a_host_not_allowed_is_one_line_per_host_and_interval():
    guard = DisallowedHostFilter(interval=60)

    def report(host: str) -> logging.LogRecord:
        try:
            raise ValueError(f"Invalid HTTP_HOST header: '{host}'. You may need to add it.")
        except ValueError as exc:
            return logging.LogRecord(
                "django.security.DisallowedHost",
                logging.ERROR,
                __file__,
                1,
                "x",
                (),
                (type(exc), exc, exc.__traceback__),
            )

    first = report("a.example")
    assert guard.filter(first)
    assert first.getMessage().startswith("Refused a request for host 'a.example'")
    assert first.levelname == "WARNING"
    assert first.exc_info is None
    assert not guard.filter(report("a.example"))
    assert not guard.filter(report("a.example"))
    assert guard.filter(report("b.example"))
    guard.interval = 0
    again = report("a.example")
    assert guard.filter(again)
    assert "2 more since the last report" in again.getMessage()
