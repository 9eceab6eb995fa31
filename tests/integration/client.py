"""
Clients of a running server: a WebSocket client that checks every server message
against the envelope of the seed protocol, and small HTTP helpers (urllib, no proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import http.cookiejar
import itertools
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

#: Default bound of every wait on the network.
TIMEOUT = 5.0

SERVER_TYPES = {"status", "event", "response", "error", "pong"}
ENVELOPE_KEYS = {"type", "channel", "data", "timestamp"}
CHANNELS = (
    "host_status",
    "package_operations",
    "command_execution",
    "system_alerts",
    "user_activity",
    "host_metrics",
    "fleet_status",
)
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")

_ids = itertools.count(1)


def next_id(prefix: str = "req") -> str:
    return f"{prefix}-{next(_ids)}"


def parse_iso_utc(value: str) -> datetime:
    """Parse an ISO-8601 UTC timestamp with a ``Z`` suffix (fails on anything else)."""
    assert isinstance(value, str), f"not ISO-8601 UTC: {value!r}"
    assert ISO_UTC.match(value), f"not ISO-8601 UTC: {value!r}"
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.utcoffset() == timedelta(0)
    return parsed


def _is_summary(message: dict[str, Any]) -> bool:
    """A summary of every host's metrics (``host_id: "*"``): no place on the stream."""
    return message.get("channel") == "host_metrics" and "hosts" in message.get("data", {})


def assert_envelope(message: Any) -> None:
    """Every server message: ``{type, channel, data, timestamp}`` plus an optional ``id``."""
    assert isinstance(message, dict), message
    missing = ENVELOPE_KEYS - message.keys()
    assert not missing, f"message lacks {missing}: {message}"
    extra = message.keys() - ENVELOPE_KEYS - {"id"}
    if message.get("type") == "event" and not _is_summary(message):
        # an event's place on its channel's stream (a summary of every host has none)
        assert {"offset", "epoch"} <= message.keys(), f"event without its position: {message}"
        assert isinstance(message["offset"], int), message
        assert message["offset"] >= 1, message
        assert isinstance(message["epoch"], str), message
        assert message["epoch"], message
        extra -= {"offset", "epoch"}
    assert not extra, f"message has unexpected keys {extra}: {message}"
    assert message["type"] in SERVER_TYPES, message
    assert isinstance(message["channel"], str), message
    assert message["channel"], message
    assert isinstance(message["data"], dict), message
    sent = parse_iso_utc(message["timestamp"])
    skew = abs((datetime.now(UTC) - sent).total_seconds())
    assert skew < 300, f"timestamp {message['timestamp']} is {skew:.0f}s off"
    if "id" in message:
        assert isinstance(message["id"], str | int)
        assert not isinstance(message["id"], bool)
    if message["type"] == "error":
        assert isinstance(message["data"].get("code"), str), message
        assert isinstance(message["data"].get("message"), str), message


@dataclass
class Closed:
    """How a connection ended, and what arrived before."""

    code: int | None
    reason: str
    messages: list[dict[str, Any]]


class WsClient:
    """One WebSocket connection; every message received is checked with assert_envelope.

    Messages read while looking for something else are kept (``pending``) and seen by
    the next :meth:`recv` or :meth:`expect`, so nothing is lost between calls.
    """

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.log: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []

    @property
    def subprotocol(self) -> str | None:
        return self.ws.subprotocol

    async def send(self, message: Any) -> None:
        """Send ``message``: a dict/list is JSON-encoded, str and bytes go as they are."""
        if isinstance(message, str | bytes):
            await self.ws.send(message)
        else:
            await self.ws.send(json.dumps(message))

    async def send_many(self, frames: list[str]) -> None:
        """Send frames back to back, without reading in between."""
        for frame in frames:
            await self.ws.send(frame)

    async def _read(self, timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            raw = await self.ws.recv()
        assert isinstance(raw, str), f"server sent a binary frame: {raw!r}"
        message = json.loads(raw)
        assert_envelope(message)
        self.log.append(message)
        return message

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next message (a pending one first)."""
        if self.pending:
            return self.pending.pop(0)
        return await self._read(timeout)

    async def expect(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = TIMEOUT,
        *,
        what: str = "a matching message",
        skipped: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Return the first message matching ``predicate``, pending ones included.

        Messages before it stay pending, unless ``skipped`` is given: then they are
        moved there (to check what arrived before the match).
        """
        for index, message in enumerate(self.pending):
            if predicate(message):
                del self.pending[index]
                if skipped is not None:
                    skipped.extend(self.pending[:index])
                    del self.pending[:index]
                return message
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                message = await self._read(left)
            except TimeoutError:
                raise AssertionError(f"no {what} within {timeout}s; got {self.pending}") from None
            if predicate(message):
                if skipped is not None:
                    skipped.extend(self.pending)
                    self.pending.clear()
                return message
            self.pending.append(message)

    async def next_event(
        self, channel: str, timeout: float = TIMEOUT, skipped: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The next ``event`` on ``channel`` (other messages stay pending)."""
        return await self.expect(
            lambda m: m["type"] == "event" and m["channel"] == channel,
            timeout,
            what=f"event on {channel}",
            skipped=skipped,
        )

    async def request(self, message: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
        """Send ``message`` with a fresh id unless it has one; return the reply with that id."""
        if "id" not in message:
            message = {**message, "id": next_id()}
        await self.send(message)
        reply = await self.expect(
            lambda m: m.get("id") == message["id"], timeout, what=f"reply to {message['id']}"
        )
        assert reply["id"] == message["id"]
        return reply

    async def ping(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        reply = await self.request({"type": "ping"}, timeout)
        assert reply["type"] == "pong", reply
        return reply

    async def subscribe(
        self, channel: str, filters: dict[str, Any] | None = None, timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        """Subscribe and check the confirmation; return it (the status snapshot, if one
        follows, is left for the caller: see :meth:`subscribe_with_status`)."""
        message: dict[str, Any] = {"type": "subscribe", "channel": channel}
        if filters is not None:
            message["filters"] = filters
        reply = await self.request(message, timeout)
        assert reply["type"] == "response", reply
        assert reply["channel"] == channel
        assert reply["data"]["action"] == "subscribe"
        assert reply["data"]["status"] == "subscribed"
        assert reply["data"]["channel"] == channel
        return reply

    async def subscribe_with_status(
        self, channel: str, filters: dict[str, Any] | None = None, timeout: float = TIMEOUT
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        reply = await self.subscribe(channel, filters, timeout)
        status = await self.expect(
            lambda m: m["type"] == "status", timeout, what=f"status of {channel}"
        )
        assert status["channel"] == channel
        assert status["id"] == reply["id"]
        return reply, status

    async def expect_closed(self, timeout: float = TIMEOUT) -> Closed:
        """Read until the server closes the connection; return the close code and reason
        with every message not consumed before."""
        messages = list(self.pending)
        self.pending.clear()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    messages.append(await self._read(timeout))
        except ConnectionClosed as exc:
            frame = exc.rcvd
            return Closed(frame.code if frame else None, frame.reason if frame else "", messages)
        except TimeoutError:
            raise AssertionError(
                f"connection still open after {timeout}s; got {messages}"
            ) from None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()


@contextlib.asynccontextmanager
async def ws_connect(
    url: str,
    *,
    token: str | None = None,
    origin: str | None = None,
    headers: dict[str, str] | None = None,
    subprotocols: list[str] | None = None,
    **kwargs: Any,
) -> AsyncIterator[WsClient]:
    """Open a connection (``token`` goes in the query string) and close it afterwards."""
    if token is not None:
        url = f"{url}?{urllib.parse.urlencode({'token': token})}"
    ws = await connect(
        url,
        origin=origin,
        additional_headers=headers,
        subprotocols=subprotocols,
        open_timeout=TIMEOUT,
        close_timeout=2,
        proxy=None,
        compression=None,
        max_size=None,
        ping_interval=None,
        **kwargs,
    )
    client = WsClient(ws)
    try:
        yield client
    finally:
        await client.close()


async def handshake_status(url: str, **kwargs: Any) -> int:
    """The HTTP status a refused handshake got (fails if the handshake succeeded)."""
    try:
        async with ws_connect(url, **kwargs):
            pass
    except websockets.exceptions.InvalidStatus as exc:
        return exc.response.status_code
    raise AssertionError("the handshake was accepted")


# -- HTTP ---------------------------------------------------------------------------------


class _SourceAddressHandler(urllib.request.HTTPHandler):
    """Plain HTTP from a chosen local address (any of 127.0.0.0/8 on loopback)."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address

    def http_open(self, req: urllib.request.Request) -> Any:
        connection = functools.partial(http.client.HTTPConnection, source_address=(self.address, 0))
        return self.do_open(connection, req)


def opener_from(address: str, jar: http.cookiejar.CookieJar | None = None) -> Any:
    """An opener whose connections come from ``address`` (e.g. ``127.0.0.7``): the
    server sees another client address without trusting any proxy header."""
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        _SourceAddressHandler(address),
        urllib.request.HTTPCookieProcessor(jar if jar is not None else http.cookiejar.CookieJar()),
    )


@dataclass
class HttpResponse:
    status: int
    body: Any
    headers: dict[str, str]


def http_request(
    method: str,
    url: str,
    *,
    token: str | None = None,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
    opener: Any = None,
    form: dict[str, str] | None = None,
    timeout: float = 10.0,
    raw_body: bytes | None = None,
) -> HttpResponse:
    """One HTTP request (``raw_body`` is sent as it is); JSON bodies are decoded."""
    all_headers = {"Accept": "application/json", **(headers or {})}
    data = raw_body
    if json_body is not None:
        data = json.dumps(json_body).encode()
        all_headers["Content-Type"] = "application/json"
    elif form is not None:
        data = urllib.parse.urlencode(form).encode()
        all_headers["Content-Type"] = "application/x-www-form-urlencoded"
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    assert url.startswith(("http://", "https://")), url
    request = urllib.request.Request(url, data=data, method=method, headers=all_headers)  # noqa: S310
    opener = opener or urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            status, raw, hdrs = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        status, raw, hdrs = exc.code, exc.read(), dict(exc.headers)
    text = raw.decode(errors="replace")
    try:
        body: Any = json.loads(text) if text else None
    except ValueError:
        body = text
    return HttpResponse(status, body, hdrs)


async def api(method: str, base_url: str, path: str, **kwargs: Any) -> HttpResponse:
    """An HTTP request from async code (in a thread, so the event loop keeps reading)."""
    return await asyncio.to_thread(http_request, method, base_url + path, **kwargs)


def obtain_tokens(
    base_url: str, username: str, password: str, user_agent: str = "integration-tests"
) -> dict[str, str]:
    """``POST /api/token/``: return ``{"access": ..., "refresh": ...}``."""
    response = http_request(
        "POST",
        f"{base_url}/api/token/",
        json_body={"username": username, "password": password},
        headers={"User-Agent": user_agent},
    )
    assert response.status == 200, response
    return response.body


@dataclass
class Session:
    """A browser-like session: cookies kept in ``opener``."""

    base_url: str
    opener: Any
    cookies: dict[str, str]

    @property
    def sessionid(self) -> str:
        return self.cookies["sessionid"]

    def logout(self) -> int:
        """``POST /admin/logout/`` with the CSRF token, as the admin's logout button does."""
        response = http_request(
            "POST",
            f"{self.base_url}/admin/logout/",
            opener=self.opener,
            headers={
                "Accept": "text/html",
                "X-CSRFToken": self.cookies["csrftoken"],
                "Referer": f"{self.base_url}/admin/",
            },
            form={},
        )
        return response.status


def session_login(base_url: str, username: str, password: str) -> str:
    """Log in through the admin login form; return the ``sessionid`` cookie value."""
    return browser_login(base_url, username, password).sessionid


def browser_login(base_url: str, username: str, password: str) -> Session:
    """Log in through the admin login form, as a browser would."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor(jar)
    )
    page = http_request(
        "GET", f"{base_url}/admin/login/", opener=opener, headers={"Accept": "text/html"}
    )
    assert page.status == 200, page.status
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.body)
    assert match, "no CSRF token in the login form"
    result = http_request(
        "POST",
        f"{base_url}/admin/login/?next=/admin/",
        opener=opener,
        headers={"Accept": "text/html", "Referer": f"{base_url}/admin/login/"},
        form={
            "username": username,
            "password": password,
            "csrfmiddlewaretoken": match.group(1),
            "next": "/admin/",
        },
    )
    assert result.status == 200, result.status
    cookies = {cookie.name: cookie.value for cookie in jar}
    assert "sessionid" in cookies, f"login failed; cookies: {sorted(cookies)}"
    return Session(base_url, opener, cookies)
