"""WebSocket URL routes: ``/ws`` for clients and browsers, ``/ws/agent`` for the product's
agent, and the routes apps plug in (:mod:`sysmanage.plugins`), such as the SysManage
agent's ``/api/agent/connect``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from channels.security.websocket import WebsocketDenier

from hosts.consumers import AgentConsumer
from sysmanage import plugins
from sysmanage.auth import ClientSocketScope, RefuseBrowsers
from sysmanage.consumers import ClientConsumer
from sysmanage.plugins import websocket_route as route

if TYPE_CHECKING:
    from sysmanage.plugins import WebSocketRoute


websocket_urlpatterns: list[WebSocketRoute] = [
    route(r"^ws/agent/?$", RefuseBrowsers(AgentConsumer.as_asgi())),
    *plugins.websocket_urlpatterns(),
    route(r"^ws/?$", ClientSocketScope(ClientConsumer.as_asgi())),
    route(r"", WebsocketDenier.as_asgi()),  # any other path: handshake refused (403)
]
