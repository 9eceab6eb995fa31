"""WebSocket URL routes: ``/ws`` for clients and browsers, ``/ws/agent`` for the product's
agent, ``/api/agent/connect`` for the SysManage agent."""

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import WebsocketDenier
from django.urls import re_path

from hosts.consumers import AgentConsumer
from hosts.smagent.consumer import SysManageAgentConsumer
from sysmanage.auth import BrowserOriginValidator, RefuseBrowsers
from sysmanage.consumers import ClientConsumer

websocket_urlpatterns = [
    re_path(r"^ws/agent/?$", RefuseBrowsers(AgentConsumer.as_asgi())),
    re_path(r"^api/agent/connect/?$", RefuseBrowsers(SysManageAgentConsumer.as_asgi())),
    re_path(r"^ws/?$", BrowserOriginValidator(AuthMiddlewareStack(ClientConsumer.as_asgi()))),
    re_path(r"", WebsocketDenier.as_asgi()),  # any other path: handshake refused (403)
]
