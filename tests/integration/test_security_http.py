"""
Attacks on the HTTP side, performed against real servers (Daphne processes on
loopback): each test fails if the hole it closes opens again.

* Login lockout: spellings of a locked name, concurrent bursts, the owner at another
  address.  Client addresses differ for real: connections come from other addresses of
  127.0.0.0/8 (the kernel routes all of them to loopback), so the server sees them in
  ``REMOTE_ADDR`` exactly as it sees remote clients, and trusts no proxy header.
"""
from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration import harness
from tests.integration.client import HttpResponse, http_request, opener_from, ws_connect

pytestmark = pytest.mark.integration

#: Small limits, reached quickly; the slow-down is capped at 30 s.
LOCKOUT_SETTINGS = {
    "LOGIN_LOCKOUT_THRESHOLD": "3",
    "LOGIN_LOCKOUT_ADDRESS_THRESHOLD": "20",
    "LOGIN_THROTTLE_THRESHOLD": "6",
    "LOGIN_THROTTLE_MAX_SECONDS": "30",
}
PAIR_LIMIT = int(LOCKOUT_SETTINGS["LOGIN_LOCKOUT_THRESHOLD"])
ACCOUNT_LIMIT = int(LOCKOUT_SETTINGS["LOGIN_THROTTLE_THRESHOLD"])
BURST = 120
#: Spellings of ``name`` that reached a locked account before: whitespace around it,
#: tabs, newlines, full-width (NFKC) forms.
VARIANTS: list[Callable[[str], str]] = [
    lambda n: f"{n} ", lambda n: f" {n}", lambda n: f"\t{n}", lambda n: f"{n}\n",
    lambda n: f"\u3000{n}\u00a0",
    lambda n: "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in n),
]
LOCK_WORDS = "Too many failed logins"


@pytest.fixture(scope="module")
def lockout_server(launch_sqlite: Any) -> Iterator[harness.Deployment]:
    """A server of its own (its lockout state is this module's) with small limits."""
    with launch_sqlite("lockout", **LOCKOUT_SETTINGS) as deployment:
        yield deployment


def create_staff(deployment: harness.Deployment, *names: str) -> None:
    """Staff users (they may use the admin login) with the seed password."""
    code = ("from django.contrib.auth import get_user_model\n"
            f"for name in {list(names)!r}:\n"
            "    get_user_model().objects.create_user(username=name, is_staff=True, "
            f"password={deployment.password!r})\n")
    harness.manage_shell(deployment.env, code)


def token_login(base_url: str, username: str, password: str, address: str,
                timeout: float = 10.0) -> HttpResponse:
    """``POST /api/token/`` from ``address``."""
    return http_request("POST", f"{base_url}/api/token/", opener=opener_from(address),
                        json_body={"username": username, "password": password},
                        timeout=timeout)


def form_login(base_url: str, path: str, username: str, password: str,
               address: str) -> tuple[HttpResponse, dict[str, str]]:
    """Log in through the form at ``path`` (``/login/`` or ``/admin/login/``) from
    ``address`` as a browser does; return the last answer and the cookies."""
    jar = http.cookiejar.CookieJar()
    opener = opener_from(address, jar)
    page = http_request("GET", f"{base_url}{path}", opener=opener,
                        headers={"Accept": "text/html"})
    assert page.status == 200, page
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.body)
    assert token, "no CSRF token in the login form"
    answer = http_request("POST", f"{base_url}{path}", opener=opener,
                          headers={"Accept": "text/html"},
                          form={"username": username, "password": password,
                                "csrfmiddlewaretoken": token.group(1)})
    return answer, {cookie.name: cookie.value for cookie in jar}


def failures_recorded(deployment: harness.Deployment, username: str) -> int:
    """``login_failed`` records of ``username`` (each one a password that was checked)."""
    listing = http_request(
        "GET", f"{deployment.server.base_url}/api/activity/?action=login_failed"
        f"&username={username}&limit=500", token=deployment.token("admin"))
    assert listing.status == 200, listing
    return listing.body["count"]


def burst(attempt: Callable[[int], HttpResponse], count: int) -> Counter[int | str]:
    """Run ``attempt(i)`` for i < count in as many threads, released at once; return
    the statuses (an exception counts under its name).  Bounded: ``attempt`` must
    time out; threads are joined for at most 90 s."""
    barrier = threading.Barrier(count, timeout=30)
    statuses: list[int | str] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        try:
            barrier.wait()
            status: int | str = attempt(i).status
        except Exception as exc:  # noqa: BLE001 - reported in the statuses
            status = type(exc).__name__
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert len(statuses) == count, f"only {len(statuses)} of {count} attempts finished"
    return Counter(statuses)


# -- login lockout -----------------------------------------------------------------------


def lock_pair(deployment: harness.Deployment, username: str, address: str) -> None:
    """Fail ``PAIR_LIMIT`` times from ``address``; then even the right password is
    refused there."""
    base = deployment.server.base_url
    for _ in range(PAIR_LIMIT):
        assert token_login(base, username, "wrong", address).status == 401
    locked = token_login(base, username, deployment.password, address)
    assert locked.status == 429, locked
    assert locked.body["code"] == "login_locked"
    assert int(locked.headers["Retry-After"]) > 0


@pytest.mark.parametrize("path", ["/api/token/", "/login/", "/admin/login/"])
def test_spellings_of_a_locked_name_are_refused_at_every_login(lockout_server, path):
    name = f"staff-{path.strip('/').replace('/', '-')}"
    create_staff(lockout_server, name)
    base, attacker, control = lockout_server.server.base_url, "127.0.0.21", "127.0.0.22"
    lock_pair(lockout_server, name, attacker)
    for variant in (spell(name) for spell in VARIANTS):
        if path == "/api/token/":
            answer = token_login(base, variant, lockout_server.password, attacker)
            assert answer.status == 429, (variant, answer)
            assert LOCK_WORDS in answer.body["detail"]
        else:
            answer, cookies = form_login(base, path, variant, lockout_server.password,
                                         attacker)
            assert LOCK_WORDS in answer.body, (variant, answer.status)
            assert "sessionid" not in cookies, variant
    # The spellings do reach the account: from an address that is not locked, each
    # logs in (so the refusals above are the lock's, not a wrong name's).
    for variant in (spell(name) for spell in VARIANTS):
        answer = token_login(base, variant, lockout_server.password, control)
        assert answer.status == 200, (variant, answer)
    assert failures_recorded(lockout_server, name) == PAIR_LIMIT


def test_a_burst_from_one_address_is_evaluated_no_further_than_the_limit(lockout_server):
    create_staff(lockout_server, "burst-one")
    base = lockout_server.server.base_url
    statuses = burst(lambda i: token_login(base, "burst-one", f"guess-{i}", "127.0.0.31",
                                           timeout=60), BURST)
    assert set(statuses) <= {401, 429}, statuses
    assert statuses[401] <= PAIR_LIMIT, statuses  # the passwords that were checked
    assert failures_recorded(lockout_server, "burst-one") == statuses[401]


def test_a_burst_from_many_addresses_is_slowed_down_per_account(lockout_server):
    create_staff(lockout_server, "burst-many")
    base = lockout_server.server.base_url
    statuses = burst(lambda i: token_login(base, "burst-many", f"guess-{i}",
                                           f"127.0.1.{i + 1}", timeout=60), BURST)
    assert set(statuses) <= {401, 429}, statuses
    # The account's limit, plus the few the doubling delay lets through while the
    # burst lasts (1 + 2 + 4 + ... seconds apart).
    assert statuses[401] <= ACCOUNT_LIMIT + 4, statuses
    assert failures_recorded(lockout_server, "burst-many") == statuses[401]


def test_the_owner_gets_in_from_their_address_while_the_attackers_is_locked(lockout_server):
    create_staff(lockout_server, "owner1")
    base, attacker, owner = lockout_server.server.base_url, "127.0.0.41", "127.0.0.42"
    lock_pair(lockout_server, "owner1", attacker)
    assert token_login(base, "owner1", lockout_server.password, owner).status == 200
    answer, cookies = form_login(base, "/login/", "owner1", lockout_server.password, owner)
    assert "sessionid" in cookies, answer.status
    # and the attacker's address stays locked, right password or not
    assert token_login(base, "owner1", lockout_server.password, attacker).status == 429


def test_an_account_attacked_from_everywhere_is_slowed_but_its_owner_gets_in(lockout_server):
    create_staff(lockout_server, "owner2")
    base, owner = lockout_server.server.base_url, "127.0.0.51"
    assert token_login(base, "owner2", lockout_server.password, owner).status == 200
    for n in range(ACCOUNT_LIMIT):  # one failure from each of many addresses
        assert token_login(base, "owner2", "wrong", f"127.0.2.{n + 1}").status == 401
    slowed = token_login(base, "owner2", lockout_server.password, "127.0.2.200")
    assert slowed.status == 429, slowed
    assert slowed.body["code"] == "login_throttled"
    assert 1 <= slowed.body["retry_after"] <= 30
    # the owner at the address they logged in from before is not slowed down
    assert token_login(base, "owner2", lockout_server.password, owner).status == 200
    # nor locked anywhere: once the delay passed, the right password gets in
    time.sleep(slowed.body["retry_after"] + 0.2)
    assert token_login(base, "owner2", lockout_server.password, "127.0.2.201").status == 200


@pytest.mark.postgres_redis
def test_a_burst_split_across_two_servers_is_evaluated_no_further_than_the_limit(
        pg_redis_cluster):
    servers = pg_redis_cluster.servers
    statuses = burst(lambda i: token_login(servers[i % 2].base_url, "doomed", f"guess-{i}",
                                           "127.0.0.61", timeout=60), BURST)
    assert set(statuses) <= {401, 429}, statuses
    assert statuses[401] <= 5, statuses  # LOGIN_LOCKOUT_THRESHOLD's default
    assert failures_recorded(pg_redis_cluster, "doomed") == statuses[401]


# -- the server started as scripts/serve starts it -----------------------------------------


@dataclass
class ServeScript:
    """``scripts/serve`` running on a port of its own with a fresh ``SYSMANAGE_VAR_DIR``,
    its stdout and stderr going to ``output``."""

    process: subprocess.Popen[bytes]
    port: int
    var_dir: Path
    output: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM to its process group (the script stops Daphne), then SIGKILL."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _usual_umask() -> None:
    """In the child: the umask most systems give users (what left var/ 0755 before)."""
    os.umask(0o022)
    os.setsid()


@pytest.fixture(scope="module")
def serve_script(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeScript]:
    """``scripts/serve`` as a person runs it (DEMO=0), on a var/ it creates itself."""
    work = tmp_path_factory.mktemp("serve-script")
    work.chmod(0o755)
    port = _free_port()
    env = harness.server_env(SYSMANAGE_VAR_DIR=str(work / "var"), PORT=str(port),
                             HOST="127.0.0.1", DEMO="0", **harness.COMMON_SETTINGS)
    output = work / "serve.log"
    with output.open("wb") as sink:
        process = subprocess.Popen([str(harness.REPO_ROOT / "scripts" / "serve")],
                                   cwd=harness.REPO_ROOT, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, preexec_fn=_usual_umask)
    served = ServeScript(process, port, work / "var", output)
    try:
        deadline = time.monotonic() + 120
        while not _answers(served.base_url):
            assert process.poll() is None, f"scripts/serve exited:\n{served.text()}"
            assert time.monotonic() < deadline, f"scripts/serve never served:\n{served.text()}"
            time.sleep(0.2)
        yield served
    finally:
        served.stop()


def _answers(base_url: str) -> bool:
    try:
        return harness.http_get(f"{base_url}/healthz", timeout=1.0) == (200, "ok")
    except OSError:
        return False


def _raw_http(port: int, request: bytes) -> bytes:
    """Send ``request`` as it is (bytes no client library would send); return the
    answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_var_dir_and_database_are_private_to_the_server_user(serve_script):
    var = serve_script.var_dir
    assert stat.S_IMODE(var.stat().st_mode) == 0o700
    files = {path.name: stat.S_IMODE(path.stat().st_mode) for path in var.iterdir()}
    assert {"sysmanage.sqlite3", "secret_key", "admin-password"} <= files.keys(), files
    assert all(mode == 0o600 for mode in files.values()), files


async def test_no_token_reaches_the_log_of_a_server_run_by_scripts_serve(serve_script):
    secrets_sent = {name: f"{name}-{uuid.uuid4().hex}" for name in (
        "http-ws", "agent-ws", "bad-path", "bad-query", "drf-400", "encoded", "upper",
        "access", "not-found", "bad-host")}
    base, port = serve_script.base_url, serve_script.port
    # /ws?token= as plain HTTP (no upgrade): Django answers 404
    assert http_request("GET", f"{base}/ws?token={secrets_sent['http-ws']}").status == 404
    # a WebSocket to the SysManage agents' endpoint with a (bad) connection token
    with contextlib.suppress(Exception):
        async with ws_connect(f"ws://127.0.0.1:{port}/api/agent/connect"
                              f"?token={secrets_sent['agent-ws']}") as ws:
            await ws.expect_closed()
    # request lines Daphne itself refuses (400) before any application code runs
    for raw in (f"GET /\xff?token={secrets_sent['bad-path']} HTTP/1.1",
                f"GET /api/hosts/?token={secrets_sent['bad-query']}\xff HTTP/1.1"):
        answer = _raw_http(port, raw.encode("latin-1") + b"\r\nHost: 127.0.0.1\r\n"
                           b"Connection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    # Django and DRF refusals that log their own warnings
    assert http_request("GET", f"{base}/api/hosts/?limit=x&token={secrets_sent['drf-400']}"
                        ).status in (400, 401)
    assert http_request("GET", f"{base}/nowhere/?token={secrets_sent['not-found']}"
                        ).status == 404
    assert http_request("GET", f"{base}/?token={secrets_sent['bad-host']}",
                        headers={"Host": "evil.example"}).status == 400
    # spellings of the parameter Django decodes as "token", and other credential names
    for query in (f"t%6Fken={secrets_sent['encoded']}", f"TOKEN={secrets_sent['upper']}",
                  f"access_token={secrets_sent['access']}"):
        assert http_request("GET", f"{base}/ws?{query}").status == 404
    await asyncio.sleep(0.5)  # the last access-log lines
    serve_script.stop()
    text = serve_script.text()
    leaked = [name for name, secret in secrets_sent.items() if secret in text]
    assert not leaked, f"secrets in the output: {leaked}\n{text[-5000:]}"
    # and the requests were logged (redacted), so the test saw a working access log
    assert '"GET /ws?token=[redacted]" 404' in text, text[-5000:]
    assert "/api/agent/connect" in text, text[-5000:]
