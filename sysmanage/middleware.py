"""HTTP middleware of the server: the Content-Security-Policy header, and 503 rather than
500 when the database is unreachable or busy."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase

from sysmanage import dbgate

_R = TypeVar("_R", bound=HttpResponseBase)

#: The pages load scripts, styles and data only from this server (no CDN, no inline
#: script or style), open their socket to it, and are never framed.
POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self' {socket}; object-src 'none'; "
    "base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)


def content_security_policy(request: HttpRequest) -> str:
    """The policy for a response to ``request``: ``connect-src`` names the page's own
    WebSocket origin, which older browsers do not count as ``'self'``."""
    try:
        host = request.get_host()
    except DisallowedHost:
        return POLICY.format(socket="").replace("'self' ;", "'self';")
    return POLICY.format(socket=f"{'wss' if request.is_secure() else 'ws'}://{host}")


class ContentSecurityPolicyMiddleware:
    """Set ``Content-Security-Policy`` on every response that does not set its own.

    Both sync and async, like Django's own middleware, so that it costs no thread hop
    under ASGI.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        """Called for each request."""
        if self.is_async:
            return self.__acall__(request)
        return self._with_policy(request, self.get_response(request))

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        """The async path."""
        return self._with_policy(request, await self.get_response(request))

    @staticmethod
    def _with_policy(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if "Content-Security-Policy" not in response:
            response["Content-Security-Policy"] = content_security_policy(request)
        return response


#: What a page request is told while the database cannot serve it.
UNAVAILABLE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Service unavailable</title></head>
<body><h1>Service unavailable</h1>
<p>{why}. Please try again in a moment.</p></body></html>
"""


def reported_elsewhere(response: _R) -> _R:
    """Keep Django from logging ``response`` as an error (a line per request): the fault
    behind it is logged once per interval (:mod:`sysmanage.dbgate`).  Django's
    ``log_response`` skips responses marked as logged already."""
    response._has_been_logged = True  # type: ignore[attr-defined]
    return response


def unavailable_response(request: HttpRequest, fault: dbgate.Fault) -> HttpResponse:
    """503 with ``Retry-After``: for the REST API (``/api/``) a JSON body in its error
    format (``detail``, ``code``, ``retry_after``), for anything else a short page."""
    response: HttpResponse
    if request.path.startswith("/api/"):
        response = JsonResponse(
            {
                "detail": f"{dbgate.explain(fault)}; retry in {dbgate.RETRY_AFTER} seconds.",
                "code": "service_unavailable",
                "retry_after": dbgate.RETRY_AFTER,
            },
            status=503,
        )
    else:
        response = HttpResponse(
            UNAVAILABLE_PAGE.format(why=dbgate.explain(fault)),
            status=503,
            content_type="text/html; charset=utf-8",
        )
    response["Retry-After"] = str(dbgate.RETRY_AFTER)
    return reported_elsewhere(response)


class DatabaseUnavailableMiddleware:
    """Answer 503 with ``Retry-After`` -- not 500 with a traceback in the log -- when a
    view fails because the database is unreachable or busy (:func:`dbgate.unavailable`).

    Django calls ``process_exception`` for exceptions of views, including those the REST
    framework does not handle itself; requests that need no database are unaffected.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        """Called for each request: passed on unchanged."""
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        """Called when a view raised: a database fault becomes a 503."""
        fault = dbgate.unavailable(exception)
        if fault is None:
            return None
        dbgate.note(fault, exception)
        return unavailable_response(request, fault)
