"""WebSocket URL routes."""
from django.urls import re_path

from sysmanage.consumers import ClientConsumer

websocket_urlpatterns = [
    re_path(r"^ws/?$", ClientConsumer.as_asgi()),
]
