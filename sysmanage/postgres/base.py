"""
Django's PostgreSQL backend, made to ride through outages of the database.

* Every new connection passes the :class:`~sysmanage.dbgate.DatabaseGate` of its
  database first: while the database is known to be unreachable, asking for a
  connection fails at once (:class:`~sysmanage.dbgate.DatabaseUnavailable`).
* A failed connection attempt -- made for a request, or by the pool in the background
  (the pool's connections are of a class that reports) -- closes the gate.
* A pooled connection is waited for in short steps, up to ``DB_POOL_TIMEOUT`` in all,
  so that a request waiting for one notices within a step that the gate closed.
* The gate's watcher probes with connections of its own and discards the pool when the
  database becomes unreachable; a fresh pool is made on the first request after it is
  back, rather than waiting out the old pool's reconnection back-off.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import psycopg
from django.conf import settings
from django.db.backends.postgresql import base
from django.db.utils import DEFAULT_DB_ALIAS
from psycopg_pool import PoolTimeout

from sysmanage.dbgate import gate


@functools.cache
def _reporting_connection_class(alias: str) -> type[psycopg.Connection[Any]]:
    """The connection class of database ``alias``'s pool: its failed connection
    attempts close the gate."""
    reports_to = gate(alias)

    class ReportingConnection(psycopg.Connection[Any]):
        @classmethod
        def connect(cls, *args: Any, **kwargs: Any) -> ReportingConnection:
            started = time.monotonic()
            try:
                return super().connect(*args, **kwargs)
            except psycopg.OperationalError as exc:
                reports_to.connect_failed(exc, started=started)
                raise

    return ReportingConnection


class DatabaseWrapper(base.DatabaseWrapper):
    """Django's PostgreSQL connection, behind the gate of its database."""

    def __init__(self, settings_dict: dict[str, Any], alias: str = DEFAULT_DB_ALIAS) -> None:
        self.gate = gate(alias)
        options = settings_dict.get("OPTIONS", {})
        pool = options.get("pool")
        if pool:
            # The settings are shared by every thread's wrapper: add to a copy.
            pool_options = {
                **(pool if isinstance(pool, dict) else {}),
                "connection_class": _reporting_connection_class(alias),
            }
            settings_dict = {**settings_dict, "OPTIONS": {**options, "pool": pool_options}}
        super().__init__(settings_dict, alias)
        if self.gate.probe is None:
            self.gate.probe = self._probe
            self.gate.reset = self._discard_pool

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        """A connection: refused at once while the database is unreachable; otherwise
        a new one, or one of the pool waited for in steps up to ``DB_POOL_TIMEOUT``."""
        self.gate.refuse_if_down()
        if not self.pool:
            started = time.monotonic()
            try:
                return super().get_new_connection(conn_params)
            except psycopg.OperationalError as exc:
                self.gate.connect_failed(exc, started=started)
                raise
        deadline = time.monotonic() + settings.DB_POOL_TIMEOUT
        while True:
            try:
                return super().get_new_connection(conn_params)
            except PoolTimeout:
                self.gate.refuse_if_down()
                if time.monotonic() >= deadline:
                    raise

    def _probe(self) -> None:
        """Connect without the pool and run a query (raises if the database is away)."""
        params = {**self.get_connection_params(), "autocommit": True}
        with self.Database.connect(**params) as probe:
            probe.execute("SELECT 1")

    def _discard_pool(self) -> None:
        """Close and forget the pool: the requests waiting for it fail at once, and the
        next request after the database is back makes a new one."""
        pools: dict[str, Any] = base.DatabaseWrapper._connection_pools  # type: ignore[attr-defined]
        pool = pools.pop(self.alias, None)
        if pool is not None:
            pool.close(timeout=0.2)
