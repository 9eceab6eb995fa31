"""Database faults: how they are told apart, the gate that refuses at once while the
database is unreachable, and what HTTP clients, sockets and the log see."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

import psycopg
import pytest
from django.db import IntegrityError, OperationalError
from psycopg_pool import PoolClosed, PoolTimeout

from sysmanage import dbgate
from sysmanage.dbgate import DatabaseGate, DatabaseUnavailable
from tests.wsutil import expect_close, open_socket


def wrapped(django_error: type[Exception], cause: BaseException) -> Exception:
    """A Django database error raised from a driver's, as Django's wrapper raises it."""
    try:
        raise django_error(str(cause)) from cause
    except django_error as exc:
        return exc


@pytest.mark.parametrize(
    ("error", "fault"),
    [
        (DatabaseUnavailable("gate closed"), "unreachable"),
        (wrapped(OperationalError, sqlite3.OperationalError("database is locked")), "busy"),
        (wrapped(OperationalError, sqlite3.OperationalError("no such table: x")), None),
        (wrapped(OperationalError, psycopg.OperationalError("connection failed")), "unreachable"),
        (wrapped(OperationalError, psycopg.errors.AdminShutdown("terminating")), "unreachable"),
        (wrapped(OperationalError, psycopg.errors.TooManyConnections("full")), "unreachable"),
        (wrapped(OperationalError, psycopg.errors.QueryCanceled("statement timeout")), None),
        (wrapped(OperationalError, PoolTimeout("no connection in 20 s")), "busy"),
        (wrapped(OperationalError, PoolClosed("closed")), "unreachable"),
        (wrapped(IntegrityError, sqlite3.IntegrityError("UNIQUE constraint failed")), None),
        (ValueError("not a database error"), None),
        (None, None),
    ],
)
def test_faults_are_told_from_bugs(error, fault):
    assert dbgate.unavailable(error) == fault


@pytest.fixture
def fast_probing(monkeypatch):
    monkeypatch.setattr(dbgate, "PROBE_INTERVAL", 0.02)


def wait_until(condition, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_the_gate_refuses_at_once_until_a_probe_connects(fast_probing, caplog):
    database_back = threading.Event()
    resets = []

    def probe():
        if not database_back.is_set():
            raise psycopg.OperationalError("connection refused")

    gate = DatabaseGate("test", probe=probe, reset=lambda: resets.append(1))
    gate.refuse_if_down()  # open: nothing happens
    with caplog.at_level(logging.WARNING, logger="sysmanage.dbgate"):
        gate.connect_failed(psycopg.OperationalError("connection refused"), started=0.0)
        for _ in range(3):
            began = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match="connection refused"):
                gate.refuse_if_down()
            assert time.monotonic() - began < 0.1
        _, reason = gate.outage()
        assert reason == "connection refused"
        wait_until(lambda: resets)  # the pool is discarded
        time.sleep(0.1)
        assert gate.outage() is not None  # probes keep failing: still down
        database_back.set()
        wait_until(lambda: gate.outage() is None)
    gate.refuse_if_down()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("database unreachable (connection refused)" in m for m in messages) == 1
    back = [m for m in messages if "database reachable again" in m]
    assert len(back) == 1, messages
    assert "3 attempt(s)" in back[0], back


def test_an_attempt_begun_during_the_outage_does_not_start_another(fast_probing):
    database_back = threading.Event()

    def probe():
        if not database_back.is_set():
            raise psycopg.OperationalError("connection refused")

    gate = DatabaseGate("test", probe=probe, reset=lambda: None)
    began = time.monotonic()
    gate.connect_failed(psycopg.OperationalError("refused"), started=began)
    database_back.set()
    wait_until(lambda: gate.outage() is None)
    database_back.clear()
    # a connection attempt that hung through the outage fails only now
    gate.connect_failed(psycopg.OperationalError("timeout expired"), started=began)
    assert gate.outage() is None
    gate.connect_failed(psycopg.OperationalError("refused"), started=time.monotonic())
    assert gate.outage() is not None
    database_back.set()
    wait_until(lambda: gate.outage() is None)


def test_database_faults_are_counted_not_logged_with_a_traceback(caplog, monkeypatch):
    monkeypatch.setitem(dbgate._TALLIES, "busy", dbgate._Tally())
    log = logging.getLogger("tests.dbgate")
    locked = wrapped(OperationalError, sqlite3.OperationalError("database is locked"))
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            try:
                raise locked
            except OperationalError:
                assert dbgate.log_exception(log, "job failed") == "busy"
        try:
            raise ValueError("a bug")
        except ValueError:
            assert dbgate.log_exception(log, "job failed") is None
    busy = [r for r in caplog.records if "database busy" in r.getMessage()]
    assert len(busy) == 1, caplog.text  # once per interval, not once per failure
    assert busy[0].exc_info is None
    bugs = [r for r in caplog.records if r.getMessage() == "job failed"]
    assert len(bugs) == 1
    assert bugs[0].exc_info is not None  # a bug keeps its traceback


@pytest.fixture
def hosts_list_unavailable(monkeypatch):
    from hosts.api import HostViewSet

    def unreachable(self):
        raise DatabaseUnavailable("the database is unreachable: connection refused")

    monkeypatch.setattr(HostViewSet, "get_queryset", unreachable)


@pytest.mark.django_db
def test_the_rest_api_answers_503_with_retry_after(client, make_user, hosts_list_unavailable):
    from sysmanage.credentials import access_token_for

    token = access_token_for(make_user("alice"))
    response = client.get("/api/hosts/", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 503
    assert response["Retry-After"] == str(dbgate.RETRY_AFTER)
    assert response.json() == {
        "detail": "The server cannot reach its database; retry in 2 seconds.",
        "code": "service_unavailable",
        "retry_after": dbgate.RETRY_AFTER,
    }


@pytest.mark.django_db
def test_a_page_answers_503_with_a_short_page(client, make_user, monkeypatch, caplog):
    from hosts.views import HostListView

    def locked(self, **kwargs):
        raise wrapped(OperationalError, sqlite3.OperationalError("database is locked"))

    monkeypatch.setattr(HostListView, "get_context_data", locked)
    client.force_login(make_user("alice"))
    with caplog.at_level(logging.INFO, logger="django.request"):
        response = client.get("/hosts/")
    assert response.status_code == 503
    assert response["Retry-After"] == str(dbgate.RETRY_AFTER)
    assert response["Content-Type"].startswith("text/html")
    assert b"The database is busy. Please try again in a moment." in response.content
    assert not [r for r in caplog.records if r.name == "django.request"]


@pytest.mark.django_db
def test_other_errors_are_still_server_errors(client, make_user, monkeypatch):
    from hosts.views import HostListView

    def bug(self, **kwargs):
        raise wrapped(OperationalError, sqlite3.OperationalError("no such column: x"))

    monkeypatch.setattr(HostListView, "get_context_data", bug)
    client.force_login(make_user("alice"))
    client.raise_request_exception = False
    assert client.get("/hosts/").status_code == 500


@pytest.mark.django_db
def test_readiness_reports_an_unreachable_database(client, monkeypatch):
    gate = dbgate.gate()
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "channel_layer": "ok"}}
    monkeypatch.setattr(gate, "down_since", time.monotonic())
    monkeypatch.setattr(gate, "down_since_wall", dbgate.datetime(2026, 12, 5, tzinfo=dbgate.UTC))
    monkeypatch.setattr(gate, "reason", "connection refused")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {
            "database": "unreachable since 2026-12-05T00:00:00.000Z: connection refused",
            "channel_layer": "ok",
        },
    }


@pytest.mark.django_db(transaction=True)
async def test_a_socket_is_told_the_database_is_unreachable_and_closed_4503(monkeypatch):
    async def unreachable(scope):
        raise DatabaseUnavailable("the database is unreachable: connection refused")

    monkeypatch.setattr("sysmanage.consumers.authenticate_socket", unreachable)
    comm = await open_socket(subprotocols=["bearer", "some.token"])
    error = await comm.receive_json_from(timeout=3)
    assert error["type"] == "error"
    assert error["channel"] == "system"
    assert error["data"] == {
        "code": "SERVICE_UNAVAILABLE",
        "message": "The server cannot reach its database; try again in a moment",
        "retry_after": dbgate.RETRY_AFTER,
    }
    assert await expect_close(comm) == 4503


@pytest.mark.django_db(transaction=True)
async def test_an_agent_is_told_the_database_is_busy_and_closed_4503(monkeypatch):
    def locked(tokens):
        raise wrapped(OperationalError, sqlite3.OperationalError("database is locked"))

    monkeypatch.setattr("hosts.selectors.hosts_for_tokens", locked)
    comm = await open_socket("/ws/agent", headers=[(b"authorization", b"Bearer abc")])
    error = await comm.receive_json_from(timeout=3)
    assert error["data"]["code"] == "SERVICE_UNAVAILABLE", error
    assert error["data"]["message"].startswith("The database is busy")
    assert await expect_close(comm) == 4503


def test_a_connection_lost_while_the_gate_is_open_is_logged_once_per_interval(caplog, monkeypatch):
    monkeypatch.setitem(dbgate._TALLIES, "unreachable", dbgate._Tally())
    lost = wrapped(OperationalError, psycopg.OperationalError("server closed the connection"))
    with caplog.at_level(logging.WARNING, logger="sysmanage.dbgate"):
        for _ in range(3):
            dbgate.note("unreachable", lost)
        dbgate.note("unreachable", DatabaseUnavailable("refused by the gate"))
    assert [r.getMessage() for r in caplog.records] == [
        "database connection failed (server closed the connection): 1 request(s) or job(s) "
        "told to retry since the last report"
    ]
