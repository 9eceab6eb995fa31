"""
Backup and restore, end to end, as docs/operations.md ("Backup and restore") tells it.

Before the backup each server gets what a restore must bring back: an enrolled host whose
agent is connected and running a command, an alert, sign-ins (JWT pairs, browser
sessions) and a client subscribed to ``system_alerts``; alerts are raised without pause
while the backup is taken.  After it come changes the backup does not hold: another host
enrolled, another alert, another command, a logout.

* PostgreSQL with Redis: ``pg_dump --format=custom`` while the server serves, then
  ``pg_restore`` into a new database.  A server there with another secret key refuses
  every old sign-in (401, 4001), and, with the old channel streams still in Redis, lets
  a client resume into events the restored database never had.  With the stream keys
  deleted and the same key, everything from before the dump works again.
* SQLite, the embedded database (``var/sysmanage.sqlite3``, key in ``var/secret_key``):
  ``manage.py backup_sqlite`` while the server writes; the copy and the key in a fresh
  ``var/``, and everything from before the backup works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.integration import harness
from tests.integration.client import (
    Session,
    WsClient,
    api,
    browser_login,
    obtain_tokens,
    ws_connect,
)
from tests.integration.conftest import POSTGRES_ADMIN_URL, REDIS_TEST_URL, require_pg_redis

pytestmark = pytest.mark.integration

TIMEOUT = 10.0
#: A command's own timeout: long enough that no sweep ends it while the test runs.
COMMAND_TIMEOUT = 300


@dataclass
class World:
    """What the backup holds, and what came after it."""

    password: str
    tokens: dict[str, str]  # a JWT pair obtained before the backup
    logged_out: dict[str, str]  # one obtained before, logged out after the backup
    session: Session  # a browser session from before the backup
    other_session: Session
    host: dict[str, str]  # host_id and token of a host enrolled before the backup
    revoked_host: dict[str, str]  # enrolled before the backup, its token revoked after
    alert_id: str
    command_id: str  # running on the host's agent when the backup was taken
    position: dict[str, Any]  # of system_alerts, before the backup
    written: list[str]  # alerts whose creation was answered before the backup began
    unwritten: list[str]  # alerts asked for after the backup ended
    late_host: dict[str, str]  # enrolled after the backup
    late_tokens: dict[str, str]  # a sign-in after the backup
    late_session: Session  # a browser session begun after the backup
    late_alert_id: str
    late_command_id: str


# -- helpers ------------------------------------------------------------------------


def enroll(env: dict[str, str], hostname: str) -> dict[str, str]:
    """``manage.py register_host``: its last line is the JSON with host_id and token."""
    out = harness.run_python(
        ["manage.py", "register_host", hostname], env, what="register_host"
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


async def raise_alert(base: str, token: str, title: str) -> str:
    response = await api(
        "POST",
        base,
        "/api/alerts/",
        token=token,
        json_body={"severity": "warning", "category": "disk_space", "title": title},
    )
    assert response.status == 201, response
    return response.body["id"]


async def alert_titles(base: str, token: str) -> dict[str, str]:
    """id -> title of every alert."""
    response = await api("GET", base, "/api/alerts/?limit=500", token=token)
    assert response.status == 200, response
    assert response.body["next"] is None, "more alerts than one page"
    return {a["id"]: a["title"] for a in response.body["results"]}


async def order_command(
    client: WsClient, agent: ClientConnection, host_id: str, request_id: str
) -> str:
    """Ask for a command on the agent's host; return its execution id as the agent got it
    (the request is answered when the result comes: :func:`finish_command`)."""
    await client.send(
        {
            "type": "command",
            "channel": "command_execution",
            "id": request_id,
            "data": {"host_id": host_id, "command": "true", "timeout": COMMAND_TIMEOUT},
        }
    )
    return (await agent_next(agent, "run_command"))["data"]["execution_id"]


async def finish_command(
    client: WsClient, agent: ClientConnection, request_id: str, execution_id: str
) -> None:
    """The agent sends the command's result; the request is answered with it."""
    await agent_result(agent, execution_id)
    reply = await client.expect(lambda m: m.get("id") == request_id, what="the command's reply")
    assert reply["type"] == "response", reply
    assert reply["data"]["status"] == "completed", reply


@contextlib.asynccontextmanager
async def agent_socket(base: str, token: str) -> AsyncIterator[ClientConnection]:
    """The agent's connection to ``/ws/agent`` (this project's agent protocol)."""
    async with connect(
        base.replace("http", "ws", 1) + "/ws/agent",
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=TIMEOUT,
        close_timeout=2,
        proxy=None,
    ) as ws:
        yield ws


async def agent_next(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next message of type ``kind`` the agent gets (others are passed over)."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == kind:
                return message


async def agent_hello(ws: ClientConnection, hostname: str) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "hello", "data": {"hostname": hostname}, "id": "h"}))
    return await agent_next(ws, "welcome")


async def agent_result(ws: ClientConnection, execution_id: str) -> dict[str, Any]:
    """Send a command's result; return the server's ``ack``."""
    result = {"execution_id": execution_id, "status": "completed", "exit_code": 0, "stdout": ""}
    await ws.send(json.dumps({"type": "command_result", "data": result, "id": execution_id}))
    ack = await agent_next(ws, "ack")
    assert ack["data"] == {"kind": "command_result", "ref": execution_id}, ack
    return ack


async def agent_refused(base: str, token: str) -> tuple[int | None, list[dict[str, Any]]]:
    """Connect with ``token`` and read until closed: (close code, messages)."""
    messages = []
    async with agent_socket(base, token) as ws:
        with contextlib.suppress(ConnectionClosed):
            async with asyncio.timeout(TIMEOUT):
                while True:
                    messages.append(json.loads(await ws.recv()))
    return ws.close_code, messages


async def client_refused(url: str, **kwargs: Any) -> str:
    """A ``/ws`` connection refused as unauthenticated (4001): the error's message."""
    async with ws_connect(url, **kwargs) as client:
        closed = await client.expect_closed()
    assert closed.code == 4001, closed
    (error,) = closed.messages
    assert error["data"]["code"] == "AUTH_FAILED", error
    return error["data"]["message"]


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def alerts_raised_meanwhile(
    base: str, token: str
) -> AsyncIterator[list[tuple[str, float, float]]]:
    """Raise alerts one after another until the block ends: (title, asked, answered)."""
    raised: list[tuple[str, float, float]] = []
    stop = asyncio.Event()

    async def keep_raising() -> None:
        while not stop.is_set():
            title = f"meanwhile-{len(raised)}"
            asked = time.monotonic()
            await raise_alert(base, token, title)
            raised.append((title, asked, time.monotonic()))

    task = asyncio.ensure_future(keep_raising())
    try:
        yield raised
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)


# -- the world around a backup ----------------------------------------------------------


async def backed_up_while_serving(
    server: harness.DaphneServer, env: dict[str, str], password: str, backup: Callable[[], Any]
) -> World:
    """Make the world, run ``backup`` while alerts are being raised, change the world."""
    base = server.base_url
    tokens = await asyncio.to_thread(obtain_tokens, base, "admin", password)
    logged_out = await asyncio.to_thread(obtain_tokens, base, "admin", password)
    sessions = [await asyncio.to_thread(browser_login, base, "admin", password) for _ in "ab"]
    access = tokens["access"]
    host, revoked_host = await asyncio.gather(
        asyncio.to_thread(enroll, env, "kept-01"), asyncio.to_thread(enroll, env, "revoked-01")
    )
    alert_id = await raise_alert(base, access, "before the backup")
    async with (
        agent_socket(base, host["token"]) as agent,
        ws_connect(server.ws_url, token=access) as client,
    ):
        await agent_hello(agent, "kept-01")
        position = (await client.subscribe("system_alerts"))["data"]["position"]
        command_id = await order_command(client, agent, host["host_id"], "first")

        async with alerts_raised_meanwhile(base, access) as raised:
            await until(lambda: len(raised) >= 3)
            began = time.monotonic()
            await asyncio.to_thread(backup)
            ended = time.monotonic()
            await until(lambda: raised[-1][1] > ended)
        during = [title for title, asked, answered in raised if asked < ended and answered > began]
        assert during, "no alert was raised while the backup was taken"

        await finish_command(client, agent, "first", command_id)
        late_command_id = await order_command(client, agent, host["host_id"], "late")
        await finish_command(client, agent, "late", late_command_id)
    revoke = ["manage.py", "revoke_host", "revoked-01"]
    _, late_host = await asyncio.gather(
        asyncio.to_thread(harness.run_python, revoke, env),
        asyncio.to_thread(enroll, env, "late-01"),
    )
    assert (await agent_refused(base, revoked_host["token"]))[0] == 4001
    async with agent_socket(base, late_host["token"]) as late_agent:
        await agent_hello(late_agent, "late-01")
    late_alert_id = await raise_alert(base, access, "after the backup")
    late_tokens = await asyncio.to_thread(obtain_tokens, base, "admin", password)
    late_session = await asyncio.to_thread(browser_login, base, "admin", password)
    out = await api("POST", base, "/api/token/logout/", json_body=logged_out)
    assert out.status == 200, out
    return World(
        password=password,
        tokens=tokens,
        logged_out=logged_out,
        session=sessions[0],
        other_session=sessions[1],
        host=host,
        revoked_host=revoked_host,
        alert_id=alert_id,
        command_id=command_id,
        position=position,
        written=[title for title, _, answered in raised if answered < began],
        unwritten=[title for title, asked, _ in raised if asked > ended],
        late_host=late_host,
        late_tokens=late_tokens,
        late_session=late_session,
        late_alert_id=late_alert_id,
        late_command_id=late_command_id,
    )


async def check_restored(server: harness.DaphneServer, env: dict[str, str], world: World) -> None:
    """Everything from before the backup works; nothing from after it is there."""
    base = server.base_url
    ready = await api("GET", base, "/readyz")
    assert ready.status == 200, ready
    access = world.tokens["access"]
    hosts = await api("GET", base, "/api/hosts/?limit=500", token=access)
    assert hosts.status == 200, hosts
    names = {h["hostname"] for h in hosts.body["results"]}
    assert "kept-01" in names, names
    assert "late-01" not in names, names
    alerts = await alert_titles(base, access)
    assert alerts.get(world.alert_id) == "before the backup"
    assert world.late_alert_id not in alerts
    assert set(world.written) <= set(alerts.values())
    assert not set(world.unwritten) & set(alerts.values())

    refreshed = await api("POST", base, "/api/token/refresh/", json_body=world.tokens)
    assert refreshed.status == 200, refreshed
    # the logout came after the backup: the restore undid it
    undone = await api("POST", base, "/api/token/refresh/", json_body=world.logged_out)
    assert undone.status == 200, undone
    # a sign-in after the backup needs nothing from the database but its user
    later = await api("POST", base, "/api/token/refresh/", json_body=world.late_tokens)
    assert later.status == 200, later
    cookie = {"Cookie": f"sessionid={world.session.sessionid}"}
    async with ws_connect(server.ws_url, headers=cookie) as by_session:
        await by_session.subscribe("user_activity")  # staff only: it knows who we are
    # a session is a row of the database: one begun after the backup is gone
    cookie = {"Cookie": f"sessionid={world.late_session.sessionid}"}
    assert await client_refused(server.ws_url, headers=cookie) == "Missing JWT token"

    await check_agents(base, env, world, access)
    await check_resume(server, world, refreshed.body["access"], recovered=False)


async def check_agents(base: str, env: dict[str, str], world: World, access: str) -> None:
    """The host's agent connects with its token and is sent the command that was running
    at the backup again; a result the backup never saw is acknowledged and dropped; the
    host enrolled after the backup is refused until it is enrolled again; the token
    revoked after the backup works again."""
    async with agent_socket(base, world.host["token"]) as agent:
        await agent_hello(agent, "kept-01")
        order = await agent_next(agent, "run_command")
        assert order["data"]["execution_id"] == world.command_id, order
        await agent_result(agent, world.late_command_id)
    unknown = await api("GET", base, f"/api/commands/{world.late_command_id}/", token=access)
    assert unknown.status == 404, unknown
    code, messages = await agent_refused(base, world.late_host["token"])
    assert code == 4001, (code, messages)
    assert [(m["data"]["code"], m["data"]["message"]) for m in messages] == [
        ("AUTH_FAILED", "Invalid or revoked agent token")
    ], messages
    again = await asyncio.to_thread(enroll, env, "late-01")
    async with agent_socket(base, again["token"]) as agent:
        await agent_hello(agent, "late-01")
    async with agent_socket(base, world.revoked_host["token"]) as agent:
        await agent_hello(agent, "revoked-01")


async def check_resume(
    server: harness.DaphneServer, world: World, access: str, *, recovered: bool
) -> None:
    """A client resumes ``system_alerts`` from its position before the backup: replayed
    (the events after the backup, of alerts this database lacks), or not recovered, with
    a snapshot of the restored alerts."""
    async with ws_connect(server.ws_url, token=access) as client:
        reply = await client.request(
            {"type": "subscribe", "channel": "system_alerts", "since": world.position}
        )
        assert reply["data"]["recovered"] is recovered, reply
        if recovered:
            event = await client.expect(
                lambda m: m["type"] == "event" and m["data"]["alert_id"] == world.late_alert_id,
                what="the replayed event of the alert raised after the backup",
            )
            assert event["epoch"] == world.position["epoch"]
            return
        assert reply["data"]["position"]["epoch"] != world.position["epoch"], reply
        status = await client.expect(lambda m: m["type"] == "status", what="the snapshot")
        ids = {a["alert_id"] for a in status["data"]["alerts"]}
        assert world.alert_id in ids, status
        assert world.late_alert_id not in ids, status


# -- PostgreSQL -----------------------------------------------------------------------


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def major_version(text: str) -> int:
    match = re.search(r"(\d+)(?:\.\d+)?", text)
    assert match, text
    return int(match.group(1))


def check_pg_dump_version(pg_dump: str, url: str) -> None:
    """pg_dump refuses a server newer than itself; say so before it does."""
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as conn:
        server = conn.info.server_version // 10000
    ours = major_version(subprocess.check_output([pg_dump, "--version"], text=True))
    if ours < server:
        pytest.skip(f"pg_dump {ours} cannot dump PostgreSQL {server}")


def run(args: list[str], what: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{done.stderr}"


def delete_stream_keys(prefix: str) -> None:
    """What docs/operations.md says to run, with redis-cli if this machine has it."""
    if shutil.which("redis-cli"):
        script = (
            f"redis-cli -u {REDIS_TEST_URL} --scan --pattern '{prefix}:stream:*'"
            f" | xargs -r redis-cli -u {REDIS_TEST_URL} del"
        )
        run(["bash", "-o", "pipefail", "-c", script], "deleting the stream keys")
    else:
        harness.delete_redis_keys(REDIS_TEST_URL, f"{prefix}:stream:")
    assert harness.delete_redis_keys(REDIS_TEST_URL, f"{prefix}:stream:") == 0


async def check_restore_with_another_key_and_old_streams(
    server: harness.DaphneServer, world: World
) -> None:
    """A server on the restored database with another secret key: every sign-in from
    before ends cleanly (passwords and agent tokens do not depend on the key), and the
    channel streams left in Redis replay events the database does not have."""
    base = server.base_url
    assert (await api("GET", base, "/readyz")).status == 200
    old = await api("GET", base, "/api/hosts/", token=world.tokens["access"])
    assert old.status == 401, old
    refused = await api("POST", base, "/api/token/refresh/", json_body=world.tokens)
    assert refused.status == 401, refused
    assert await client_refused(server.ws_url, token=world.tokens["access"]) == (
        "Invalid or expired JWT token"
    )
    cookie = {"Cookie": f"sessionid={world.other_session.sessionid}"}
    assert await client_refused(server.ws_url, headers=cookie) == "Missing JWT token"
    fresh = await asyncio.to_thread(obtain_tokens, base, "admin", world.password)
    async with agent_socket(base, world.host["token"]) as agent:
        await agent_hello(agent, "kept-01")
    await check_resume(server, world, fresh["access"], recovered=True)
    lost = await api("GET", base, f"/api/alerts/{world.late_alert_id}/", token=fresh["access"])
    assert lost.status == 404, lost


async def test_postgres_dump_while_serving_and_restore(tmp_path: Path) -> None:
    require_pg_redis()
    pg_dump, pg_restore = tool("pg_dump"), tool("pg_restore")
    check_pg_dump_version(pg_dump, POSTGRES_ADMIN_URL)
    prefix = f"sysmanage-it-{secrets.token_hex(6)}"
    settings = {
        **harness.COMMON_SETTINGS,
        "DJANGO_SECRET_KEY": harness.new_secret(),
        "SYSMANAGE_VAR_DIR": str(tmp_path / "var"),
        "REDIS_URL": REDIS_TEST_URL,
        "SYSMANAGE_REDIS_PREFIX": prefix,
    }
    databases: list[str] = []
    try:
        databases.append(harness.create_postgres_database(POSTGRES_ADMIN_URL))
        source = harness.with_database(POSTGRES_ADMIN_URL, databases[0])
        env = harness.server_env(**settings, DATABASE_URL=source)
        seed = harness.seed_database(env)
        dump = tmp_path / "sysmanage.dump"
        (server,) = harness.start_servers([("backup-pg", env)], tmp_path)
        try:
            world = await backed_up_while_serving(
                server,
                env,
                seed["password"],
                lambda: run([pg_dump, "--format=custom", f"--file={dump}", source], "pg_dump"),
            )
        finally:
            server.stop()

        databases.append(harness.create_postgres_database(POSTGRES_ADMIN_URL))
        target = harness.with_database(POSTGRES_ADMIN_URL, databases[1])
        run(
            [pg_restore, "--no-owner", "--exit-on-error", f"--dbname={target}", str(dump)],
            "pg_restore",
        )
        forgetful = {**settings, "DJANGO_SECRET_KEY": harness.new_secret()}
        (server,) = harness.start_servers(
            [("restored-pg-other-key", harness.server_env(**forgetful, DATABASE_URL=target))],
            tmp_path,
        )
        try:
            await check_restore_with_another_key_and_old_streams(server, world)
        finally:
            server.stop()

        delete_stream_keys(prefix)
        env = harness.server_env(**settings, DATABASE_URL=target)
        (server,) = harness.start_servers([("restored-pg", env)], tmp_path)
        try:
            await check_restored(server, env, world)
        finally:
            server.stop()
    finally:
        for name in databases:
            harness.drop_postgres_database(POSTGRES_ADMIN_URL, name)
        harness.delete_redis_keys(REDIS_TEST_URL, prefix)


# -- SQLite ---------------------------------------------------------------------------


async def test_sqlite_online_backup_and_restore(
    tmp_path: Path, sqlite_template: tuple[Path, dict[str, Any]]
) -> None:
    """The embedded defaults: no DATABASE_URL, no DJANGO_SECRET_KEY, everything in var/."""
    var = tmp_path / "var"
    var.mkdir(mode=0o700)
    harness.copy_sqlite(sqlite_template[0], var / "sysmanage.sqlite3")
    env = harness.server_env(SYSMANAGE_VAR_DIR=str(var), **harness.COMMON_SETTINGS)
    copy = tmp_path / "backups" / "sysmanage.sqlite3"
    copy.parent.mkdir()
    (server,) = harness.start_servers([("backup-sqlite", env)], tmp_path)
    try:
        world = await backed_up_while_serving(
            server,
            env,
            sqlite_template[1]["password"],
            lambda: harness.run_python(["manage.py", "backup_sqlite", str(copy)], env),
        )
    finally:
        server.stop()
    assert copy.stat().st_mode & 0o777 == 0o600

    restored = tmp_path / "restored-var"
    restored.mkdir(mode=0o700)
    shutil.copy2(copy, restored / "sysmanage.sqlite3")
    shutil.copy2(var / "secret_key", restored / "secret_key")
    env = harness.server_env(SYSMANAGE_VAR_DIR=str(restored), **harness.COMMON_SETTINGS)
    (server,) = harness.start_servers([("restored-sqlite", env)], tmp_path)
    try:
        await check_restored(server, env, world)
    finally:
        server.stop()
