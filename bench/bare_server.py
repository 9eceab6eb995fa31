"""
A bare ``websockets`` server doing the fan-out benchmark's job with nothing else: the
baseline the real server is compared to.

Three paths, as on the real server (``docs/agent-protocol.md``,
``docs/websocket-protocol.md``) but with no authentication, database or channel layer:

``/ws/agent``
    An agent: its bearer token is taken as its host id.  ``hello`` is answered with
    ``welcome``; each ``metrics`` report becomes one ``host_metrics`` event (the payload
    and envelope the real server sends, numbered on the channel), serialized once and
    sent with :func:`websockets.asyncio.server.broadcast` to the subscribers of that host.
``/publish``
    The shortcut: each message is an event's payload, published as above.
``/ws`` (anything else)
    A subscriber: ``subscribe`` to ``host_metrics`` with a ``host_id`` filter gets a
    ``response`` and from then on that host's events.

Run by ``bench/fanout.py``; on its own::

    python bench/bare_server.py --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast, serve

PUBLISH_PATH = "/publish"
AGENT_PATH = "/ws/agent"
CHANNEL = "host_metrics"


def iso_now() -> str:
    """The current time as the real server formats it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dumps(message: dict[str, Any]) -> str:
    """Compact JSON, as the real server serializes its messages."""
    return json.dumps(message, separators=(",", ":"))


class FanOutServer:
    """Subscribers by host, and the events sent to them."""

    def __init__(self) -> None:
        self.by_host: dict[str, set[ServerConnection]] = defaultdict(set)
        self.epoch = secrets.token_urlsafe(6)
        self.offset = 0

    async def handle(self, conn: ServerConnection) -> None:
        """Serve one connection until it closes."""
        path = conn.request.path if conn.request is not None else "/"
        if path.startswith(AGENT_PATH):
            await self.agent(conn)
        elif path.startswith(PUBLISH_PATH):
            async for message in conn:
                self.publish(json.loads(message))
        else:
            await self.subscriber(conn)

    async def agent(self, conn: ServerConnection) -> None:
        """An agent: ``welcome`` its ``hello``, publish its ``metrics``."""
        assert conn.request is not None
        host_id = conn.request.headers.get("Authorization", "").removeprefix("Bearer ")
        hostname, cpu_count = "", None
        async for raw in conn:
            message = json.loads(raw)
            kind, data = message.get("type"), message.get("data") or {}
            if kind == "metrics":
                self.publish(
                    {
                        "host_id": host_id,
                        "hostname": hostname,
                        "timestamp": iso_now(),
                        "metrics": data.get("metrics"),
                        "cpu_count": cpu_count,
                    }
                )
            elif kind == "hello":
                hostname, cpu_count = data.get("hostname", ""), data.get("cpu_count")
                await conn.send(dumps({"type": "welcome", "data": {"host_id": host_id}}))

    def publish(self, data: dict[str, Any]) -> None:
        """Send one event to the subscribers of its host, serialized once."""
        self.offset += 1
        subscribers = self.by_host.get(data["host_id"])
        if subscribers:
            event = {
                "type": "event",
                "channel": CHANNEL,
                "data": data,
                "timestamp": iso_now(),
                "offset": self.offset,
                "epoch": self.epoch,
            }
            broadcast(subscribers, dumps(event))

    async def subscriber(self, conn: ServerConnection) -> None:
        """A subscriber: each ``subscribe`` files it under the host of its filter."""
        hosts: set[str] = set()
        try:
            async for raw in conn:
                message = json.loads(raw)
                host_id = (message.get("filters") or {}).get("host_id")
                if message.get("type") != "subscribe" or not host_id:
                    continue
                self.by_host[host_id].add(conn)
                hosts.add(host_id)
                answer = {"status": "subscribed", "filters": {"host_id": host_id}}
                reply = {"type": "response", "channel": CHANNEL, "data": answer}
                await conn.send(dumps({**reply, "timestamp": iso_now(), "id": message.get("id")}))
        finally:
            for host_id in hosts:
                self.by_host[host_id].discard(conn)


async def main(host: str, port: int) -> None:
    """Serve on ``host:port`` until SIGTERM or SIGINT."""
    server = FanOutServer()
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.cancel)
    # No compression: Daphne does not negotiate permessage-deflate either.
    async with serve(
        server.handle,
        host,
        port,
        compression=None,
        max_size=2**20,
        ping_interval=None,
        backlog=1024,
    ):
        print(f"listening on ws://{host}:{port}", flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args()
    asyncio.run(main(options.host, options.port))
