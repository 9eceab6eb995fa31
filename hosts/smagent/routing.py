"""The SysManage agent's WebSocket route, ``/api/agent/connect``.  Registered with
``sysmanage.plugins.register_websocket_routes`` from the app's ``ready()``."""

from hosts.smagent.consumer import SysManageAgentConsumer
from sysmanage.auth import RefuseBrowsers
from sysmanage.plugins import websocket_route

websocket_urlpatterns = [
    websocket_route(r"^api/agent/connect/?$", RefuseBrowsers(SysManageAgentConsumer.as_asgi())),
]
