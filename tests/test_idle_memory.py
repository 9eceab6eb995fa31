"""What one more idle socket costs the server in memory, counted by tracemalloc.

The server's own code paths -- Daphne's HTTP and WebSocket protocols (through
``sysmanage.serve``'s server), Autobahn, the routing and middleware of
``sysmanage.asgi`` and the consumers -- serve sockets over Twisted's in-memory transport
in this process: a subscribed ``/ws`` client (``host_status`` of one host and
``fleet_status``, snapshots read) and an agent past ``hello``.  Once a socket is idle
its client side is dropped, so what stays allocated after the warm-up sockets is what
the server keeps per socket.  Only the operating system's socket and Twisted's TCP
transport (about 1 KB more, see docs/benchmarks.md) are not counted.

The tests run in a pytest process of their own (``test_idle_memory_isolated.py`` starts
it, with ``SYSMANAGE_MEASURE_MEMORY=1``): after the rest of the suite, tasks, caches and
permission sets of earlier modules' sockets showed up as 1-2 KB "per socket" that a server
process does not keep.

The bounds are a little above what was measured when they were set (the growth over
many sockets, so a one-off allocation or a table resize counts for little); a change
that keeps more per idle socket -- a task, a queue, a timer, a copy of the scope --
fails here with the lines that allocated most.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import os
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import coverage
import pytest
from daphne.http_protocol import HTTPFactory
from daphne.ws_protocol import WebSocketFactory
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from hosts import services as host_services
from sysmanage.asgi import application
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.serve import RedactingServer

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        os.environ.get("SYSMANAGE_MEASURE_MEMORY") != "1",
        reason="measured in a process of its own (tests/test_idle_memory_isolated.py)",
    ),
]

#: bytes per idle subscribed ``/ws`` client (16.4 KB when set, 2026-12-05; 19.3 KB
#: before the opening handshake was let go)
CLIENT_BOUND = 17_800
#: bytes per idle agent on ``/ws/agent`` (14.7 KB when set; 16.2 KB before)
AGENT_BOUND = 15_900
#: sockets opened before counting, and counted
WARMUP = 15
MEASURED = 100
#: frames kept per allocation; more (say 12) groups the report by call path
FRAMES = 1
#: allocating lines (or call paths) shown when a bound is passed
TOP = 15


class Served:
    """Daphne, as ``python -m sysmanage.serve`` runs it, serving the real application
    over in-memory transports."""

    def __init__(self) -> None:
        self.server = RedactingServer(application, endpoints=["tcp:port=0"])
        self.server.connections = {}
        # What Daphne's Server.run makes before it listens (the command line's options).
        self.server.ws_factory = WebSocketFactory(self.server, server="Daphne")
        self.server.ws_factory.setProtocolOptions(
            autoPingTimeout=self.server.ping_timeout,
            allowNullOrigin=True,
            openHandshakeTimeout=self.server.websocket_handshake_timeout,
        )
        self.server.http_factory = HTTPFactory(self.server)
        self.port = 40000

    async def open(
        self,
        path: str,
        headers: dict[str, str],
        requests: list[tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]],
    ) -> None:
        """Open one socket, send each request and wait for the reply it names, then
        drop the client side (the server's side stays open)."""
        self.port += 1
        peer = IPv4Address("TCP", "127.0.0.1", self.port)
        channel = self.server.http_factory.buildProtocol(peer)
        transport = StringTransport(
            peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 8000)
        )
        channel.makeConnection(transport)
        client = ClientProtocol(parse_uri(f"ws://testserver{path}"))
        request = client.connect()
        for name, value in headers.items():
            request.headers[name] = value
        client.send_request(request)
        pending = list(requests)

        def pump() -> bool:
            for data in client.data_to_send():
                if data:
                    # The HTTP channel until the upgrade, then the WebSocket protocol; in a
                    # context of its own, as under the reactor: the connection's task
                    # starts from a copy of it, and this test's carries what other tests
                    # left in asgiref's context-local storage.
                    receiver = getattr(transport, "protocol", channel)
                    contextvars.Context().run(receiver.dataReceived, data)
            received = transport.value()
            transport.clear()
            if received:
                client.receive_data(received)
            send_next = False
            for event in client.events_received():
                if isinstance(event, Response):
                    assert client.handshake_exc is None, client.handshake_exc
                    send_next = True
                elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                    message = json.loads(event.data)
                    assert message.get("type") != "error", message
                    if pending[0][1](message):
                        pending.pop(0)
                        send_next = True
                elif isinstance(event, Frame) and event.opcode is Opcode.CLOSE:
                    raise AssertionError(f"the server closed the socket: {event.data!r}")
            if send_next and pending:
                client.send_text(json.dumps(pending[0][0]).encode())
            return not pending

        for _ in range(2000):
            if pump():
                return
            await asyncio.sleep(0.002)
        raise AssertionError(f"the socket on {path} did not get its replies")

    def reap(self) -> None:
        """What Daphne's application checker does every second: forget the protocols
        that are done (the HTTP requests that were upgraded, among others)."""
        for protocol, details in list(self.server.connections.items()):
            if "disconnected" in details and "application_instance" not in details:
                del self.server.connections[protocol]

    def stop(self) -> None:
        for details in self.server.connections.values():
            instance = details.get("application_instance")
            if instance is not None:
                instance.cancel()


async def growth_per_socket(
    served: Served, open_one: Callable[[int], Awaitable[None]]
) -> tuple[float, str]:
    """Open ``WARMUP`` sockets, then ``MEASURED`` more; return the bytes per socket that
    stayed allocated over the latter, and the lines that allocated most."""
    for index in range(WARMUP):
        await open_one(index)
    await asyncio.sleep(0.05)
    served.reap()
    gc.collect()
    # The suite runs under coverage, whose tracer allocates as lines run: a socket would
    # seem to keep what coverage keeps.  It is paused while the sockets are counted.
    measuring = coverage.Coverage.current()
    if measuring is not None:
        measuring.stop()
    tracemalloc.start(FRAMES)
    try:
        before = tracemalloc.take_snapshot()
        for index in range(WARMUP, WARMUP + MEASURED):
            await open_one(index)
        await asyncio.sleep(0.05)
        served.reap()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
        if measuring is not None:
            measuring.start()
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, __file__),
        tracemalloc.Filter(False, "*/twisted/internet/testing.py"),
    ]
    stats = after.filter_traces(ignore).compare_to(
        before.filter_traces(ignore), "traceback" if FRAMES > 1 else "lineno"
    )
    grown = sum(stat.size_diff for stat in stats)
    top = "\n".join(
        f"{stat.size_diff / MEASURED:8.0f} B  "
        + " < ".join(str(f) for f in reversed(list(stat.traceback)[-FRAMES:]))
        for stat in stats[:TOP]
    )
    return grown / MEASURED, top


@pytest.fixture
async def served():
    served = Served()
    yield served
    served.stop()
    await asyncio.sleep(0.05)


async def test_an_idle_subscribed_client_keeps_little(served, make_user, token_for, settings):
    settings.WS_MAX_SOCKETS_PER_USER = 0  # one user holds every socket here
    user = await database_sync_to_async(make_user)("watcher", staff=True, perms=["hosts.view_host"])
    token = token_for(user)
    hosts = await database_sync_to_async(
        lambda: [str(host_services.host_create(hostname=f"idle-{i:03d}").id) for i in range(20)]
    )()

    async def open_client(index: int) -> None:
        def answers(id_: str) -> Callable[[dict[str, Any]], bool]:
            return lambda m: m["type"] == "status" and m.get("id") == id_

        host_status = {
            "type": "subscribe",
            "channel": "host_status",
            "filters": {"host_id": hosts[index % len(hosts)]},
            "id": "h",
        }
        fleet = {"type": "subscribe", "channel": "fleet_status", "id": "f"}
        await served.open(
            f"/ws?token={token}", {}, [(host_status, answers("h")), (fleet, answers("f"))]
        )

    per_socket, top = await growth_per_socket(served, open_client)
    assert per_socket <= CLIENT_BOUND, f"{per_socket:.0f} B per idle client:\n{top}"


async def test_an_idle_agent_keeps_little(served):
    tokens = await database_sync_to_async(
        lambda: [
            host_services.host_register(hostname=f"agent-{i:03d}")[1]
            for i in range(WARMUP + MEASURED)
        ]
    )()

    async def open_agent(index: int) -> None:
        hello = {
            "type": "hello",
            "data": {"hostname": f"agent-{index:03d}", "cpu_count": 4, "agent_version": "t"},
        }
        await served.open(
            "/ws/agent",
            {"Authorization": f"Bearer {tokens[index]}"},
            [(hello, lambda m: m["type"] == "welcome")],
        )

    per_socket, top = await growth_per_socket(served, open_agent)
    assert per_socket <= AGENT_BOUND, f"{per_socket:.0f} B per idle agent:\n{top}"
