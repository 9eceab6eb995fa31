"""Control messages: one typed registry, checked where they are sent and received."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from sysmanage import control
from sysmanage.control import AgentDispatch, CloseAgent, Control, RecheckUsers
from sysmanage.hub import Hub


class Agent:
    """An agent connection as the hub's registry sees it."""

    user_id = None
    session_tag = None

    def __init__(self):
        self.nudged = 0
        self.closed: list[int] = []

    def nudge(self):
        self.nudged += 1

    def close_from_hub(self, code, error):
        self.closed.append(code)


def test_action_names_are_unique():
    with pytest.raises(ValueError, match="is registered twice"):

        @dataclasses.dataclass(frozen=True, kw_only=True)
        class Duplicate(Control):
            action = "close_user"


def test_fields_are_checked_when_a_message_is_made():
    with pytest.raises(TypeError, match="host_id must be"):
        CloseAgent(host_id=42, reason="x")
    with pytest.raises(TypeError, match="user_ids must be"):
        RecheckUsers(user_ids=["a", 1])
    with pytest.raises(TypeError):
        AgentDispatch(host="h")  # an unknown field


def test_a_message_without_a_handler_is_refused_when_sent(monkeypatch):
    monkeypatch.setattr(control, "_REGISTRY", control.control_types())  # restored after

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Unhandled(Control):
        action = "test_unhandled"

    with pytest.raises(LookupError, match="no handler"):
        Unhandled().to_message()


def test_a_message_survives_the_layer_and_reaches_its_handler():
    hub = Hub()
    agent = Agent()
    hub.register_agent("h1", agent)
    message = AgentDispatch(host_id="h1").to_message()
    assert message == {
        "type": "hub.control",
        "action": "agent_dispatch",
        "fields": {"host_id": "h1"},
    }
    control.handle(hub, message)
    assert agent.nudged == 1
    wire = RecheckUsers(user_ids=("a", "b")).to_message()
    wire["fields"]["user_ids"] = list(wire["fields"]["user_ids"])  # as msgpack returns it
    assert control.parse(wire) == RecheckUsers(user_ids=("a", "b"))


def test_malformed_or_unknown_messages_are_logged_and_ignored(caplog):
    hub = Hub()
    agent = Agent()
    hub.register_agent("h1", agent)
    with caplog.at_level(logging.WARNING, logger="sysmanage.control"):
        control.handle(hub, {"type": "hub.control", "action": "no_such_action", "fields": {}})
        control.handle(
            hub, {"type": "hub.control", "action": "close_agent", "fields": {"host_id": "h1"}}
        )
    assert agent.closed == []
    assert len(caplog.records) == 2
