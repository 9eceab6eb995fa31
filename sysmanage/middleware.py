"""HTTP middleware of the server: the Content-Security-Policy header."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest
from django.http.response import HttpResponseBase

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
