"""Parsing client messages and building server envelopes."""

from __future__ import annotations

import json
import re

import pytest

from sysmanage.protocol import (
    MAX_TOKEN_LENGTH,
    ErrorCode,
    ProtocolError,
    auth_failed_envelope,
    envelope,
    parse_client_message,
    refresh_token_of,
)

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def test_envelope_has_the_seed_fields_and_utc_timestamp():
    message = envelope("event", "host_status", {"a": 1})
    assert set(message) == {"type", "channel", "data", "timestamp"}
    assert ISO_UTC.match(message["timestamp"])
    assert envelope("response", "x", {}, id_="r1")["id"] == "r1"


def test_auth_failed_envelope_is_the_seed_shape():
    message = auth_failed_envelope()
    assert message["type"] == "error"
    assert message["channel"] == "system"
    assert message["data"] == {
        "code": "AUTH_FAILED",
        "message": "Invalid or expired JWT token",
        "action": "reconnect_with_valid_token",
    }


def test_auth_failed_envelope_answering_a_message_carries_its_id():
    message = auth_failed_envelope("JWT token expired", id_="r1")
    assert message["id"] == "r1"
    assert message["data"]["action"] == "reconnect_with_valid_token"


def test_refresh_is_a_client_type_and_its_token_is_read():
    parsed = parse_client_message('{"type": "refresh", "data": {"token": "a.b.c"}, "id": "r"}')
    assert parsed.type == "refresh"
    assert parsed.channel is None
    assert refresh_token_of(parsed) == "a.b.c"
    longest = "x" * MAX_TOKEN_LENGTH
    assert (
        refresh_token_of(
            parse_client_message(f'{{"type": "refresh", "data": {{"token": "{longest}"}}}}')
        )
        == longest
    )
    with pytest.raises(ProtocolError) as caught:
        parse_client_message('{"type": "teleport"}')
    assert "refresh" in caught.value.extra["allowed_types"]


@pytest.mark.parametrize(
    "data",
    [
        None,
        {},
        {"token": None},
        {"token": 5},
        {"token": ["a.b.c"]},
        {"token": {"raw": "a.b.c"}},
        {"token": ""},
        {"token": " \t"},
        {"token": "x" * (MAX_TOKEN_LENGTH + 1)},
    ],
)
def test_refresh_without_a_usable_token_is_invalid(data):
    raw = {"type": "refresh", "id": "r9"} | ({"data": data} if data is not None else {})
    with pytest.raises(ProtocolError) as caught:
        refresh_token_of(parse_client_message(json.dumps(raw)))
    error = caught.value.to_envelope()
    assert error["data"]["code"] == ErrorCode.INVALID_MESSAGE
    assert "data.token" in error["data"]["message"]
    assert error["id"] == "r9"


def test_valid_subscribe_is_parsed():
    parsed = parse_client_message(
        '{"type":"subscribe","channel":"system_alerts","filters":{"severity":["critical"]},"id":7}'
    )
    assert parsed.type == "subscribe"
    assert parsed.channel == "system_alerts"
    assert parsed.filters == {"severity": ["critical"]}
    assert parsed.id == 7


@pytest.mark.parametrize(
    ("text", "code", "echoed_id"),
    [
        ("not json", ErrorCode.INVALID_JSON, None),
        ("[1, 2]", ErrorCode.INVALID_MESSAGE, None),
        ('"subscribe"', ErrorCode.INVALID_MESSAGE, None),
        ('{"channel": "host_status", "id": "a"}', ErrorCode.INVALID_MESSAGE, "a"),
        ('{"type": "teleport", "id": "b"}', ErrorCode.UNKNOWN_TYPE, "b"),
        ('{"type": 5}', ErrorCode.UNKNOWN_TYPE, None),
        ('{"type": "event", "id": "c"}', ErrorCode.UNSUPPORTED_TYPE, "c"),
        ('{"type": "subscribe", "channel": 3, "id": "d"}', ErrorCode.INVALID_MESSAGE, "d"),
        ('{"type": "command", "data": [1], "id": "e"}', ErrorCode.INVALID_MESSAGE, "e"),
        ('{"type": "subscribe", "filters": [], "id": "f"}', ErrorCode.INVALID_FILTERS, "f"),
        ('{"type": "ping", "id": {"x": 1}}', ErrorCode.INVALID_MESSAGE, None),
        ('{"type": "ping", "id": true}', ErrorCode.INVALID_MESSAGE, None),
        ('{"type": "ping", "id": "' + "x" * 200 + '"}', ErrorCode.INVALID_MESSAGE, None),
        ("[" * 100_000, ErrorCode.INVALID_JSON, None),
    ],
)
def test_bad_messages_raise_protocol_errors(text, code, echoed_id):
    with pytest.raises(ProtocolError) as caught:
        parse_client_message(text)
    error = caught.value.to_envelope()
    assert error["type"] == "error"
    assert error["data"]["code"] == code
    assert error["data"]["message"]
    assert error.get("id") == echoed_id
