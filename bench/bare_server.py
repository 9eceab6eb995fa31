"""
A bare ``websockets`` broadcast server: the baseline the fan-out benchmark compares to.

Every connection is a subscriber except those opened on :data:`PUBLISH_PATH`.  Each
text message a publisher sends is pushed unchanged to every subscriber with
:func:`websockets.asyncio.server.broadcast` (one framing per recipient, no parsing, no
filtering, no channel layer).  A subscriber gets one greeting when it is registered,
so that a client knows it will receive everything published after that.

Run by ``bench/fanout.py``; on its own::

    python bench/bare_server.py --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal

from websockets.asyncio.server import ServerConnection, broadcast, serve

#: Connections opened on this path publish; all others subscribe.
PUBLISH_PATH = "/publish"
#: The greeting a subscriber receives once it is registered for broadcasts.
GREETING = json.dumps({"type": "response", "channel": "bench", "data": {"status": "ready"}})


class BroadcastServer:
    """Keeps the set of subscribers and relays publishers' messages to all of them."""

    def __init__(self) -> None:
        self.subscribers: set[ServerConnection] = set()

    async def handle(self, conn: ServerConnection) -> None:
        """Serve one connection until it closes."""
        if conn.request is not None and conn.request.path.startswith(PUBLISH_PATH):
            async for message in conn:
                broadcast(self.subscribers, message)
            return
        self.subscribers.add(conn)
        try:
            await conn.send(GREETING)
            await conn.wait_closed()
        finally:
            self.subscribers.discard(conn)


async def main(host: str, port: int) -> None:
    """Serve on ``host:port`` until SIGTERM or SIGINT."""
    relay = BroadcastServer()
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.cancel)
    # No compression: Daphne does not negotiate permessage-deflate either.
    async with serve(
        relay.handle, host, port, compression=None, max_size=2**20, ping_interval=None, backlog=1024
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
