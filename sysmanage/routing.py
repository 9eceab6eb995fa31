"""WebSocket URL routes: ``/ws`` for clients and browsers, ``/ws/agent`` for the product's
agent, and the routes apps plug in (:mod:`sysmanage.plugins`), such as the SysManage
agent's ``/api/agent/connect``."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import WebsocketDenier
from django.urls import re_path

from hosts.consumers import AgentConsumer
from sysmanage import plugins
from sysmanage.auth import ASGIApp, BrowserOriginValidator, RefuseBrowsers
from sysmanage.consumers import ClientConsumer

if TYPE_CHECKING:
    # What channels' stubs call a route: a URL pattern whose callback is an ASGI app.
    from channels.routing import URLRouter, _ExtendedURLPattern


def route(pattern: str, application: ASGIApp) -> _ExtendedURLPattern:
    """A WebSocket route (``re_path``, which Django's stubs type for views only)."""
    return cast("_ExtendedURLPattern", re_path(pattern, application))


websocket_urlpatterns: list[_ExtendedURLPattern | URLRouter] = [
    route(r"^ws/agent/?$", RefuseBrowsers(AgentConsumer.as_asgi())),
    *plugins.websocket_urlpatterns(),
    route(r"^ws/?$", BrowserOriginValidator(AuthMiddlewareStack(ClientConsumer.as_asgi()))),
    route(r"", WebsocketDenier.as_asgi()),  # any other path: handshake refused (403)
]
