"""
Routes that apps plug into the site from their ``AppConfig.ready()``.

The site's URL modules (``sysmanage/urls.py``, ``sysmanage/routing.py``) name the views
of the core apps.  An optional part, such as the SysManage-agent protocol, registers the
dotted name of a module of its own instead, so that neither the core nor the app it
extends names it:

- :func:`register_urls`: the module's ``urlpatterns`` are served from the site's root,
  and each ``(prefix, viewset, basename)`` of its ``api_routes`` is registered on the
  REST API's router (``/api/<prefix>/``, listed on the API's root and in its schema);
- :func:`register_websocket_routes`: the module's ``websocket_urlpatterns`` (made with
  :func:`websocket_route`) are matched before unknown WebSocket paths are refused.

The modules are imported with the URL configuration, once every app is ready.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any, cast

from django.urls import re_path

if TYPE_CHECKING:
    # What channels' stubs call a route: a URL pattern whose callback is an ASGI app.
    from channels.routing import URLRouter, _ExtendedURLPattern

    from sysmanage.auth import ASGIApp

    #: A WebSocket route, as channels' ``URLRouter`` takes them.
    WebSocketRoute = _ExtendedURLPattern | URLRouter

#: ``(prefix, viewset, basename)`` of a REST route, as ``router.register`` takes them.
ApiRoute = tuple[str, Any, str]

_URL_MODULES: list[str] = []
_WEBSOCKET_MODULES: list[str] = []


def register_urls(module: str) -> None:
    """Serve the ``urlpatterns`` and ``api_routes`` of ``module`` (a dotted name)."""
    if module not in _URL_MODULES:
        _URL_MODULES.append(module)


def register_websocket_routes(module: str) -> None:
    """Route WebSocket paths by the ``websocket_urlpatterns`` of ``module``."""
    if module not in _WEBSOCKET_MODULES:
        _WEBSOCKET_MODULES.append(module)


def url_modules() -> tuple[str, ...]:
    """The registered URL modules, in registration order."""
    return tuple(_URL_MODULES)


def api_routes() -> list[ApiRoute]:
    """The REST routes of every registered URL module."""
    return [
        route
        for module in _URL_MODULES
        for route in getattr(import_module(module), "api_routes", ())
    ]


def websocket_route(pattern: str, application: ASGIApp) -> _ExtendedURLPattern:
    """A WebSocket route (``re_path``, which Django's stubs type for views only)."""
    return cast("_ExtendedURLPattern", re_path(pattern, application))


def websocket_urlpatterns() -> list[WebSocketRoute]:
    """The WebSocket routes of every registered module."""
    return [
        pattern
        for module in _WEBSOCKET_MODULES
        for pattern in import_module(module).websocket_urlpatterns
    ]
