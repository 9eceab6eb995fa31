"""
Control messages: what one server process asks every process to do with its connections.

Each kind of control message is a frozen dataclass deriving from :class:`Control`, with
a unique ``action`` name; defining one registers it, and a second kind under the same
name is refused, as for events (:mod:`sysmanage.events`).  Fields are checked against
their annotations when a message is made, so a malformed message fails where it is sent
(:func:`sysmanage.events.publish_control`), and again where it is received.

Every node hands the messages it receives to :func:`handle`, on its loop, which calls the
one handler registered for the message's kind with the process's hub; handlers must not
block.  The core's messages and their handlers are below; apps register theirs from
``AppConfig.ready`` (``recheck_users``: ``sysmanage.apps``; a command's hand-over and
end: ``hosts.apps``).
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, TypedDict, TypeVar

from sysmanage.hub import Hub
from sysmanage.protocol import CloseCode, auth_failed_envelope

logger = logging.getLogger(__name__)

#: What a control message's fields may hold (tuples travel as lists).
FieldValue = str | int | bool | None | list[str] | tuple[str, ...]


class ControlMessage(TypedDict):
    """A control message as it travels on the channel layer."""

    type: Literal["hub.control"]
    action: str
    fields: dict[str, FieldValue]


_REGISTRY: dict[str, type[Control]] = {}
_HANDLERS: dict[type[Control], Callable[[Hub, Any], None]] = {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Control:
    """Base of every control message: a unique action name and typed fields.

    Fields may be ``str``, ``int``, ``bool``, ``None``, ``tuple[str, ...]`` and unions
    of those: what the channel layer carries (a tuple arrives as a list, turned back).
    """

    action: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        action = cls.__dict__.get("action")
        if action is None:
            return
        if action in _REGISTRY:
            raise ValueError(f"control action {action!r} is registered twice")
        _REGISTRY[action] = cls

    def __post_init__(self) -> None:
        """Refuse field values that do not match their annotations."""
        hints = _field_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not _conforms(value, hints[field.name]):
                raise TypeError(
                    f"control {self.action!r}: {field.name} must be "
                    f"{hints[field.name]}, not {value!r}"
                )

    def to_message(self) -> ControlMessage:
        """The layer message that carries this control message to every node.

        Raises ``LookupError`` if no handler is registered for it: no node would act.
        """
        if type(self) not in _HANDLERS:
            raise LookupError(f"no handler is registered for control {self.action!r}")
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"type": "hub.control", "action": self.action, "fields": fields}


_HINTS: dict[type[Control], dict[str, Any]] = {}


def _field_hints(kind: type[Control]) -> dict[str, Any]:
    hints = _HINTS.get(kind)
    if hints is None:
        hints = _HINTS[kind] = typing.get_type_hints(kind)
    return hints


def _conforms(value: object, hint: object) -> bool:
    """Whether ``value`` is of the (simple) type ``hint``."""
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is types.UnionType or origin is typing.Union:
        return any(_conforms(value, arm) for arm in typing.get_args(hint))
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(_conforms(v, item) for v in value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is bool:
        return isinstance(value, bool)
    raise TypeError(f"control message fields cannot be {hint!r}")


def control_types() -> dict[str, type[Control]]:
    """Every registered kind of control message by action (a copy)."""
    return dict(_REGISTRY)


C = TypeVar("C", bound=Control)


def register(kind: type[C], handler: Callable[[Hub, C], None]) -> None:
    """Make every node call ``handler(hub, message)`` for control messages of ``kind``
    (on the node's loop; it must not block).  Refuses a second handler."""
    if kind in _HANDLERS and _HANDLERS[kind] is not handler:
        raise ValueError(f"a handler for control {kind.action!r} is registered already")
    _HANDLERS[kind] = handler


def parse(message: Mapping[str, Any]) -> Control:
    """The control message that layer message ``message`` carries.

    Raises ``ValueError`` for an unknown action, ``TypeError`` for wrong fields.
    """
    kind = _REGISTRY.get(str(message.get("action")))
    if kind is None:
        raise ValueError(f"unknown control action {message.get('action')!r}")
    fields = dict(message.get("fields") or {})
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def handle(hub: Hub, message: Mapping[str, Any]) -> None:
    """Act on a control message received from the layer: call its kind's handler."""
    try:
        control = parse(message)
    except (TypeError, ValueError) as exc:
        logger.warning("node ignored a control message: %s", exc)
        return
    handler = _HANDLERS.get(type(control))
    if handler is None:
        logger.warning("node ignored control %r: no handler is registered", control.action)
        return
    handler(hub, control)


# -- the core's control messages ------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class CloseUser(Control):
    """Close every socket of a user (deactivated, deleted, or its access revoked)."""

    action = "close_user"

    user_id: str
    reason: str
    code: int = int(CloseCode.AUTH_FAILED)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CloseSession(Control):
    """Close every socket of one sign-in, by its tag: a Django session, or the access
    tokens of one token login (``sysmanage.services.token_session_tag``); it logged out."""

    action = "close_session"

    session: str
    reason: str
    code: int = int(CloseCode.AUTH_FAILED)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecheckUsers(Control):
    """Recheck the sockets of these users (None: of everyone) against the database."""

    action = "recheck_users"

    user_ids: tuple[str, ...] | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CloseAgent(Control):
    """Close a host's agent connection (its token was revoked or rotated, or the host
    deleted or registered again)."""

    action = "close_agent"

    host_id: str
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentDispatch(Control):
    """Work was queued for a host: the process holding its agent nudges it."""

    action = "agent_dispatch"

    host_id: str


def close_user(hub: Hub, message: CloseUser) -> None:
    """Close the user's sockets in this process."""
    error = auth_failed_envelope(message.reason)
    for conn in list(hub.by_user.get(message.user_id, ())):
        conn.close_from_hub(message.code, error)


def close_session(hub: Hub, message: CloseSession) -> None:
    """Close the session's sockets in this process."""
    error = auth_failed_envelope(message.reason)
    for conn in list(hub.by_session.get(message.session, ())):
        conn.close_from_hub(message.code, error)


def close_agent(hub: Hub, message: CloseAgent) -> None:
    """Close the host's agent connection, if it is connected to this process."""
    conn = hub.agents.get(message.host_id)
    if conn is not None:
        conn.close_from_hub(CloseCode.AUTH_FAILED, auth_failed_envelope(message.reason))


def agent_dispatch(hub: Hub, message: AgentDispatch) -> None:
    """Nudge the host's agent, if it is connected to this process."""
    conn = hub.agents.get(message.host_id)
    if conn is not None:
        conn.nudge()


register(CloseUser, close_user)
register(CloseSession, close_session)
register(CloseAgent, close_agent)
register(AgentDispatch, agent_dispatch)
