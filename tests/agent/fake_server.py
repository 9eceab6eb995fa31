"""A small server speaking the agent side of docs/agent-protocol.md, for tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

TOKEN = "test-host-token-5f0c2e9a7d1b"
HOST_ID = "9b1f6c1e-0000-4000-8000-000000000001"

_ID = (str, int)
_NUMBER = (int, float)
#: Required data fields and their types, per agent message type.
SCHEMAS: dict[str, dict[str, Any]] = {
    "hello": {
        "hostname": str,
        "fqdn": str,
        "ip_addresses": list,
        "os_name": str,
        "os_version": str,
        "kernel": str,
        "architecture": str,
        "cpu_count": int,
        "memory_total": int,
        "agent_version": str,
        "capabilities": list,
    },
    "heartbeat": {},
    "metrics": {"timestamp": str, "metrics": dict},
    "command_started": {"execution_id": _ID},
    "command_result": {
        "execution_id": _ID,
        "status": str,
        "exit_code": (int, type(None)),
        "stdout": str,
        "stderr": str,
        "stdout_truncated": bool,
        "stderr_truncated": bool,
        "stdout_bytes": int,
        "stderr_bytes": int,
        "execution_time": float,
        "error": str,
    },
    "package_progress": {"operation_id": _ID, "progress": _NUMBER, "message": str},
    "package_result": {
        "operation_id": _ID,
        "status": str,
        "exit_code": (int, type(None)),
        "output": str,
        "output_truncated": bool,
        "output_bytes": int,
        "message": str,
    },
    "patch_status": {
        "updates": (list, type(None)),
        "update_count": (int, type(None)),
        "security_count": (int, type(None)),
        "reboot_required": (bool, type(None)),
    },
}
RESULT_IDS = {"command_result": "execution_id", "package_result": "operation_id"}


def problems_with(message: Any) -> list[str]:
    """What is wrong with an agent message according to the protocol (empty if nothing)."""
    if not isinstance(message, dict):
        return ["not an object"]
    kind, data = message.get("type"), message.get("data")
    if kind not in SCHEMAS or not isinstance(data, dict):
        return [f"unknown type or missing data: {message!r:.200}"]
    found = [
        f"{kind}.{name} missing or not {expected}"
        for name, expected in SCHEMAS[kind].items()
        if name not in data
        or not isinstance(data[name], expected)
        or (expected is int and isinstance(data[name], bool))
    ]
    try:
        datetime.fromisoformat(message["timestamp"].replace("Z", "+00:00"))
        assert message["timestamp"].endswith("Z")
    except (KeyError, AttributeError, ValueError, AssertionError):
        found.append(f"{kind}: bad timestamp {message.get('timestamp')!r}")
    return found


@dataclass
class Connection:
    """One agent connection as the server saw it."""

    index: int
    path: str
    headers: Headers
    websocket: ServerConnection
    closed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Received:
    """A message and the index of the connection it came on."""

    connection: int
    message: dict[str, Any]

    @property
    def type(self) -> str:
        """The message type."""
        return self.message["type"]

    @property
    def data(self) -> dict[str, Any]:
        """The message data."""
        return self.message["data"]


class FakeServer:
    """Accepts agents on ``/ws/agent``, welcomes them, records and acknowledges messages."""

    def __init__(
        self, token: str = TOKEN, heartbeat_interval: float = 0.3, metrics_interval: float = 0.3
    ) -> None:
        """Configure the token and the intervals sent in ``welcome``."""
        self.token = token
        self.intervals = {
            "heartbeat_interval": heartbeat_interval,
            "metrics_interval": metrics_interval,
        }
        self.auto_ack = True
        self.reject_code: int | None = None
        self.http_status: int | None = None
        self.port = 0
        self.connections: list[Connection] = []
        self.received: list[Received] = []
        self.violations: list[str] = []
        self._changed = asyncio.Condition()
        self._server: Server | None = None

    @property
    def url(self) -> str:
        """The base URL an agent is given."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (on the previous port again after a stop)."""
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            self.port,
            max_size=1 << 20,
            process_request=self._process_request,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and close every connection (1001)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def send(self, type_: str, data: dict[str, Any], connection: int = -1) -> None:
        """Send a message to an agent connection (the latest by default)."""
        message = {"type": type_, "data": data, "timestamp": "2024-01-01T12:00:00.000Z"}
        await self.connections[connection].websocket.send(json.dumps(message))

    async def run_command(self, execution_id: str, command: str, timeout: float = 10) -> None:
        """Ask the agent to run ``command``."""
        await self.send(
            "run_command", {"execution_id": execution_id, "command": command, "timeout": timeout}
        )

    async def ack(self, kind: str, ref: str, connection: int = -1) -> None:
        """Acknowledge a result."""
        await self.send("ack", {"kind": kind, "ref": ref}, connection)

    async def drop(self, code: int = 1012) -> None:
        """Close the latest connection from the server side."""
        await self.connections[-1].websocket.close(code, "test drop")

    def messages(
        self, type_: str | None = None, where: Callable[[Received], bool] = lambda item: True
    ) -> list[Received]:
        """Messages received so far, optionally of one type and matching ``where``."""
        return [
            item for item in self.received if (type_ is None or item.type == type_) and where(item)
        ]

    async def wait_for(
        self,
        type_: str,
        where: Callable[[Received], bool] = lambda item: True,
        timeout: float = 10.0,
        count: int = 1,
    ) -> list[Received]:
        """Wait until ``count`` matching messages have arrived; return them."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.messages(type_, where)) >= count)
        return self.messages(type_, where)[:count]

    async def wait_for_connections(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` connections have been made."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.connections) >= count)

    async def result(self, execution_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for the ``command_result`` of ``execution_id``; return its data."""
        found = await self.wait_for(
            "command_result", lambda item: item.data["execution_id"] == execution_id, timeout
        )
        return found[0].data

    async def _notify(self) -> None:
        """Wake up everything waiting in :meth:`wait_for`."""
        async with self._changed:
            self._changed.notify_all()

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Refuse the handshake with an HTTP status when the test asks for it."""
        if self.http_status is None:
            return None
        self.connections.append(
            Connection(len(self.connections), request.path, request.headers, connection)
        )
        await self._notify()
        return connection.respond(HTTPStatus(self.http_status), "refused by test\n")

    async def _handle(self, websocket: ServerConnection) -> None:
        """Serve one agent connection."""
        request = websocket.request
        assert request is not None
        connection = Connection(len(self.connections), request.path, request.headers, websocket)
        self.connections.append(connection)
        await self._notify()
        try:
            if await self._refuse(connection):
                return
            async for raw in websocket:
                await self._on_message(connection, json.loads(raw))
        except ConnectionClosed:
            pass
        finally:
            connection.closed.set()
            await self._notify()

    async def _refuse(self, connection: Connection) -> bool:
        """Close a connection with a wrong token (4001) or a test-chosen code."""
        websocket = connection.websocket
        if connection.headers.get("Authorization") != f"Bearer {self.token}":
            await websocket.send(
                json.dumps(
                    {
                        "type": "error",
                        "channel": "system",
                        "timestamp": "2024-01-01T12:00:00.000Z",
                        "data": {
                            "code": "AUTH_FAILED",
                            "message": "Invalid host token",
                            "action": "reconnect_with_valid_token",
                        },
                    }
                )
            )
            await websocket.close(4001, "authentication failed")
            return True
        if self.reject_code is not None:
            await websocket.close(self.reject_code, "rejected by test")
            return True
        return False

    async def _on_message(self, connection: Connection, message: dict[str, Any]) -> None:
        """Check and record a message; welcome ``hello`` and acknowledge results."""
        self.violations.extend(problems_with(message))
        self.received.append(Received(connection.index, message))
        await self._notify()
        kind = message.get("type")
        if kind == "hello":
            await connection.websocket.send(
                json.dumps(
                    {
                        "type": "welcome",
                        "timestamp": "2024-01-01T12:00:00.000Z",
                        "data": {
                            "host_id": HOST_ID,
                            "server_time": "2024-01-01T12:00:00.000Z",
                            **self.intervals,
                        },
                    }
                )
            )
        elif kind in RESULT_IDS and self.auto_ack:
            ref = message["data"][RESULT_IDS[kind]]
            ack = {
                "type": "ack",
                "data": {"kind": kind, "ref": ref},
                "timestamp": "2024-01-01T12:00:00.000Z",
            }
            if "id" in message:
                ack["id"] = message["id"]
            await connection.websocket.send(json.dumps(ack))
