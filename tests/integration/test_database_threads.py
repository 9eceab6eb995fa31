"""
The database threads of a server process, against real servers on PostgreSQL:

* ``DB_THREADS`` calls run at once, each on a connection of its own, and the calls
  beyond them wait (counted in ``pg_stat_activity`` while the test holds a lock every
  socket authentication needs);
* the token refresh, which runs in those threads, is idempotent under retries: many
  concurrent refreshes of one token, on both servers, all get a working pair;
* agents that give up while their handshake's calls wait for a thread (a reconnect
  storm) cost nothing more: their waiting calls are skipped, their host is not marked
  online, and an agent still waiting is welcomed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import psutil
import psycopg
import pytest
import websockets

from tests.integration.client import WsClient, http_request, ws_connect
from tests.integration.harness import Deployment, manage_shell
from tests.integration.test_token_refresh import mint_refresh_tokens, usable

pytestmark = [pytest.mark.integration, pytest.mark.postgres_redis]

#: The database threads of each server of the module.
THREADS = 3
#: Sockets that need the database at once: twice the threads.
SOCKETS = 2 * THREADS
#: Concurrent refreshes of one token.
RETRIES = 16


@pytest.fixture(scope="module")
def cluster(launch_pg_redis: Any) -> Iterator[Deployment]:
    with launch_pg_redis("dbthreads", DB_THREADS=str(THREADS)) as deployment:
        yield deployment


def database_name(d: Deployment) -> str:
    return urlsplit(d.env["DATABASE_URL"]).path.lstrip("/")


def ports_of(pid: int) -> set[int]:
    """The local ports of the TCP connections process ``pid`` holds to PostgreSQL."""
    return {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == 5432
    }


def waiting_backends(admin: psycopg.Connection[Any], database: str, ports: set[int]) -> int:
    """Backends of ``database`` that wait for a lock, of the connections on ``ports``."""
    rows = admin.execute(
        "SELECT client_port FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
        (database,),
    ).fetchall()
    return sum(1 for (port,) in rows if port in ports)


async def handshake(d: Deployment) -> WsClient:
    """Open a socket of the viewer (authenticated before the handshake is accepted)."""
    stack = contextlib.AsyncExitStack()
    client = await stack.enter_async_context(ws_connect(d.server.ws_url, token=d.token("viewer")))
    client.closer = stack  # type: ignore[attr-defined]
    return client


async def test_database_threads_run_that_many_queries_at_once(cluster: Deployment):
    d = cluster
    d.token("viewer")  # signed in before the lock
    assert d.server.process is not None
    url = d.env["DATABASE_URL"]
    with psycopg.connect(url, autocommit=True) as admin, psycopg.connect(url) as locker:
        locker.execute("LOCK TABLE sysmanage_user IN ACCESS EXCLUSIVE MODE")
        # every handshake reads the user in a database thread, and waits for the lock
        handshakes = [asyncio.ensure_future(handshake(d)) for _ in range(SOCKETS)]
        seen: list[int] = []
        for _ in range(25):
            await asyncio.sleep(0.1)
            seen.append(waiting_backends(admin, database_name(d), ports_of(d.server.process.pid)))
        assert not any(h.done() for h in handshakes)
        locker.rollback()  # the lock goes
        clients = await asyncio.gather(*handshakes)
    for client in clients:
        await client.ping()
        await client.closer.aclose()  # type: ignore[attr-defined]
    assert max(seen) == THREADS, seen  # that many at once, and the rest waited


def test_concurrent_refreshes_of_one_token_all_get_a_working_pair(cluster: Deployment):
    d = cluster
    (token,) = mint_refresh_tokens(d, 1)

    def send(server: int) -> Any:
        return http_request(
            "POST",
            f"{d.servers[server].base_url}/api/token/refresh/",
            json_body={"refresh": token},
            timeout=60,
        )

    with ThreadPoolExecutor(max_workers=RETRIES) as pool:
        answers = list(pool.map(send, [n % 2 for n in range(RETRIES)]))
    assert [a.status for a in answers] == [200] * RETRIES, answers
    pairs = [a.body for a in answers]
    assert len({p["refresh"] for p in pairs}) == RETRIES
    # nobody is logged out: whichever answer the client kept, its pair works
    assert all(usable(d, pair) for pair in pairs)


REGISTER = """
import json
from hosts.services import host_register
print(json.dumps([host_register(hostname=f"storm-{{n}}-{label}")[1] for n in range({count})]))
"""


def register_hosts(d: Deployment, label: str, count: int) -> list[str]:
    """Enroll ``count`` hosts; their agent tokens."""
    out = manage_shell(d.env, REGISTER.format(label=label, count=count))
    return list(json.loads(out.strip().splitlines()[-1]))


def skipped_calls(d: Deployment) -> float:
    """``sysmanage_db_calls_skipped_total`` of the first server."""
    body = http_request("GET", f"{d.server.base_url}/metrics", headers={"Accept": "text/plain"})
    found = re.search(r"^sysmanage_db_calls_skipped_total (\S+)$", str(body.body), re.M)
    assert found, body.body
    return float(found.group(1))


async def agent_hello(d: Deployment, token: str) -> Any:
    """An agent socket (opened at once: authentication follows) that said hello."""
    ws = await websockets.connect(
        d.server.ws_url.replace("/ws", "/ws/agent"),
        additional_headers={"Authorization": f"Bearer {token}"},
        proxy=None,
    )
    hello = {"hostname": "storm", "agent_version": "test", "os_name": "Debian GNU/Linux"}
    await ws.send(json.dumps({"type": "hello", "data": hello, "id": "h"}))
    return ws


async def test_agents_that_gave_up_cost_no_more_database_calls(cluster: Deployment):
    d = cluster
    gone = register_hosts(d, "gone", SOCKETS)
    (staying,) = register_hosts(d, "staying", 1)
    skipped = skipped_calls(d)
    assert d.server.process is not None
    url = d.env["DATABASE_URL"]
    with psycopg.connect(url, autocommit=True) as admin, psycopg.connect(url) as locker:
        locker.execute("LOCK TABLE hosts_host IN ACCESS EXCLUSIVE MODE")
        # every agent's token lookup waits for the lock: some in PostgreSQL, the rest
        # queued in the server, the staying agent's last
        sockets = [await agent_hello(d, token) for token in gone]
        for _ in range(50):
            if waiting_backends(admin, database_name(d), ports_of(d.server.process.pid)):
                break
            await asyncio.sleep(0.1)
        waiter = await agent_hello(d, staying)
        for ws in sockets:  # they give up, as agents do after 30 s without welcome
            await ws.close()
        await asyncio.sleep(0.5)
        locker.rollback()  # the lock goes
    welcome = json.loads(await asyncio.wait_for(waiter.recv(), 10))
    assert welcome["type"] == "welcome", welcome
    await waiter.close()
    heard = manage_shell(
        d.env,
        "from hosts.models import Host; "
        "print(Host.objects.filter(hostname__startswith='storm-', hostname__endswith='-gone', "
        "last_seen__isnull=False).count())",
    )
    assert heard.strip().splitlines()[-1] == "0"  # none was marked online
    # the lookups still queued when their agents left were not made (those under way
    # finished, and went no further)
    assert skipped_calls(d) - skipped >= SOCKETS - THREADS
