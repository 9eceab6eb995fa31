"""
Watch the SysManage WebSocket API from a terminal: one JSON message per line.

    .venv/bin/python scripts/ws_watch.py --url http://127.0.0.1:8000 \\
        --username admin --password-file var/admin-password \\
        --channel host_status --channel fleet_status

Gets an access token from ``/api/token/``, connects to ``/ws`` with the token in an
``Authorization: Bearer`` header (so it never appears in a URL or an access log),
subscribes to each ``--channel`` and prints every message the server sends as one JSON
line on standard output; progress notes go to standard error.  When the server warns
that the access token expires soon (status ``token_expiring``), it gets a new one from
``/api/token/refresh/`` and hands it to the open socket (message ``refresh``), so the
connection and its subscriptions carry on.  When the connection ends (the token was
refused, the network dropped, the server restarted, or closed it with 4008 because the
watcher fell behind) it reconnects with backoff, getting a new token first when the old
one was refused, unless ``--no-reconnect`` is given.  Each stream resumes where it
stopped: the subscriptions are renewed with ``since`` (the last event's position), the
server replays the missed events, and a note says whether a stream was recovered or not
(then the ``status`` snapshot follows, where the channel has one).  The same happens on
the server's ``events_missed`` notice.  An event seen already (its offset not after the
last one of its stream) is not printed again.  Ctrl-C closes the socket and exits.

With ``--token`` instead of a password, ``--refresh-token`` gives it the means to renew.

Only the standard library and ``websockets`` are used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Literal, NotRequired, TypedDict

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

#: Close codes after which reconnecting would only fail again.
FINAL_CLOSE_CODES = {4003, 4029, 1009}
AUTH_FAILED = 4001
#: Reconnection backoff, in seconds: the first delay, and the longest.
FIRST_DELAY = 1.0
MAX_DELAY = 30.0
#: A connection that stayed open this long (seconds) starts the backoff over.
STABLE_AFTER = 10.0
#: Channels whose ``status`` snapshot follows a subscription the server could not resume.
SNAPSHOT_CHANNELS = frozenset(
    {"host_status", "fleet_status", "system_alerts", "command_execution", "package_operations"}
)


def note(text: str) -> None:
    """A progress note for the person watching (standard error)."""
    print(f"ws_watch: {text}", file=sys.stderr, flush=True)


class Fatal(Exception):
    """An error that ends the program with a message and exit status 1."""


# -- tokens (REST) ---------------------------------------------------------------------


def _post_json(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise Fatal(f"not an http(s) URL: {url}")
    request = urllib.request.Request(  # noqa: S310 (the scheme was checked above)
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            answer = json.loads(response.read().decode())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise Fatal(f"POST {url} answered {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise Fatal(f"cannot reach {url}: {exc.reason}") from None
    if not isinstance(answer, dict):
        raise Fatal(f"POST {url} answered with JSON that is not an object")
    return answer


class Tokens:
    """Access and refresh tokens: from a password, refreshed when the access one expires."""

    def __init__(
        self,
        base_url: str,
        username: str | None,
        password: str | None,
        access: str | None,
        timeout: float,
        refresh: str | None = None,
    ) -> None:
        self.base_url = base_url
        self.username = username
        self.password = password
        self.access = access
        self.refresh = refresh
        self.timeout = timeout
        # an in-band refresh (in a thread) and a reconnection may want a token at once:
        # one at a time, so that the second uses the refresh token the first got
        self._renewing = threading.Lock()

    @property
    def renewable(self) -> bool:
        """Whether a new access token can be had (a refresh token, or a password)."""
        return bool(self.refresh) or (self.username is not None and self.password is not None)

    def login(self) -> None:
        """Get a fresh token pair with the username and password."""
        if self.username is None or self.password is None:
            raise Fatal("the token was refused and no --username/--password was given")
        pair = _post_json(
            f"{self.base_url}/api/token/",
            {"username": self.username, "password": self.password},
            self.timeout,
        )
        self.access, self.refresh = pair["access"], pair.get("refresh")

    def renew(self) -> None:
        """Get a new access token (with the refresh token if possible, else log in again)."""
        with self._renewing:
            self._renew()

    def _renew(self) -> None:
        """:meth:`renew`, with the lock held."""
        if self.refresh:
            try:
                pair = _post_json(
                    f"{self.base_url}/api/token/refresh/", {"refresh": self.refresh}, self.timeout
                )
                self.access = pair["access"]
                self.refresh = pair.get("refresh", self.refresh)
                return
            except Fatal as exc:
                note(f"refresh failed ({exc}); logging in again")
        self.login()


# -- the socket ------------------------------------------------------------------------


def http_base(url: str) -> str:
    """The server's base URL: ``http://host:port`` (``ws://host:port/ws`` is accepted too)."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "http", "https": "https", "ws": "http", "wss": "https"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise Fatal(f"--url must look like http://host:port, not {url!r}")
    path = parts.path.rstrip("/")
    path = path.removesuffix("/ws")
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def websocket_url(base_url: str) -> str:
    """``http://host:port`` -> ``ws://host:port/ws`` (https -> wss)."""
    parts = urllib.parse.urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path + "/ws", "", ""))


def connect_args(url: str, token: str, how: str) -> tuple[str, dict[str, Any]]:
    """The URL and ``connect`` keyword arguments that carry ``token`` the way asked."""
    if how == "header":
        return url, {"additional_headers": {"Authorization": f"Bearer {token}"}}
    if how == "subprotocol":
        return url, {"subprotocols": ["bearer", token]}
    return f"{url}?{urllib.parse.urlencode({'token': token})}", {}


class Position(TypedDict):
    """A place in a channel's stream: later events have a greater offset in the same epoch."""

    epoch: str
    offset: int


class Subscribe(TypedDict):
    """A ``subscribe`` message of the WebSocket API."""

    type: Literal["subscribe"]
    channel: str
    id: str
    filters: NotRequired[object]
    since: NotRequired[Position]


def subscriptions(args: argparse.Namespace) -> list[Subscribe]:
    """The subscribe messages to send: one per ``--channel`` (``NAME`` or ``NAME=FILTERS``)."""
    shared = json.loads(args.filters) if args.filters else None
    messages = []
    for index, spec in enumerate(args.channel or ["host_status", "fleet_status"], start=1):
        name, sep, own = spec.partition("=")
        filters = json.loads(own) if sep else shared
        message: Subscribe = {"type": "subscribe", "channel": name, "id": f"sub-{index}"}
        if filters is not None:
            message["filters"] = filters
        messages.append(message)
    return messages


def is_token_warning(message: object) -> bool:
    """Whether ``message`` is the server's warning that the access token expires soon."""
    if not isinstance(message, dict) or message.get("type") != "status":
        return False
    data = message.get("data")
    return (
        message.get("channel") == "system"
        and isinstance(data, dict)
        and data.get("event") == "token_expiring"
    )


async def refresh_in_band(ws: ClientConnection, tokens: Tokens) -> None:
    """Get a new access token and hand it to the open socket (``refresh``); the server
    answers with a ``response`` (printed like every message), or closes the socket."""
    try:
        await asyncio.to_thread(tokens.renew)
    except Fatal as exc:
        note(f"cannot renew the access token ({exc}); the server will close the connection")
        return
    message = {"type": "refresh", "channel": "system", "data": {"token": tokens.access}}
    with contextlib.suppress(ConnectionClosed):
        await ws.send(json.dumps({**message, "id": "refresh"}))
        note("handed the connection a new access token")


# -- resuming streams ------------------------------------------------------------------


def stream_position(value: object) -> Position | None:
    """``{"epoch": str, "offset": int}`` from an event envelope or a subscribe response's
    ``position``, if well-formed (a non-empty epoch, a non-negative integer offset)."""
    if not isinstance(value, dict):
        return None
    epoch, offset = value.get("epoch"), value.get("offset")
    if not isinstance(epoch, str) or not epoch:
        return None
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        return None
    return {"epoch": epoch, "offset": offset}


@dataclass
class Renewal:
    """A renewed subscription waiting for its answer: the ``since`` it sent, and the
    channel's events that arrived meanwhile (the server may replay them, in order)."""

    since: Position | None
    reason: str
    held: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Stream:
    """One subscription and where its stream stopped: the last position seen (latest
    event, or subscribe response) and the server time of it."""

    subscribe: Subscribe
    position: Position | None = None
    seen_at: str | None = None
    answered: bool = False
    renewal: Renewal | None = None

    @property
    def channel(self) -> str:
        return self.subscribe["channel"]


@dataclass
class Outcome:
    """What to do with one server message: print these (JSON lines), say these notes,
    send these subscribe messages."""

    show: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    send: list[Subscribe] = field(default_factory=list)


class Streams:
    """The watched subscriptions: renewed with ``since`` after a reconnect or an
    ``events_missed`` notice, replayed events let through, duplicates dropped."""

    def __init__(self, messages: list[Subscribe]) -> None:
        self.streams = {message["channel"]: Stream(message) for message in messages}
        self.duplicates = 0
        #: the message of the last connection-level error the server sent (why it closes)
        self.last_error = ""

    def subscribe_messages(self, reason: str) -> list[Subscribe]:
        """The subscribe messages for a new connection: a renewal, with ``since`` where
        the position is known, for each subscription the server confirmed before."""
        return [self._renew(stream, reason) for stream in self.streams.values()]

    def _renew(self, stream: Stream, reason: str) -> Subscribe:
        message = Subscribe(**stream.subscribe)
        if not stream.answered:
            return message
        if stream.position is not None:
            message["since"] = stream.position
        stream.renewal = Renewal(stream.position, reason)
        return message

    def handle(self, message: dict[str, Any]) -> Outcome:
        """Route one parsed server message."""
        kind, channel, data = message.get("type"), message.get("channel"), message.get("data")
        stream = self.streams.get(channel) if isinstance(channel, str) else None
        if not isinstance(data, dict):
            return Outcome(show=[message])
        if kind == "status" and channel == "system" and data.get("event") == "events_missed":
            return self._events_missed(message, data)
        if kind == "error":  # a refused subscribe comes on the channel "subscription"
            refused = [s for s in self.streams.values() if s.subscribe["id"] == message.get("id")]
            return self._refused(refused[0], message) if refused else Outcome(show=[message])
        if stream is None:
            return Outcome(show=[message])
        if kind == "event":
            if stream.renewal is not None and stream.renewal.since is not None:
                stream.renewal.held.append(message)
                return Outcome()
            return Outcome(show=self._admit(stream, [message]))
        if kind == "response" and data.get("action") == "subscribe":
            return self._subscribed(stream, message, data)
        return Outcome(show=[message])

    def _admit(self, stream: Stream, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events not seen before, moving the stream's position along."""
        fresh = []
        for event in events:
            position = stream_position(event)
            last = stream.position
            if (
                position is not None
                and last is not None
                and position["epoch"] == last["epoch"]
                and position["offset"] <= last["offset"]
            ):
                self.duplicates += 1
                continue
            if position is not None:
                stream.position = position
            if isinstance(event.get("timestamp"), str):
                stream.seen_at = event["timestamp"]
            fresh.append(event)
        return fresh

    def _subscribed(self, stream: Stream, message: dict[str, Any], data: dict[str, Any]) -> Outcome:
        position = stream_position(data.get("position"))
        at = message.get("timestamp") if isinstance(message.get("timestamp"), str) else None
        renewal, stream.renewal = stream.renewal, None
        if not stream.answered or renewal is None:
            stream.answered, stream.position, stream.seen_at = True, position, at
            return Outcome(show=[message])
        name = stream.channel
        if data.get("recovered") is True and renewal.since is not None:
            since = renewal.since
            return Outcome(
                show=[message],
                notes=[
                    f"{name}: stream recovered from offset {since['offset']} "
                    f"(epoch {since['epoch']}): the missed events follow"
                ],
            )
        gap = f"between {stream.seen_at or 'the last event'} and {at or 'now'}"
        if data.get("recovered") is False:
            then = (
                "the status snapshot follows"
                if name in SNAPSHOT_CHANNELS
                else "this channel has no snapshot"
            )
            words = f"{name}: stream not recovered: events {gap} are lost; {then}"
        else:
            words = (
                f"{name}: subscribed again; the server does not resume streams, so events "
                f"{gap} are not replayed"
            )
        shown = self._admit(stream, renewal.held)  # nothing replays them
        stream.position, stream.seen_at = position, at
        return Outcome(show=[message, *shown], notes=[words])

    def _refused(self, stream: Stream, message: dict[str, Any]) -> Outcome:
        renewal, stream.renewal = stream.renewal, None
        held = self._admit(stream, renewal.held) if renewal is not None else []
        return Outcome(show=[message, *held])

    def _events_missed(self, message: dict[str, Any], data: dict[str, Any]) -> Outcome:
        renewals = [
            self._renew(stream, "events_missed")
            for stream in self.streams.values()
            if stream.answered and stream.renewal is None
        ]
        span = f" ({data.get('since')} to {data.get('until')})" if data.get("since") else ""
        return Outcome(
            show=[message],
            notes=[f"the server may have missed events{span}; resuming every stream"],
            send=renewals,
        )

    def connection_lost(self) -> None:
        """A connection ended: renewals in flight on it get no answer; the events they held
        back are dropped (the next renewal starts before them, so they come again)."""
        for stream in self.streams.values():
            stream.renewal = None


def reconnect_delay(attempt: int) -> float:
    """Exponential backoff with jitter: half of ``FIRST_DELAY * 2**attempt`` (at most
    ``MAX_DELAY``), plus up to as much again at random."""
    ceiling = min(MAX_DELAY, FIRST_DELAY * 2.0 ** min(attempt, 30))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


# -- watching ----------------------------------------------------------------------------


def parse_frame(frame: str | bytes) -> dict[str, Any]:
    """A frame as the JSON object it holds, or ``{"unparsed": text}``."""
    text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
    try:
        message = json.loads(text)
    except ValueError:
        return {"unparsed": text}
    return message if isinstance(message, dict) else {"unparsed": text}


async def watch_once(
    args: argparse.Namespace, tokens: Tokens, counter: list[int], streams: Streams
) -> int | None:
    """Connect, subscribe (resuming each stream), print messages until the socket closes;
    return the close code (None after ``--count`` messages)."""
    assert tokens.access is not None
    url, kwargs = connect_args(websocket_url(args.url), tokens.access, args.auth)
    refreshing: asyncio.Task[None] | None = None
    async with connect(url, open_timeout=args.timeout, max_size=None, **kwargs) as ws:
        note(f"connected to {websocket_url(args.url)}")
        try:
            # A socket refused at once (4001) is closed while these go out; its error
            # frame, which says why, is still read below.
            with contextlib.suppress(ConnectionClosed):
                for message in streams.subscribe_messages("reconnected"):
                    await ws.send(json.dumps(message))
                for raw in args.send or []:
                    await ws.send(raw)
            async for frame in ws:
                parsed = parse_frame(frame)
                if parsed.get("type") == "error" and parsed.get("channel") == "system":
                    data = parsed.get("data") or {}
                    streams.last_error = f"{data.get('message', '')} ({data.get('code', '?')})"
                outcome = streams.handle(parsed)
                for words in outcome.notes:
                    note(words)
                for shown in outcome.show:
                    print(json.dumps(shown, ensure_ascii=False), flush=True)
                    counter[0] += 1
                    if args.count and counter[0] >= args.count:
                        await ws.close()
                        return None
                for renewal in outcome.send:
                    await ws.send(json.dumps(renewal))
                idle = refreshing is None or refreshing.done()
                if is_token_warning(parsed) and tokens.renewable and idle:
                    refreshing = asyncio.ensure_future(refresh_in_band(ws, tokens))
        except ConnectionClosed:
            pass
        finally:
            streams.connection_lost()
            if refreshing is not None:
                refreshing.cancel()
        code = ws.close_code if ws.close_code is not None else 1006
        note(f"server closed the connection: {code} {ws.close_reason or ''}".rstrip())
        return code


async def watch(args: argparse.Namespace, tokens: Tokens) -> int:
    """Watch until Ctrl-C, ``--count`` messages, or a close that reconnecting cannot fix."""
    counter = [0]
    streams = Streams(subscriptions(args))
    attempt = 0
    while True:
        started = time.monotonic()
        try:
            code = await watch_once(args, tokens, counter, streams)
        except InvalidStatus as exc:
            raise Fatal(
                f"the server refused the handshake: HTTP "
                f"{exc.response.status_code} (is the Origin allowed?)"
            ) from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            if args.no_reconnect:
                raise Fatal(f"cannot connect: {exc}") from None
            delay = reconnect_delay(attempt)
            attempt += 1
            note(f"cannot connect ({exc}); retrying in {delay:.1f}s")
            await asyncio.sleep(delay)
            continue
        if code is None:
            return 0
        if args.no_reconnect or code in FINAL_CLOSE_CODES:
            return 0 if code in (1000, 1001) else 1
        if time.monotonic() - started >= STABLE_AFTER:
            attempt = 0
        if code == AUTH_FAILED:
            if not tokens.renewable:
                why = f": {streams.last_error}" if streams.last_error else " or has expired"
                raise Fatal(f"the server refused the token{why}")
            tokens.renew()
            attempt = 0
            continue
        delay = reconnect_delay(attempt)
        attempt += 1
        note(f"reconnecting in {delay:.1f}s")
        await asyncio.sleep(delay)


async def main_async(args: argparse.Namespace, tokens: Tokens) -> int:
    """Run :func:`watch`, turning SIGINT and SIGTERM into a clean close."""
    task = asyncio.ensure_future(watch(args, tokens))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        note("stopped")
        return 0


# -- command line ----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="ws_watch.py",
        description="Subscribe to SysManage WebSocket channels and print each message "
        "as a JSON line.",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("SYSMANAGE_URL", "http://127.0.0.1:8000"),
        help="server base URL (default: %(default)s)",
    )
    parser.add_argument(
        "--username",
        default=os.environ.get("SYSMANAGE_USERNAME"),
        help="user to log in as (or SYSMANAGE_USERNAME)",
    )
    parser.add_argument(
        "--password",
        help="password (or SYSMANAGE_PASSWORD, or --password-file; asked for when missing)",
    )
    parser.add_argument("--password-file", help="read the password from this file")
    parser.add_argument("--token", help="use this access JWT instead of logging in")
    parser.add_argument(
        "--refresh-token",
        help="a refresh JWT to go with --token: used for new access tokens before the "
        "current one expires (in band) and after the server refused one",
    )
    parser.add_argument(
        "--channel",
        action="append",
        metavar="NAME[=FILTERS]",
        help="channel to subscribe to; repeatable (default: host_status and "
        "fleet_status); NAME={...} gives that channel its own filters",
    )
    parser.add_argument(
        "--filters",
        help="JSON object of filters for every --channel "
        'without its own, e.g. \'{"host_id": "..."}\'',
    )
    parser.add_argument(
        "--send",
        action="append",
        metavar="JSON",
        help="a raw message to send after subscribing; repeatable",
    )
    parser.add_argument(
        "--auth",
        choices=("header", "subprotocol", "query"),
        default="header",
        help="where to put the token (default: %(default)s)",
    )
    parser.add_argument(
        "--count",
        type=int,
        default=0,
        help="exit after this many messages (default: run until Ctrl-C)",
    )
    parser.add_argument(
        "--no-reconnect", action="store_true", help="exit when the server closes the connection"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for HTTP answers and the handshake",
    )
    args = parser.parse_args(argv)
    try:
        subscriptions(args)
    except ValueError as exc:
        parser.error(f"--filters and --channel NAME=FILTERS take JSON objects: {exc}")
    return args


def read_password(args: argparse.Namespace) -> str | None:
    """The password from the options, the environment, a file, or a prompt."""
    if args.password:
        return str(args.password)
    if args.password_file:
        with open(args.password_file, encoding="utf-8") as handle:
            return handle.readline().rstrip("\n")
    if os.environ.get("SYSMANAGE_PASSWORD"):
        return os.environ["SYSMANAGE_PASSWORD"]
    if args.username and sys.stdin.isatty():
        return getpass.getpass(f"Password for {args.username}: ")
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point: log in (unless given a token) and watch."""
    args = parse_args(argv)
    try:
        base_url = args.url = http_base(args.url)
        if args.token is None and args.username is None:
            raise Fatal("give --username (and a password) or --token")
        tokens = Tokens(
            base_url,
            args.username,
            read_password(args) if args.username else None,
            args.token,
            args.timeout,
            args.refresh_token,
        )
        if tokens.access is None:
            tokens.login()
        return asyncio.run(main_async(args, tokens))
    except Fatal as exc:
        note(str(exc))
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the event loop took over the signal
        return 0
    except OSError as exc:
        note(str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
