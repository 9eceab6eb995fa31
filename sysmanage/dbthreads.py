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
- SQLite allows one writer at a time: ``DB_THREADS`` is 1 on SQLite whatever is asked,
  and busy HTTP endpoints that write (the token refresh) run in the same thread
  (:func:`in_database_threads`), so that a storm of them never waits out SQLite's lock
  timeout ("database is locked").

Django's async ORM is no alternative: in Django 5.2 each of its queries is a
``sync_to_async`` hop to the same single thread (docs/architecture.md, "Database
threads", has the figures).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import markcoroutinefunction, sync_to_async
from channels.db import DatabaseSyncToAsync
from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest
from django.http.response import HttpResponseBase

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


def executor() -> ThreadPoolExecutor:
    """The process's database threads (made on first use)."""
    global _EXECUTOR
    with _LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(
                max_workers=thread_count(), thread_name_prefix="database"
            )
        return _EXECUTOR


def queued() -> int:
    """Database calls waiting for a free thread (``/metrics``)."""
    pool = _EXECUTOR
    return pool._work_queue.qsize() if pool is not None else 0


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
    alive: Callable[[], bool], func: Callable[_P, _R]
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """``func`` as :func:`database_sync_to_async` makes it, for a socket: when its turn
    in the database threads comes and ``alive()`` says the socket's peer has gone, it is
    not run, and the call raises :class:`PeerGone`.

    In a reconnect storm the calls of sockets whose peer gave up waiting queue among
    the others; run, they would only delay the calls of the peers still waiting.
    """

    @functools.wraps(func)
    def unless_gone(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not alive():
            global _SKIPPED
            with _LOCK:
                _SKIPPED += 1
            raise PeerGone
        return func(*args, **kwargs)

    return database_sync_to_async(unless_gone)


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
    return run
