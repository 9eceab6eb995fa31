"""
``LOG_FORMAT=json`` on a real server: every line of its output is one JSON object (the
access log too), each line about a request or a connection carries its id, the request id
comes back in ``X-Request-ID``, and no token sent in a URL reaches any line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import websockets

from tests.integration import harness

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def json_server(launch_sqlite: Any) -> Iterator[harness.Deployment]:
    with launch_sqlite("logs-json", LOG_FORMAT="json") as deployment:
        yield deployment


def _get(url: str, **headers: str) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers)  # noqa: S310  # loopback http
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def test_every_line_is_json_with_ids_and_no_token(json_server):
    server = json_server.servers[0]
    offset = server.log_size()
    secret = f"tok-{secrets.token_hex(12)}"
    status, headers = _get(f"{server.base_url}/healthz?token={secret}")
    assert status == 200
    generated = headers["X-Request-Id"]
    status, headers = _get(f"{server.base_url}/no-such-page", **{"X-Request-ID": "edge-42"})
    assert status == 404
    assert headers["X-Request-Id"] == "edge-42"  # a caller's plain id is kept
    status, headers = _get(f"{server.base_url}/healthz", **{"X-Request-ID": "bad id\u00e9"})
    assert headers["X-Request-Id"] != "bad id\u00e9"  # anything else is replaced

    async def refused_socket() -> None:
        async with websockets.connect(f"{server.ws_url}?token={secret}") as ws:
            with contextlib.suppress(websockets.ConnectionClosed):
                async for _frame in ws:  # the AUTH_FAILED error, then close 4001
                    pass
        assert ws.close_code == 4001

    asyncio.run(refused_socket())
    deadline = time.monotonic() + 5
    while "WARNING" not in server.log_since(offset) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    lines = [line for line in server.log_since(offset).splitlines() if line.strip()]
    assert lines
    entries = [json.loads(line) for line in lines]  # every line parses
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
    text = "\n".join(lines)
    assert secret not in text
    access = [e for e in entries if e["logger"] == "sysmanage.access"]
    assert any(e.get("request_id") == generated and e["status"] == 200 for e in access), access
    not_found = [e for e in entries if e["logger"] == "django.request"]
    assert not_found
    assert not_found[0]["request_id"] == "edge-42", not_found
    assert any(e.get("connection_id", "").startswith("c-") for e in access), access
