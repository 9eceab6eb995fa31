"""Redaction of credentials from log lines and from Daphne's access log."""

from __future__ import annotations

import io
import logging
import sys

import pytest
from daphne.access import AccessLogGenerator

from sysmanage.logfilters import RedactTokensFilter, redact
from sysmanage.serve import RedactingCommandLineInterface, RedactingServer

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJ1c2VyX2lkIjoiMSJ9.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("GET /ws?token=abc123secret", "abc123secret"),
        ("GET /ws?TOKEN=abc123secret&x=1", "abc123secret"),
        ("GET /ws?t%6Fken=abc123secret", "abc123secret"),
        ("GET /ws?t%6fken=abc123secret", "abc123secret"),
        ("GET /x?access_token=abc123secret", "abc123secret"),
        ("GET /x?a=1&password=abc123secret", "abc123secret"),
        ("GET /x?a=1;api_key=abc123secret", "abc123secret"),
        ("b'/\\xff?token=abc123secret'", "abc123secret"),
        ("Authorization: Bearer abc123secretabc", "abc123secretabc"),
        (f"refresh {JWT} failed", JWT),
        ("connect eyJoIjoiMSJ9:1tXz9Q:AbCdEf012345 refused", "eyJoIjoiMSJ9:1tXz9Q:AbCdEf012345"),
        ("host token smat_abcdefghijklmnop", "abcdefghijklmnop"),
        ("key smrk_abcdefghijklmnop", "abcdefghijklmnop"),
    ],
)
def test_credentials_are_redacted(line, secret):
    assert secret not in redact(line)


def test_other_parameters_are_kept():
    assert (
        redact("GET /api/hosts/?status=online&limit=5") == "GET /api/hosts/?status=online&limit=5"
    )


def test_the_filter_redacts_messages_arguments_and_tracebacks():
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "path %s", ("/ws?token=s3cr3t",), None
    )
    try:
        raise ValueError("bad token=s3cr3t")
    except ValueError:
        record.exc_info = sys.exc_info()
    RedactTokensFilter().filter(record)
    text = logging.Formatter().format(record)
    assert "s3cr3t" not in text
    assert "[redacted]" in text


def test_every_access_log_entry_is_redacted():
    stream = io.StringIO()
    server = RedactingServer.__new__(RedactingServer)  # only its logging is used here
    server.action_logger = AccessLogGenerator(stream)
    server.log_action(
        "http",
        "complete",
        {
            "path": "/ws?token=s3cr3t",
            "status": 404,
            "method": "GET",
            "client": "127.0.0.1:5",
            "size": 10,
        },
    )
    server.log_action(
        "websocket",
        "connecting",
        {"path": "/api/agent/connect?token=s3cr3t", "client": "127.0.0.1:5"},
    )
    assert "s3cr3t" not in stream.getvalue()
    assert stream.getvalue().count("[redacted]") == 2


def test_the_entry_point_serves_with_the_redacting_server():
    assert RedactingCommandLineInterface.server_class is RedactingServer
