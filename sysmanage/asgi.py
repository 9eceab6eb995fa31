"""
ASGI entry point: ``python -m sysmanage.serve sysmanage.asgi:application`` (Daphne with a
redacting access log) serves HTTP and WebSocket on one port.
"""

import logging
import os
import sys
from pathlib import Path
from typing import Any

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sysmanage.settings")
# Static files (the dashboards' script and styles, the admin's) come from the same
# process, so the server needs nothing in front of it; a proxy may serve STATIC_ROOT
# itself after `collectstatic`.
django_asgi_app = ASGIStaticFilesHandler(get_asgi_application())

# Imported after Django is set up: these modules use the models.
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from sysmanage.dbthreads import RequestsInDatabaseThreads  # noqa: E402
from sysmanage.logcontext import Identified  # noqa: E402
from sysmanage.node import mark_server_process  # noqa: E402
from sysmanage.routing import websocket_urlpatterns  # noqa: E402
from sysmanage.singleton import ensure_single_process_on_memory_layer  # noqa: E402

ensure_single_process_on_memory_layer()
mark_server_process()

if Path(sys.argv[0]).name == "daphne" or sys.argv[0].endswith(f"daphne{os.sep}__main__.py"):
    # Plain daphne writes each request's URL to its access log as it came, tokens in
    # query strings included; sysmanage.serve redacts them.
    logging.getLogger("sysmanage").warning(
        "Started by plain daphne, whose access log shows ?token= values: start the "
        "server with `python -m sysmanage.serve` (same options) instead"
    )

# The busy endpoints that write (the token refresh) are handled wholly in the database
# threads (sysmanage/dbthreads.py); every other request as Django handles it.
in_database_threads = RequestsInDatabaseThreads()


async def http(scope: Any, receive: Any, send: Any) -> None:
    """Called per HTTP request: hand it to the handler for its path."""
    handler = in_database_threads if in_database_threads.handles(scope) else django_asgi_app
    await handler(scope, receive, send)


# Every request and connection gets an id its log lines carry (sysmanage.logcontext).
application = Identified(
    ProtocolTypeRouter(
        {
            "http": http,
            "websocket": URLRouter(websocket_urlpatterns),
        }
    )
)
