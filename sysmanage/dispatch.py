"""A consumer mixin that skips Channels' per-message connection cleanup."""

from __future__ import annotations

from typing import Any

from channels.consumer import get_handler_name


class NoPerMessageCleanupMixin:
    """Dispatch ASGI messages without ``aclose_old_connections()`` on each one.

    Channels runs that cleanup in the database thread before every message, a thread hop
    per WebSocket frame.  These consumers never touch the database on the event loop: every
    query goes through ``database_sync_to_async``, which cleans up old connections around
    each call itself.  Under agent load the extra hop cost more than the work of a frame.
    """

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Called for each ASGI message: find its handler and run it."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)
