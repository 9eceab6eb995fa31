"""WebSocket URL routes: ``/ws`` for clients and browsers, ``/ws/agent`` for the product's
agent, and the routes apps plug in (:mod:`sysmanage.plugins`), such as the SysManage
agent's ``/api/agent/connect``."""

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import WebsocketDenier
from django.urls import re_path

from hosts.consumers import AgentConsumer
from sysmanage import plugins
from sysmanage.auth import BrowserOriginValidator, RefuseBrowsers
from sysmanage.consumers import ClientConsumer

websocket_urlpatterns = [
    re_path(r"^ws/agent/?$", RefuseBrowsers(AgentConsumer.as_asgi())),
    *plugins.websocket_urlpatterns(),
    re_path(r"^ws/?$", BrowserOriginValidator(AuthMiddlewareStack(ClientConsumer.as_asgi()))),
    re_path(r"", WebsocketDenier.as_asgi()),  # any other path: handshake refused (403)
]
