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
connection and its subscriptions carry on.  When the server closes the connection (the
token was refused, the server restarted) it gets a new token and reconnects, unless
``--no-reconnect`` is given.  Ctrl-C closes the socket and exits.

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
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Literal, NotRequired, TypedDict

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

#: Close codes after which reconnecting would only fail again.
FINAL_CLOSE_CODES = {4003, 4008, 4029, 1009}
AUTH_FAILED = 4001


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


class Subscribe(TypedDict):
    """A ``subscribe`` message of the WebSocket API."""

    type: Literal["subscribe"]
    channel: str
    id: str
    filters: NotRequired[object]


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


async def watch_once(args: argparse.Namespace, tokens: Tokens, counter: list[int]) -> int | None:
    """Connect, subscribe, print messages until the socket closes; return the close code."""
    assert tokens.access is not None
    url, kwargs = connect_args(websocket_url(args.url), tokens.access, args.auth)
    refreshing: asyncio.Task[None] | None = None
    async with connect(url, open_timeout=args.timeout, max_size=None, **kwargs) as ws:
        note(f"connected to {websocket_url(args.url)}")
        for message in subscriptions(args):
            await ws.send(json.dumps(message))
        for raw in args.send or []:
            await ws.send(raw)
        try:
            async for frame in ws:
                text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
                try:
                    parsed = json.loads(text)
                    line = json.dumps(parsed, ensure_ascii=False)
                except ValueError:
                    parsed, line = None, json.dumps({"unparsed": text})
                print(line, flush=True)
                counter[0] += 1
                if args.count and counter[0] >= args.count:
                    await ws.close()
                    return None
                idle = refreshing is None or refreshing.done()
                if is_token_warning(parsed) and tokens.renewable and idle:
                    refreshing = asyncio.ensure_future(refresh_in_band(ws, tokens))
        except ConnectionClosed:
            pass
        finally:
            if refreshing is not None:
                refreshing.cancel()
        code = ws.close_code if ws.close_code is not None else 1006
        note(f"server closed the connection: {code} {ws.close_reason or ''}".rstrip())
        return code


async def watch(args: argparse.Namespace, tokens: Tokens) -> int:
    """Watch until Ctrl-C, ``--count`` messages, or a close that reconnecting cannot fix."""
    counter = [0]
    delay = 1.0
    while True:
        try:
            code = await watch_once(args, tokens, counter)
        except InvalidStatus as exc:
            raise Fatal(
                f"the server refused the handshake: HTTP "
                f"{exc.response.status_code} (is the Origin allowed?)"
            ) from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            if args.no_reconnect:
                raise Fatal(f"cannot connect: {exc}") from None
            note(f"cannot connect ({exc}); retrying in {delay:.0f}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            continue
        if code is None:
            return 0
        if args.no_reconnect or code in FINAL_CLOSE_CODES:
            return 0 if code in (1000, 1001) else 1
        if code == AUTH_FAILED:
            if not tokens.renewable:
                raise Fatal("the token was refused or has expired")
            tokens.renew()
            delay = 1.0
            continue
        note(f"reconnecting in {delay:.0f}s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30.0)


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
