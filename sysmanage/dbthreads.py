"""
The database threads of a server process: where every blocking database call of the
event loop runs.

Channels' ``database_sync_to_async`` runs every call of a process in one thread
(asgiref's thread-sensitive executor), so one connect storm -- ten thousand agents
authenticating, two thousand browsers refreshing their token -- queued behind one
connection while PostgreSQL sat mostly idle.  Here each process has a pool of
``DB_THREADS`` threads (:func:`executor`), each with its own Django connection (Django's
connections are per thread), and :func:`database_sync_to_async` runs a call in any free
one of them.

What keeps that correct:

- a call is one synchronous function: its transactions begin and end in it, in one
  thread, on one connection, so no transaction spans threads;
- as with channels, connections that are broken or past ``CONN_MAX_AGE`` are closed
  before and after each call (a pooled PostgreSQL connection goes back to the pool);
- the calls of one connection (a socket's handler) are awaited in turn, so they keep
  their order; calls of different sockets never relied on an order (writes that could
  race, such as an agent's going away and its reconnection, are guarded in the data);
- calls queue in order, except that a socket's call that completes what its peer waits
  for may go ahead of the rest (:class:`CallQueue`), and a socket's call is not made if
  its peer has gone by its turn (:func:`database_sync_to_async_while`);
- SQLite allows one writer at a time: ``DB_THREADS`` is 1 on SQLite whatever is asked,
  and busy HTTP endpoints that write (the token refresh) run in the same thread
  (:func:`in_database_threads`), so that a storm of them never waits out SQLite's lock
  timeout ("database is locked").

Django's async ORM is no alternative: in Django 5.2 each of its queries is a
``sync_to_async`` hop to the same single thread (docs/architecture.md, "Database
threads", has the figures).
"""

from __future__ import annotations

import collections
import contextvars
import functools
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import markcoroutinefunction, sync_to_async
from asgiref.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from channels.db import DatabaseSyncToAsync
from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, ASGIRequest, get_script_prefix
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.urls import ResolverMatch, get_resolver, set_script_prefix

_P = ParamSpec("_P")
_R = TypeVar("_R")

_EXECUTOR: ThreadPoolExecutor | None = None
_LOCK = threading.Lock()
#: calls of sockets not made because their peer had gone (``/metrics``)
_SKIPPED = 0


def thread_count() -> int:
    """How many database threads a process runs: ``DB_THREADS``, and 1 on SQLite."""
    if settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"):
        return 1
    return max(1, int(getattr(settings, "DB_THREADS", 4)))


#: whether the database calls submitted in this context go ahead of the others
#: (:func:`database_sync_to_async_while`, ``ahead``)
_AHEAD: contextvars.ContextVar[bool] = contextvars.ContextVar("database_call_ahead", default=False)


class CallQueue:
    """The database threads' queue of calls (what ``ThreadPoolExecutor`` uses a
    ``SimpleQueue`` for): in order, except that calls submitted ahead go first.

    In a reconnect storm every socket's first call (its authentication) queues at once;
    a call that completes what a socket started (an agent's hello, after which it is
    online) waiting behind all of them would keep every peer waiting until they gave up.
    """

    def __init__(self) -> None:
        self._ready = threading.Condition(threading.Lock())
        self._ahead: collections.deque[Any] = collections.deque()
        self._rest: collections.deque[Any] = collections.deque()

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Queue ``item`` (ahead of the rest if submitted so)."""
        with self._ready:
            (self._ahead if _AHEAD.get() else self._rest).append(item)
            self._ready.notify()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The next item, waiting for one if ``block``."""
        with self._ready:
            while not (self._ahead or self._rest):
                if not block:
                    raise queue.Empty
                self._ready.wait()
            return (self._ahead or self._rest).popleft()

    def get_nowait(self) -> Any:
        """The next item, or :class:`queue.Empty`."""
        return self.get(block=False)

    def qsize(self) -> int:
        """How many items wait."""
        return len(self._ahead) + len(self._rest)


def executor() -> ThreadPoolExecutor:
    """The process's database threads (made on first use)."""
    global _EXECUTOR
    with _LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(
                max_workers=thread_count(), thread_name_prefix="database"
            )
            _EXECUTOR._work_queue = CallQueue()  # type: ignore[assignment]  # as used
        return _EXECUTOR


def queued() -> int:
    """Database calls waiting for a free thread (``/metrics``)."""
    pool = _EXECUTOR
    return pool._work_queue.qsize() if pool is not None else 0


def note_skipped(count: int = 1) -> None:
    """Count calls of sockets not made because their peer had gone (any thread)."""
    global _SKIPPED
    with _LOCK:
        _SKIPPED += count


def skipped() -> int:
    """Calls of sockets not made because their peer had gone by their turn (``/metrics``)."""
    return _SKIPPED


def database_sync_to_async(func: Callable[_P, _R]) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """``func`` as a coroutine function that runs it in one of the database threads
    (channels' ``database_sync_to_async``, with a pool instead of one thread)."""
    return DatabaseSyncToAsync(func, thread_sensitive=False, executor=executor())


class PeerGone(Exception):
    """A socket's database call that was not made: its peer had gone by its turn."""


def database_sync_to_async_while(
    alive: Callable[[], bool], func: Callable[_P, _R], *, ahead: bool = False
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """``func`` as :func:`database_sync_to_async` makes it, for a socket: when its turn
    in the database threads comes and ``alive()`` says the socket's peer has gone, it is
    not run, and the call raises :class:`PeerGone`.  With ``ahead``, its calls go ahead
    of the calls queued without (:class:`CallQueue`).

    In a reconnect storm the calls of sockets whose peer gave up waiting queue among
    the others; run, they would only delay the calls of the peers still waiting.
    """

    @functools.wraps(func)
    def unless_gone(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not alive():
            note_skipped()
            raise PeerGone
        return func(*args, **kwargs)

    call = database_sync_to_async(unless_gone)
    if not ahead:
        return call

    @functools.wraps(func)
    async def call_ahead(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        token = _AHEAD.set(True)  # read as the call is queued, before the first wait
        try:
            return await call(*args, **kwargs)
        finally:
            _AHEAD.reset(token)

    return call_ahead


def in_database_threads(
    view: Callable[..., HttpResponseBase],
) -> Callable[..., Coroutine[Any, Any, HttpResponseBase]]:
    """A synchronous Django view made to run in the database threads.

    Django runs each synchronous view of an ASGI request in a new thread, each with its
    own connection: two thousand clients refreshing their token at once made two
    thousand threads that fought over ten pooled PostgreSQL connections (waits past
    ``DB_POOL_TIMEOUT``, 503) or SQLite's one write lock ("database is locked").  In the
    database threads they queue, in order, and each finds a connection free.
    """

    @functools.wraps(view)  # what the middleware read of the view (csrf_exempt)
    def respond(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        response = view(request, *args, **kwargs)
        render = getattr(response, "render", None)
        if callable(render):
            render()  # here rather than in yet another thread (Django skips it then)
        return response

    @functools.wraps(view)
    async def run(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not isinstance(request, ASGIRequest):
            # Called from synchronous code (Django's test client): run in its thread,
            # on its connection, as Django would run the view itself.
            return await sync_to_async(respond, thread_sensitive=True)(request, *args, **kwargs)
        return await database_sync_to_async(respond)(request, *args, **kwargs)

    markcoroutinefunction(run)
    run.in_thread = respond  # type: ignore[attr-defined]  # what RequestsInDatabaseThreads calls
    return run


def _in_thread(view: Any) -> Callable[..., HttpResponseBase] | None:
    """The synchronous view behind a view made by :func:`in_database_threads`."""
    return getattr(view, "in_thread", None)


@functools.cache
def _paths() -> frozenset[str]:
    """The paths of the views made by :func:`in_database_threads` (routes of the root
    URLconf's first level)."""
    return frozenset(
        f"/{pattern.pattern}"
        for pattern in get_resolver().url_patterns
        if _in_thread(getattr(pattern, "callback", None)) is not None
    )


class RequestsInDatabaseThreads(ASGIHandler):
    """Django's ASGI handler for the views made by :func:`in_database_threads`: each
    request -- the request signals, the middleware, the view and the closing of its
    response -- is handled in one call in a database thread.

    Django's own handler gives every request a thread of its own (asgiref's
    ``ThreadSensitiveContext``), started and joined per request, and hops to it for the
    signals, each synchronous middleware and the closing: in a storm of two thousand
    token refreshes that took about a tenth of the process's CPU (docs/benchmarks.md,
    "Database threads and storms").  The middleware are those of ``MIDDLEWARE``, run
    synchronously; only plain (not streaming) responses are expected.
    """

    def __init__(self) -> None:
        super().__init__()
        self.load_middleware(is_async=False)

    @staticmethod
    def handles(scope: Scope) -> bool:
        """Whether ``scope`` is an HTTP request for a view made by :func:`in_database_threads`."""
        return scope["type"] == "http" and scope["path"] in _paths()

    async def __call__(  # type: ignore[override]
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Read the body here, handle the request in a database thread, send the answer."""
        arrived = time.perf_counter()
        try:
            body = await self.read_body(receive)
        except RequestAborted:
            return
        response = await database_sync_to_async(self._respond)(scope, body, arrived)
        await self.send_response(response, send)  # type: ignore[arg-type]

    def _respond(self, scope: Any, body: Any, arrived: float) -> HttpResponseBase:
        """The request, answered as Django's synchronous handler answers it."""
        set_script_prefix(get_script_prefix(scope))
        signals.request_started.send(sender=self.__class__, scope=scope)
        try:
            request, error = self.create_request(scope, body)
            if request is not None:
                # its duration counts its wait for a database thread (sysmanage.metrics)
                request.arrived_at = arrived  # type: ignore[attr-defined]
            response = error if request is None else self.get_response(request)
            assert response is not None
        finally:
            body.close()
        response.close()  # the request_finished signal; the content stays
        return response

    def resolve_request(self, request: HttpRequest) -> ResolverMatch:
        """The view's match, calling the synchronous view behind it."""
        match = super().resolve_request(request)
        sync = _in_thread(match.func)
        if sync is not None:
            match.func = sync
        return match
