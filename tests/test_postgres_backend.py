"""The server's PostgreSQL backend (``sysmanage.postgres``) in this process, against the
test PostgreSQL behind a relay the test cuts: connecting fails at once while the
database is away, the pool is replaced, and connections work again when it is back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.db import OperationalError
from django.db.utils import ConnectionHandler

from sysmanage import dbgate
from sysmanage.dbgate import DatabaseUnavailable
from sysmanage.postgres.base import DatabaseWrapper
from tests.integration import harness
from tests.integration.conftest import POSTGRES_ADMIN_URL
from tests.integration.relay import CuttableRelay

pytestmark = pytest.mark.postgres_redis


@pytest.fixture
def relay() -> Iterator[CuttableRelay]:
    if not POSTGRES_ADMIN_URL or harness.postgres_reachable(POSTGRES_ADMIN_URL):
        pytest.skip("the test PostgreSQL is not reachable")
    relay = CuttableRelay(urlsplit(POSTGRES_ADMIN_URL).port or 5432)
    relay.start()
    yield relay
    relay.close()


@pytest.fixture(autouse=True)
def fast_probing(monkeypatch):
    monkeypatch.setattr(dbgate, "PROBE_INTERVAL", 0.05)


def connection(relay: CuttableRelay, **settings: Any) -> Any:
    """A connection of the server's backend to the test database, through ``relay``,
    under an alias (and so a gate) of its own."""
    url = urlsplit(POSTGRES_ADMIN_URL)
    database = {
        "ENGINE": "sysmanage.postgres",
        "NAME": url.path.lstrip("/"),
        "USER": url.username or "postgres",
        "HOST": "127.0.0.1",
        "PORT": relay.port,
        "CONN_HEALTH_CHECKS": True,
        **settings,
    }
    # Django fills in the settings it defaults; the alias (and gate) is the test's own.
    filled = ConnectionHandler({"default": database}).settings["default"]
    return DatabaseWrapper(filled, alias=f"relayed-{uuid.uuid4().hex[:8]}")


def select_one(conn: Any) -> int:
    with conn.cursor() as cursor:
        cursor.execute("SELECT 1")
        return cursor.fetchone()[0]


def wait_until(condition, timeout: float = 5.0) -> float:
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout, "not in time"
        time.sleep(0.02)
    return time.monotonic() - began


POOLED = {
    "CONN_MAX_AGE": 0,
    "OPTIONS": {"connect_timeout": 2, "pool": {"min_size": 1, "max_size": 2, "timeout": 0.25}},
}
UNPOOLED = {"CONN_MAX_AGE": 60, "OPTIONS": {"connect_timeout": 2}}


@pytest.mark.parametrize("database", [POOLED, UNPOOLED], ids=["pooled", "unpooled"])
@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
def test_connecting_fails_at_once_while_the_database_is_away(
    relay, database, mode, django_db_blocker
):
    conn = connection(relay, **database)
    with django_db_blocker.unblock():
        outage_and_recovery(conn, relay, mode)


def outage_and_recovery(conn: Any, relay: CuttableRelay, mode: str) -> None:
    try:
        assert select_one(conn) == 1
        pool = conn.pool
        conn.close()
        relay.cut(mode)
        began = time.monotonic()
        with pytest.raises(OperationalError):
            select_one(conn)
        assert time.monotonic() - began < 3.0
        assert conn.gate.outage() is not None
        conn.close()
        began = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            select_one(conn)  # without trying
        assert time.monotonic() - began < 0.1
        if pool is not None:  # the stale pool is thrown away
            wait_until(lambda: DatabaseWrapper._connection_pools.get(conn.alias) is not pool)
        relay.restore()
        back = wait_until(lambda: conn.gate.outage() is None)
        assert back < 2.0, back
        conn.close()
        assert select_one(conn) == 1
    finally:
        conn.close()
        if conn.pool:
            conn.close_pool()


def settings_of(**env: str) -> dict[str, Any]:
    """The ``default`` database the server's settings make of ``env``."""
    code = (
        "import json, django; django.setup(); from django.conf import settings; "
        "print(json.dumps(settings.DATABASES['default']['OPTIONS'], default=str))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "DATABASE_"))}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, "DJANGO_SETTINGS_MODULE": "sysmanage.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return dict(json.loads(result.stdout.splitlines()[-1]))


def test_a_dead_database_host_is_noticed_within_the_tcp_timeout(relay, django_db_blocker):
    """The server's PostgreSQL connections time out on a host that stopped answering
    (keep-alives and TCP_USER_TIMEOUT, DB_TCP_TIMEOUT): libpq takes the options, and a
    connection made with them has them."""
    url = POSTGRES_ADMIN_URL
    options = settings_of(DATABASE_URL=url, DB_TCP_TIMEOUT="12")
    assert options["tcp_user_timeout"] == 12000, options
    assert options["keepalives"] == 1, options
    assert options["keepalives_idle"] + 3 * options["keepalives_interval"] <= 12, options
    assert settings_of(DATABASE_URL=url)["tcp_user_timeout"] == 10000
    conn = connection(
        relay, CONN_MAX_AGE=0, OPTIONS={k: v for k, v in options.items() if k != "pool"}
    )
    with django_db_blocker.unblock():
        try:
            assert select_one(conn) == 1
            parameters = conn.connection.info.get_parameters()
            assert parameters["tcp_user_timeout"] == "12000", parameters
            assert parameters["keepalives"] == "1", parameters
        finally:
            conn.close()


def test_a_query_in_flight_when_the_relay_is_cut_fails_at_once(relay):
    """The relay itself: a query waiting for its answer at the cut ends at once (closing a
    socket another thread is reading from did not tell the peer, and such a query waited
    forever, silencing a server thread in the outage tests)."""
    import psycopg

    url = urlsplit(POSTGRES_ADMIN_URL)
    conn = psycopg.connect(
        host="127.0.0.1",
        port=relay.port,
        dbname=url.path.lstrip("/"),
        user=url.username or "postgres",
        connect_timeout=2,
    )
    outcome: list[BaseException | None] = []

    def query() -> None:
        try:
            conn.execute("SELECT pg_sleep(1)")
            outcome.append(None)
        except psycopg.Error as exc:
            outcome.append(exc)

    worker = threading.Thread(target=query, daemon=True)
    worker.start()
    time.sleep(0.3)
    cut_at = time.monotonic()
    relay.cut("refuse")
    worker.join(5)
    # (a connection still waiting is left to the daemon thread: closing it would wait too)
    assert not worker.is_alive(), "the query still waits for an answer after the cut"
    conn.close()
    assert time.monotonic() - cut_at < 2.0
    assert isinstance(outcome[0], psycopg.OperationalError), outcome
