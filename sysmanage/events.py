"""
Events: what services publish, and when.

Services describe what happened with a typed :class:`Event` and call :func:`publish`,
which hands it to the process's :mod:`~sysmanage.node` after the surrounding
transaction commits.  Every server process's node has joined the events group, and its
hub fans each event out to the local WebSocket connections whose subscriptions match.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any, ClassVar

from django.db import transaction

from sysmanage import dbgate, node
from sysmanage.control import Control
from sysmanage.node import EventMessage
from sysmanage.protocol import utc_now_iso

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Event]] = {}
Listener = Callable[[dict[str, Any]], None]
_LISTENERS: dict[str, list[Listener]] = defaultdict(list)
#: Listeners that neither block nor use the database (``listen(..., blocking=False)``).
_QUICK_LISTENERS: dict[str, list[Listener]] = defaultdict(list)


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

    def to_message(self) -> EventMessage:
        """The layer message that carries this event to every node."""
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


def listen(event_name: str, listener: Listener, *, blocking: bool = True) -> None:
    """Call ``listener(data)`` in the publishing process whenever ``event_name`` is published.

    Higher apps react to lower apps' events this way (alerts to metrics, for instance).
    Listeners run after commit, in publication order.  A blocking listener (the default)
    may use the database: it runs in the thread that published the event, except on the
    node's event loop (:func:`publish_now` of live metrics), where it runs in the
    database thread instead.  A listener registered with ``blocking=False`` promises to
    do neither; it runs at once wherever the event was published, and hands any blocking
    work it finds to :func:`defer`.  Live metrics arrive a thousand a second from a large
    fleet: judged in memory on the loop, they cost no hop to the database thread each.
    """
    if event_name not in _REGISTRY:
        raise ValueError(f"unknown event {event_name!r}")
    listeners = _LISTENERS[event_name] if blocking else _QUICK_LISTENERS[event_name]
    if listener not in listeners:
        listeners.append(listener)


def defer(job: Callable[..., object], *args: Any) -> None:
    """Run ``job(*args)``, which may block or use the database, off the node's loop: in
    the database thread when called on the loop, else at once."""
    current = node.Node.current()
    if current is not None and current.owns_current_thread():
        current.run_in_background(job, *args)
    else:
        job(*args)


def _notify(message: EventMessage) -> None:
    quick = _QUICK_LISTENERS.get(message["event"])
    if quick:
        _call_listeners(tuple(quick), message)
    listeners = tuple(_LISTENERS.get(message["event"], ()))
    if listeners:
        defer(_call_listeners, listeners, message)


def _call_listeners(listeners: tuple[Listener, ...], message: EventMessage) -> None:
    for listener in listeners:
        try:
            listener(message["data"])
        except Exception:
            dbgate.log_exception(logger, "listener of %s failed", message["event"])


def _deliver(message: EventMessage) -> None:
    node.send_to_nodes(message)
    _notify(message)


def publish(event: Event) -> None:
    """Publish ``event`` once the current transaction (if any) commits."""
    message = event.to_message()
    transaction.on_commit(lambda: _deliver(message))


def publish_control(control: Control) -> None:
    """Ask every node to act on its connections (e.g. close a user's sockets), after commit."""
    message = control.to_message()
    transaction.on_commit(lambda: node.send_to_nodes(message))


def publish_now(event: Event) -> None:
    """Publish ``event`` at once, outside any transaction (e.g. live metrics)."""
    _deliver(event.to_message())


def publish_control_now(control: Control) -> None:
    """Send a control message to every node at once, outside any transaction."""
    node.send_to_nodes(control.to_message())
