"""The server's PostgreSQL backend (``sysmanage.postgres``) in this process, against the
test PostgreSQL behind a relay the test cuts: connecting fails at once while the
database is away, the pool is replaced, and connections work again when it is back."""

from __future__ import annotations

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
