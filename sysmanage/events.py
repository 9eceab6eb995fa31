"""
Events: the one place that hands messages to the channel layer.

Services describe what happened with a typed :class:`Event` and call :func:`publish`,
which sends it after the surrounding transaction commits.  Every server process runs
one :class:`~sysmanage.hub.Hub` that has joined :data:`EVENTS_GROUP`; the hub fans each
event out to the local WebSocket connections whose subscriptions match.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any, ClassVar

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from sysmanage.protocol import utc_now_iso

logger = logging.getLogger(__name__)

#: The layer group every hub joins; events and control messages travel on it.
EVENTS_GROUP = "sysmanage.events"

_REGISTRY: dict[str, type[Event]] = {}
Listener = Callable[[dict[str, Any]], None]
_LISTENERS: dict[str, list[Listener]] = defaultdict(list)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Event:
    """Base of every event: a channel, a unique name, and payload fields.

    Payload fields carry ids and display values, never model instances.
    """

    channel: ClassVar[str]
    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            return
        if name in _REGISTRY:
            raise ValueError(f"event name {name!r} is registered twice")
        _REGISTRY[name] = cls

    def data(self) -> dict[str, Any]:
        """The event's payload, as sent in the envelope's ``data``."""
        return dataclasses.asdict(self)

    def to_message(self) -> dict[str, Any]:
        """The layer message that carries this event to every hub."""
        return {
            "type": "hub.event",
            "event": self.name,
            "channel": self.channel,
            "data": self.data(),
            "timestamp": utc_now_iso(),
        }


def event_types() -> dict[str, type[Event]]:
    """Every registered event type by name (a copy)."""
    return dict(_REGISTRY)


def listen(event_name: str, listener: Listener) -> None:
    """Call ``listener(data)`` in the publishing process whenever ``event_name`` is published.

    Higher apps react to lower apps' events this way (alerts to metrics, for instance).
    A listener runs where the event was published: after commit in a worker thread, or
    on the event loop for :func:`publish_now`, where it must not block.
    """
    if event_name not in _REGISTRY:
        raise ValueError(f"unknown event {event_name!r}")
    if listener not in _LISTENERS[event_name]:
        _LISTENERS[event_name].append(listener)


def _notify(message: dict[str, Any]) -> None:
    for listener in _LISTENERS.get(message.get("event", ""), ()):
        try:
            listener(message["data"])
        except Exception:
            logger.exception("listener of %s failed", message.get("event"))


def _deliver(message: dict[str, Any]) -> None:
    send_to_hubs(message)
    _notify(message)


def publish(event: Event) -> None:
    """Publish ``event`` once the current transaction (if any) commits."""
    message = event.to_message()
    transaction.on_commit(lambda: _deliver(message))


def publish_control(action: str, **fields: Any) -> None:
    """Ask every hub to act on its connections (e.g. close a user's sockets), after commit."""
    message = {"type": "hub.control", "action": action, **fields}
    transaction.on_commit(lambda: send_to_hubs(message))


def publish_now(event: Event) -> None:
    """Publish ``event`` at once, outside any transaction (e.g. live metrics)."""
    _deliver(event.to_message())


def publish_control_now(action: str, **fields: Any) -> None:
    """Send a control message to every hub at once, outside any transaction."""
    send_to_hubs({"type": "hub.control", "action": action, **fields})


def send_to_hubs(message: dict[str, Any]) -> None:
    """Hand ``message`` to the layer, from any thread, without waiting on the event loop.

    In a server process the local hub's publisher task forwards it, keeping the order
    of publication; elsewhere (management commands, tests without a hub) it is sent
    directly.
    """
    from sysmanage.hub import Hub

    hub = Hub.current()
    if hub is not None and hub.accepts_messages():
        if hub.owns_current_thread():
            hub.enqueue_publish(message)
        else:
            hub.call_soon_threadsafe(hub.enqueue_publish, message)
        return
    _warn_if_unshared_layer()
    try:
        async_to_sync(get_channel_layer().group_send)(EVENTS_GROUP, message)
    except Exception:
        # The change itself is committed; failing the request now would only invite a
        # duplicate retry.  Say loudly which event was lost instead.
        logger.exception(
            "could not publish %s: the channel layer is unreachable",
            message.get("event") or message.get("action"),
        )


_warned = threading.Event()
_server_process = threading.Event()


def mark_server_process() -> None:
    """Note that this process serves clients: its events need no warning (see below)."""
    _server_process.set()


def _warn_if_unshared_layer() -> None:
    """Say once that events of a process without a hub reach nobody on the in-memory layer.

    A server process without a hub simply has no subscriber yet; any other process
    (a management command) is talking to nobody, which is worth a warning.
    """
    from django.conf import settings

    if settings.REDIS_URL or _warned.is_set() or _server_process.is_set():
        return
    _warned.set()
    logger.warning(
        "Events published by this process reach no server: the in-memory channel layer "
        "is not shared between processes. Set REDIS_URL to deliver them."
    )
