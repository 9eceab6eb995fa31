"""
The floor of agent ingest: a bare ASGI application under Daphne, for ``bench/agents.py
--floor``.

It does only what any server must do with an agent's frame: Daphne receives it, the
application gets it and parses its JSON.  ``hello`` gets a ``welcome``; metrics and
heartbeats are parsed and dropped.  On ``/ws`` every text frame gets a one-line reply,
enough for the benchmark to see the server answering.  No Django, no database, no hub:
the server CPU it costs per message is what the real server cannot go below on Daphne.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def application(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """One WebSocket connection (anything else is refused)."""
    if scope["type"] != "websocket":
        return
    agent = scope["path"] == "/ws/agent"
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif kind == "websocket.disconnect":
            return
        elif kind == "websocket.receive" and message.get("text") is not None:
            frame = json.loads(message["text"])
            if not agent:
                await send({"type": "websocket.send", "text": '{"type":"pong"}'})
            elif frame.get("type") == "hello":
                welcome = {"type": "welcome", "data": {"host_id": "floor"}}
                await send({"type": "websocket.send", "text": json.dumps(welcome)})
