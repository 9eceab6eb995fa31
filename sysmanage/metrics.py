"""
What a server process exposes on ``GET /metrics`` (Prometheus text format).

Each server process serves its own figures: scrape every process on its own address
(``deploy/`` gives each its port), as Prometheus does for any multi-process service; the
dashboard sums over ``instance``.  prometheus-client's multiprocess mode is for forking
servers sharing one port and keeps its figures in files, which buys nothing here.

Most figures are read when scraped, from what the process holds anyway (the hub's
sockets and subscriptions, the node's inbox, the database pool), so serving them costs
the sockets and events nothing.  What has to be counted as it happens is counted in
plain integers on the event loop (:func:`published`, :func:`socket_closed`,
:func:`agent_message`) -- no lock, no label lookup in a registry -- and turned into
metrics at scrape time; only HTTP request durations and command round trips, observed
in request threads, use prometheus-client's thread-safe histograms.

Every name starts with ``sysmanage_``; docs/operations.md lists them.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sysmanage import dbgate, dbthreads

# The ``_created`` series double every counter and histogram for nothing a dashboard uses.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client
REGISTRY = CollectorRegistry()
ProcessCollector(namespace="sysmanage", registry=REGISTRY)

#: channel -> events this process published
_published: Counter[str] = Counter()
#: (kind, close code) -> sockets closed
_closed: Counter[tuple[str, str]] = Counter()
#: (kind, reason) -> frames received and not processed
_refused: Counter[tuple[str, str]] = Counter()
#: (kind, message type) -> messages received from agents
_agent_messages: Counter[tuple[str, str]] = Counter()

HTTP_DURATION = Histogram(
    "sysmanage_http_request_duration_seconds",
    "Time to answer an HTTP request, by view (URL name) and method.",
    ["view", "method"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ROUND_TRIP = Histogram(
    "sysmanage_operation_round_trip_seconds",
    "From a command or package operation's creation to its result, by kind and outcome.",
    ["kind", "status"],
    registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)

LAYER_LAG = Histogram(
    "sysmanage_layer_receive_lag_seconds",
    "From an event's publication (by any process) to this process reading it from the "
    "channel layer: once per read, the oldest event of the read.",
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def received(lag: float) -> None:
    """Observe how long the oldest event of one read from the layer waited for it."""
    LAYER_LAG.observe(max(0.0, lag))


def published(channel: str) -> None:
    """Count one event this process published on ``channel``."""
    _published[channel] += 1


def frame_refused(kind: str, reason: str) -> None:
    """Count one frame from a socket of ``kind`` not processed (``rate``, ``too_large``)."""
    _refused[kind, reason] += 1


def socket_closed(kind: str, code: int | None) -> None:
    """Count one socket of ``kind`` closed with ``code``."""
    _closed[kind, str(code if code is not None else 1005)] += 1


#: Distinct message types counted; an agent names its own types, so past this many a
#: new one is counted as ``other`` (a series per invented name would grow without end).
MAX_MESSAGE_TYPES = 100


def agent_message(kind: str, message_type: str) -> None:
    """Count one message received from an agent of ``kind``."""
    key = (kind, message_type)
    if key not in _agent_messages and len(_agent_messages) >= MAX_MESSAGE_TYPES:
        key = (kind, "other")
    _agent_messages[key] += 1


def round_trip(kind: str, status: str, seconds: float) -> None:
    """Observe a command's or package operation's time from creation to result."""
    ROUND_TRIP.labels(kind, status).observe(max(0.0, seconds))


def _counter(name: str, doc: str, labels: list[str], values: Counter[Any]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family


#: Returns the process's node, or None before one started (set by ``sysmanage.node``,
#: which this module must not import: the node counts through it).
_node_source: Callable[[], Any] = lambda: None  # noqa: E731
#: (name, help, label, read) of the figures the apps read from the database
_figures: list[tuple[str, str, str, Callable[[], Mapping[str, int]]]] = []


def set_node_source(source: Callable[[], Any]) -> None:
    """Tell the collector how to find the process's node."""
    global _node_source
    _node_source = source


def register_figures(
    name: str, doc: str, label: str, read: Callable[[], Mapping[str, int]]
) -> None:
    """Serve ``name{label=...}`` gauges with what ``read`` returns (database reads; an app
    registers them when ready, as it registers snapshots)."""
    if not name.startswith("sysmanage_"):
        raise ValueError(f"metric names start with sysmanage_, not {name!r}")
    _figures.append((name, doc, label, read))


class LiveCollector(Collector):
    """The figures read from the process's node and hub when scraped."""

    def collect(self) -> Iterator[Metric]:
        """Called once per scrape."""
        yield _counter(
            "sysmanage_events_published",
            "Events this process published, by channel.",
            ["channel"],
            _published,
        )
        yield _counter(
            "sysmanage_sockets_closed",
            "WebSocket connections closed, by kind and close code (4008 slow consumer, "
            "4001 authentication, 4029 rate, 4013 too big, 4503 unavailable, ...).",
            ["kind", "code"],
            _closed,
        )
        yield _counter(
            "sysmanage_frames_refused",
            "Frames received and not processed, by socket kind and reason (rate, too_large).",
            ["kind", "reason"],
            _refused,
        )
        yield _counter(
            "sysmanage_agent_messages",
            "Messages received from agents, by agent kind and message type.",
            ["kind", "type"],
            _agent_messages,
        )
        node = _node_source()
        sockets = GaugeMetricFamily(
            "sysmanage_sockets_open",
            "Open, authenticated WebSocket connections, by kind and authentication method.",
            labels=["kind", "auth"],
        )
        subscriptions = GaugeMetricFamily(
            "sysmanage_subscriptions", "Subscriptions, by channel.", labels=["channel"]
        )
        delivered = CounterMetricFamily(
            "sysmanage_events_dispatched", "Events this process fanned out to its sockets."
        )
        deliveries = CounterMetricFamily(
            "sysmanage_event_deliveries",
            "Event frames handed to sockets (one per subscriber), by channel.",
            labels=["channel"],
        )
        db_queued = GaugeMetricFamily(
            "sysmanage_db_calls_queued", "Database calls waiting for one of the database threads."
        )
        db_queued.add_metric([], dbthreads.queued())
        database_up = GaugeMetricFamily(
            "sysmanage_database_up",
            "1 while this process takes its database to be reachable; 0 from the first failed "
            "connection until one succeeds again.",
        )
        database_up.add_metric([], 0 if dbgate.gate().outage() is not None else 1)
        db_skipped = CounterMetricFamily(
            "sysmanage_db_calls_skipped",
            "Database calls of sockets not made because the socket had closed by their turn.",
        )
        db_skipped.add_metric([], dbthreads.skipped())
        inbox = GaugeMetricFamily(
            "sysmanage_hub_inbox_depth", "Messages from the channel layer waiting for the hub."
        )
        layer_up = GaugeMetricFamily(
            "sysmanage_channel_layer_up", "1 while the channel layer (Redis) answers, else 0."
        )
        failures = CounterMetricFamily(
            "sysmanage_publish_failures", "Events dropped because the channel layer failed."
        )
        if node is not None:
            hub = node.hub
            kinds: Counter[tuple[str, str]] = Counter()
            for conn in hub.connections():
                kinds["client", str(getattr(conn, "auth_via", None) or "unknown")] += 1
            for agent in hub.agents.values():
                kinds[str(getattr(agent, "metric_kind", "agent")), "token"] += 1
            for (kind, auth), count in sorted(kinds.items()):
                sockets.add_metric([kind, auth], count)
            for channel, subscribers in sorted(hub.subscriptions.items()):
                subscriptions.add_metric([channel], len(subscribers))
            delivered.add_metric([], hub.stats.get("events", 0))
            for channel, count in sorted(hub.deliveries.items()):
                deliveries.add_metric([channel], count)
            inbox.add_metric([], node.inbox_depth())
            layer_up.add_metric([], 0 if node.layer_down_since is not None else 1)
            failures.add_metric([], node.publish_failures)
        yield from (sockets, subscriptions, delivered, deliveries, inbox, layer_up, failures)
        yield from (db_queued, db_skipped, database_up)


class DatabaseCollector(Collector):
    """Fleet figures and the database pool, read at most once per ``ttl`` seconds (a
    scrape every few seconds from several Prometheus servers costs a few queries)."""

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self._read_at = -ttl
        self._cached: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        """Called once per scrape, in the request's thread.  While the database cannot
        answer, its figures are left out (not the last ones read, which would look
        current) and the rest of the scrape is served: ``sysmanage_database_up`` says why."""
        if time.monotonic() - self._read_at >= self.ttl:
            try:
                self._cached = list(self._read())
                self._read_at = time.monotonic()
            except DatabaseError as exc:
                fault = dbgate.unavailable(exc)
                if fault is None:
                    raise
                dbgate.note(fault, exc)  # and read again at the next scrape
                self._cached = []
        yield from self._cached
        yield from _pool_metrics()

    def _read(self) -> Iterable[Metric]:
        for name, doc, label, read in _figures:
            family = GaugeMetricFamily(name, doc, labels=[label])
            for value, count in sorted(read().items()):
                family.add_metric([value], count)
            yield family


def _pool_metrics() -> Iterator[Metric]:
    """The PostgreSQL connection pool of this process, when there is one."""
    from django.db import connection

    pool = getattr(connection, "pool", None) if connection.vendor == "postgresql" else None
    if pool is None:
        return
    stats = pool.get_stats()
    size = GaugeMetricFamily("sysmanage_db_pool_connections", "Connections in the pool.")
    size.add_metric([], stats.get("pool_size", 0))
    idle = GaugeMetricFamily("sysmanage_db_pool_idle", "Pooled connections not in use.")
    idle.add_metric([], stats.get("pool_available", 0))
    waiting = GaugeMetricFamily(
        "sysmanage_db_pool_waiting", "Requests waiting for a pooled connection."
    )
    waiting.add_metric([], stats.get("requests_waiting", 0))
    yield from (size, idle, waiting)


REGISTRY.register(LiveCollector())
REGISTRY.register(DatabaseCollector())


def _allowed(request: HttpRequest) -> bool:
    """With ``METRICS_TOKEN`` set: that bearer token only; otherwise loopback only."""
    token = settings.METRICS_TOKEN
    if token:
        sent = request.headers.get("Authorization", "")
        return hmac.compare_digest(sent.encode(), f"Bearer {token}".encode())
    try:
        return ipaddress.ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        return False


def metrics_view(request: HttpRequest) -> HttpResponse:
    """``GET /metrics``."""
    if not _allowed(request):
        return HttpResponse("metrics are not served to this client\n", status=403)
    return HttpResponse(
        generate_latest(REGISTRY), content_type="text/plain; version=0.0.4; charset=utf-8"
    )


class RequestDurationMiddleware:
    """Observe each HTTP request's duration under its view's URL name.  Both sync and
    async, like Django's own middleware, so that it costs no thread hop under ASGI."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        """Called for each request."""
        if self.is_async:
            return self.__acall__(request)
        # a request handled in a database thread arrived before it got one
        started = getattr(request, "arrived_at", None) or time.perf_counter()
        response = self.get_response(request)
        _observe(request, started)
        return response

    async def __acall__(self, request: HttpRequest) -> Any:
        """The async path."""
        started = time.perf_counter()
        response = await self.get_response(request)
        _observe(request, started)
        return response


def _observe(request: HttpRequest, started: float) -> None:
    match = getattr(request, "resolver_match", None)
    view = (match.url_name or match.view_name) if match is not None else "unmatched"
    HTTP_DURATION.labels(view or "unnamed", request.method or "").observe(
        time.perf_counter() - started
    )
