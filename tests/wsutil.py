"""Helpers for talking to the consumers through Channels' WebsocketCommunicator."""

from __future__ import annotations

from typing import Any

from channels.testing import WebsocketCommunicator

from sysmanage.asgi import application


async def open_socket(
    path: str = "/ws",
    *,
    token: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    subprotocols: list[str] | None = None,
) -> WebsocketCommunicator:
    """Connect to ``path`` (with ``?token=`` when given) and return the communicator."""
    if token is not None:
        path = f"{path}?token={token}"
    communicator = WebsocketCommunicator(
        application, path, headers=headers or [], subprotocols=subprotocols
    )
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def request(
    comm: WebsocketCommunicator, message: dict[str, Any], timeout: float = 3
) -> dict[str, Any]:
    """Send ``message`` and return the next message received."""
    await comm.send_json_to(message)
    return await comm.receive_json_from(timeout=timeout)


async def subscribe(
    comm: WebsocketCommunicator, channel: str, filters: dict | None = None, id_: str = "sub"
) -> dict[str, Any]:
    """Subscribe and return the response; the status snapshot, if any, stays queued."""
    message: dict[str, Any] = {"type": "subscribe", "channel": channel, "id": id_}
    if filters is not None:
        message["filters"] = filters
    reply = await request(comm, message)
    assert reply["type"] == "response", reply
    return reply


async def subscribe_with_status(
    comm: WebsocketCommunicator, channel: str, filters: dict | None = None, id_: str = "sub"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Subscribe to a channel that sends its current state; return the response and the
    ``status`` message, which must come next, with the same id (no event is published
    meanwhile in the tests that use this)."""
    reply = await subscribe(comm, channel, filters, id_)
    status = await comm.receive_json_from(timeout=3)
    assert (status["type"], status["channel"], status.get("id")) == ("status", channel, id_), status
    return reply, status


async def expect_close(comm: WebsocketCommunicator, timeout: float = 3) -> int:
    """Wait for the server to close the socket; return the close code."""
    output = await comm.receive_output(timeout=timeout)
    assert output["type"] == "websocket.close", output
    return int(output.get("code", 1000))


async def next_event(
    comm: WebsocketCommunicator, channel: str, timeout: float = 3
) -> dict[str, Any]:
    """Skip ``status`` and other channels' messages until an event on ``channel`` arrives."""
    while True:
        message = await comm.receive_json_from(timeout=timeout)
        if message["type"] == "event" and message["channel"] == channel:
            return message
