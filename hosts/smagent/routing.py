"""The SysManage agent's WebSocket route, ``/api/agent/connect``.  Registered with
``sysmanage.plugins.register_websocket_routes`` from the app's ``ready()``."""

from django.urls import re_path

from hosts.smagent.consumer import SysManageAgentConsumer
from sysmanage.auth import RefuseBrowsers

websocket_urlpatterns = [
    re_path(r"^api/agent/connect/?$", RefuseBrowsers(SysManageAgentConsumer.as_asgi())),
]
