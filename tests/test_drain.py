"""Draining a server process before it stops (``sysmanage.drain``): the schedule of closes,
agents owing results, readiness, the 1012 close of each kind of socket, and the refused
handshake (through Daphne's own code paths, as ``tests/test_serve.py`` drives them)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
from channels.db import database_sync_to_async

from hosts import services
from hosts.models import Host
from sysmanage import drain
from sysmanage.serve import RedactingServer
from tests.test_agent_consumer import (
    agent_socket,
    client_socket,
    hello,
    next_of,
    run_agent_side_result,
)
from tests.test_serve import UPGRADE, Upgraded


@pytest.fixture(autouse=True)
def _not_draining() -> Iterator[None]:
    """Each test starts and ends with a process that is not draining."""
    drain._since = None
    drain._open.clear()
    yield
    drain._since = None
    drain._open.clear()


class FakeSocket:
    """A socket as the drain sees it."""

    def __init__(self, name: str, owes: bool = False) -> None:
        self.name = name
        self.owes = owes
        self.closed_at: float | None = None
        self.clock = 0.0

    def close_for_restart(self) -> None:
        assert self.closed_at is None, f"{self.name} closed twice"
        self.closed_at = self.clock
        drain.forget(self)

    def owes_results(self) -> bool:
        return self.owes


def test_closes_are_spread_evenly_over_the_window():
    assert [drain.due(10, t, 10.0) for t in (0, 0.99, 1.0, 5.5, 9.99, 10, 11)] == [
        1,
        1,
        2,
        6,
        10,
        10,
        10,
    ]
    assert drain.due(0, 0, 10) == 0
    assert drain.due(5, 0, 0) == 5  # no window: all at once
    assert drain.due(20_000, 0.5, 10) == 1001  # a twentieth per half second


def test_the_last_clients_are_closed_in_time_to_be_back_within_the_window():
    assert drain.spread(10.0) == 8.0  # 2 s to reconnect elsewhere
    assert drain.spread(30.0) == 28.0  # at most 2 s
    assert drain.spread(1.0) == 0.8  # a fifth of a short window
    assert drain.spread(0.0) == 0.0
    plan = drain.Drain(10.0)
    sockets = [FakeSocket(f"s{i}") for i in range(1000)]
    for conn in sockets:
        drain.track(conn)
    for step in range(101):
        for conn in sockets:
            conn.clock = step / 10
        plan.step(step / 10)
    assert max(s.closed_at for s in sockets if s.closed_at is not None) <= 8.0
    assert plan.closed == 1000


def run_schedule(sockets: list[FakeSocket], window: float, until: float) -> drain.Drain:
    plan = drain.Drain(window)
    for conn in sockets:
        drain.track(conn)
    t = 0.0
    while t <= until:
        for conn in sockets:
            conn.clock = t
        plan.step(t)
        t = round(t + 0.1, 1)
    return plan


def test_each_socket_is_closed_once_at_its_turn():
    sockets = [FakeSocket(f"s{i}") for i in range(4)]
    plan = run_schedule(sockets, window=2.0, until=3.0)
    # over the first 1.6 s: the last 0.4 s are for reconnecting elsewhere
    assert sorted(s.closed_at for s in sockets) == [0.0, 0.4, 0.8, 1.2]  # in any order
    assert plan.done()
    assert (plan.closed, plan.waited) == (4, 0)


def test_an_agent_owing_results_is_closed_once_they_came_or_the_window_ended():
    owing = FakeSocket("agent", owes=True)
    stuck = FakeSocket("stuck agent", owes=True)
    others = [FakeSocket("a"), FakeSocket("b")]
    plan = drain.Drain(2.0)
    for conn in [owing, stuck, *others]:
        drain.track(conn)
    for step in range(31):
        t = step / 10
        for conn in [owing, stuck, *others]:
            conn.clock = t
        if t == 1.2:
            owing.owes = False  # its result arrived
        plan.step(t)
    # turns at 0, 0.4, 0.8 and 1.2, in any order: the others close at theirs, the agent
    # whose result came at 1.2 then (or at its turn), the other at the end of the window
    assert all(s.closed_at in (0.0, 0.4, 0.8, 1.2) for s in others)
    assert owing.closed_at == 1.2
    assert stuck.closed_at == 2.0
    assert plan.closed == 4


def test_sockets_freed_once_closed_do_not_hold_up_the_others():
    """A closed socket's consumer is freed once its connection ends; the schedule must
    still reach every socket (it once counted the live ones, and stopped short)."""
    alive = {i: FakeSocket(f"s{i}") for i in range(6)}
    closed: list[float] = []
    plan = drain.Drain(1.0)
    for conn in alive.values():
        drain.track(conn)
    for step in range(12):
        t = step / 10
        for conn in alive.values():
            conn.clock = t
        plan.step(t)
        for key, conn in list(alive.items()):
            if conn.closed_at is not None:
                closed.append(conn.closed_at)
                del alive[key]  # the last reference: the socket is gone
        gc.collect()
    assert len(closed) == 6
    assert plan.done()


def test_a_socket_accepted_while_draining_is_closed_too():
    first = FakeSocket("first")
    plan = drain.Drain(1.0)
    drain.track(first)
    plan.step(0.0)
    late = FakeSocket("late")
    drain.track(late)  # its handshake was under way when the drain began
    late.clock = 1.0
    plan.step(1.0)
    assert late.closed_at == 1.0
    assert plan.done()


async def test_drain_returns_once_every_socket_is_closed_and_every_handler_done():
    sockets = [FakeSocket(f"s{i}") for i in range(3)]
    for conn in sockets:
        drain.track(conn)
    settled = asyncio.Event()

    async def settle() -> None:
        settled.set()

    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.wait_for(drain.drain(0.3, busy=lambda: len(drain._open), settle=settle), 5)
    took = loop.time() - start
    assert all(conn.closed_at is not None for conn in sockets)
    assert settled.is_set()
    assert drain.draining()
    assert 0.15 <= took < 1.0


async def test_drain_waits_for_running_handlers_but_not_forever(monkeypatch):
    monkeypatch.setattr(drain, "FINISH_SECONDS", 0.3)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.wait_for(drain.drain(0.0, busy=lambda: 1), 5)
    assert 0.25 <= loop.time() - start < 1.0


def test_readiness_says_draining(client, db):
    assert client.get("/readyz").status_code == 200
    drain.begin()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "draining"
    assert response.json()["since"].endswith("Z")


# -- the consumers ------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_a_client_socket_is_closed_with_1012(make_user, token_for):
    client = await client_socket(make_user, token_for)
    assert len(drain._open) == 1
    (conn,) = list(drain._open)
    assert not conn.owes_results()
    conn.close_for_restart()
    closed = await client.receive_output(timeout=3)
    assert closed == {"type": "websocket.close", "code": 1012}
    await client.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_an_agent_owes_the_results_of_the_work_it_was_sent(make_user, token_for):
    host, token = await database_sync_to_async(services.host_register)(hostname="drain-01")
    agent = await agent_socket(token)
    await hello(agent)
    (conn,) = list(drain._open)
    assert not conn.owes_results()
    client = await client_socket(make_user, token_for)
    await client.send_json_to(
        {
            "type": "command",
            "channel": "command_execution",
            "data": {"host_id": str(host.id), "command": "true", "timeout": 30},
            "id": "c1",
        }
    )
    order = await next_of(agent, "run_command")
    assert conn.owes_results()
    await run_agent_side_result(agent, order["data"]["execution_id"])
    assert not conn.owes_results()
    conn.close_for_restart()
    assert (await next_of_close(agent)) == 1012
    await client.disconnect()


async def next_of_close(comm) -> int:
    while True:
        output = await comm.receive_output(timeout=3)
        if output["type"] == "websocket.close":
            return output["code"]


# -- Daphne ---------------------------------------------------------------------------


async def test_a_handshake_while_draining_gets_503_before_any_application():
    served = Upgraded(RedactingServer)
    drain.begin()
    # Daphne resumes reading from the connection after handing it over, by then dropped;
    # a TCP transport ignores that, the in-memory one raises.
    served.transport.resumeProducing = lambda: None
    try:
        served.channel.dataReceived(UPGRADE)
        for _ in range(100):
            if served.transport.value():
                break
            await asyncio.sleep(0.01)
        answer = served.transport.value()
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
        assert b"Retry-After: 1\r\n" in answer
        assert served.received == []  # the application never saw it
        served.transport.loseConnection()
    finally:
        served.stop()


async def test_1012_goes_out_as_a_close_frame():
    served = Upgraded(RedactingServer)
    try:
        await served.handshake()
        protocol = served.transport.protocol
        served.transport.clear()
        protocol.serverClose(code=drain.SERVICE_RESTART)
        frame = served.transport.value()
        assert frame[0] == 0x88  # FIN + close
        assert frame[2:4] == (1012).to_bytes(2, "big")
        assert frame[4:] == b"service restart"
    finally:
        served.stop()


@pytest.mark.django_db(transaction=True)
async def test_an_agent_sent_away_by_a_drain_leaves_its_host_online():
    """A restart must not flap every host offline and back (raising and resolving their
    "host offline" alerts): the agent reconnects to another process within a second."""
    host, token = await database_sync_to_async(services.host_register)(hostname="drain-02")
    agent = await agent_socket(token)
    await hello(agent)
    drain.begin()
    (conn,) = list(drain._open)
    conn.close_for_restart()
    assert (await next_of_close(agent)) == 1012
    await agent.disconnect()
    host = await database_sync_to_async(Host.objects.get)(id=host.id)
    assert host.status == "online"


@pytest.mark.django_db(transaction=True)
async def test_an_agent_that_leaves_otherwise_takes_its_host_offline():
    host, token = await database_sync_to_async(services.host_register)(hostname="drain-03")
    agent = await agent_socket(token)
    await hello(agent)
    await agent.disconnect()
    host = await database_sync_to_async(Host.objects.get)(id=host.id)
    assert host.status == "offline"
