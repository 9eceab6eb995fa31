"""Log lines: the ids they carry, the JSON form, and redaction of what they hold."""

from __future__ import annotations

import json
import logging
import sys

from sysmanage.logcontext import ContextFilter, JsonFormatter, ReadableFormatter, connection_id
from sysmanage.logfilters import RedactTokensFilter


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("sysmanage.test", logging.WARNING, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_readable_lines_carry_the_connection_they_are_about():
    token = connection_id.set("c-1-2")
    try:
        line = record("closed %s", "slow")
        ContextFilter().filter(line)
    finally:
        connection_id.reset(token)
    text = ReadableFormatter().format(line)
    assert text.endswith("WARNING sysmanage.test: closed slow [connection=c-1-2]")
    plain = record("nothing")
    ContextFilter().filter(plain)
    assert "[" not in ReadableFormatter().format(plain)  # outside any request or socket


def test_json_lines_hold_extras_redacted_and_the_exception():
    try:
        raise ValueError("bad /api?token=sekret123")
    except ValueError:
        line = record("failed", client="10.0.0.1", status=500, url="/x?token=sekret123")
        line.exc_info = sys.exc_info()
    RedactTokensFilter().filter(line)
    ContextFilter().filter(line)
    entry = json.loads(JsonFormatter().format(line))
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "sysmanage.test"
    assert entry["message"] == "failed"
    assert entry["status"] == 500
    assert entry["client"] == "10.0.0.1"
    assert entry["url"] == "/x?token=[redacted]"
    assert "ValueError" in entry["exception"]
    assert "sekret123" not in json.dumps(entry)
    assert "request_id" not in entry  # empty ids are left out
