"""
Attacks on the HTTP side, performed against real servers (Daphne processes on
loopback): each test fails if the hole it closes opens again.

* Login lockout: spellings of a locked name, concurrent bursts, the owner at another
  address.  Client addresses differ for real: connections come from other addresses of
  127.0.0.0/8 (the kernel routes all of them to loopback), so the server sees them in
  ``REMOTE_ADDR`` exactly as it sees remote clients, and trusts no proxy header.
* Malformed input: every filter, page parameter and body that was a server error.
* Large outputs kept out of lists, and pages capped.
* Tokens in logs: ``scripts/serve`` itself is run, and its whole output searched.
* Production mode: ``check --deploy`` in the documented environment, the CSP header,
  and the scheme behind a TLS proxy.
* The data directory's modes, on a ``var/`` that ``scripts/serve`` creates.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import json
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
import urllib.request
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
    lambda n: f"{n} ",
    lambda n: f" {n}",
    lambda n: f"\t{n}",
    lambda n: f"{n}\n",
    lambda n: f"\u3000{n}\u00a0",
    lambda n: "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in n),
]
LOCK_WORDS = "Too many failed logins"


@pytest.fixture(scope="module")
def http_server(launch_sqlite: Any) -> Iterator[harness.Deployment]:
    """This module's server (its lockout state is this module's), with small login
    limits, as a first run starts it (no production mode, no proxy)."""
    with launch_sqlite("http", **LOCKOUT_SETTINGS) as deployment:
        yield deployment


def create_staff(deployment: harness.Deployment, *names: str) -> None:
    """Staff users (they may use the admin login) with the seed password."""
    code = (
        "from django.contrib.auth import get_user_model\n"
        f"for name in {list(names)!r}:\n"
        "    get_user_model().objects.create_user(username=name, is_staff=True, "
        f"password={deployment.password!r})\n"
    )
    harness.manage_shell(deployment.env, code)


def token_login(
    base_url: str, username: str, password: str, address: str, timeout: float = 10.0
) -> HttpResponse:
    """``POST /api/token/`` from ``address``."""
    return http_request(
        "POST",
        f"{base_url}/api/token/",
        opener=opener_from(address),
        json_body={"username": username, "password": password},
        timeout=timeout,
    )


def form_login(
    base_url: str, path: str, username: str, password: str, address: str
) -> tuple[HttpResponse, dict[str, str]]:
    """Log in through the form at ``path`` (``/login/`` or ``/admin/login/``) from
    ``address`` as a browser does; return the last answer and the cookies."""
    jar = http.cookiejar.CookieJar()
    opener = opener_from(address, jar)
    page = http_request("GET", f"{base_url}{path}", opener=opener, headers={"Accept": "text/html"})
    assert page.status == 200, page
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.body)
    assert token, "no CSRF token in the login form"
    answer = http_request(
        "POST",
        f"{base_url}{path}",
        opener=opener,
        headers={"Accept": "text/html"},
        form={"username": username, "password": password, "csrfmiddlewaretoken": token.group(1)},
    )
    return answer, {cookie.name: cookie.value for cookie in jar}


def failures_recorded(deployment: harness.Deployment, username: str) -> int:
    """``login_failed`` records of ``username`` (each one a password that was checked)."""
    listing = http_request(
        "GET",
        f"{deployment.server.base_url}/api/activity/?action=login_failed"
        f"&username={username}&limit=500",
        token=deployment.token("admin"),
    )
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
        except Exception as exc:
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
def test_spellings_of_a_locked_name_are_refused_at_every_login(http_server, path):
    name = f"staff-{path.strip('/').replace('/', '-')}"
    create_staff(http_server, name)
    base, attacker, control = http_server.server.base_url, "127.0.0.21", "127.0.0.22"
    lock_pair(http_server, name, attacker)
    for variant in (spell(name) for spell in VARIANTS):
        if path == "/api/token/":
            answer = token_login(base, variant, http_server.password, attacker)
            assert answer.status == 429, (variant, answer)
            assert LOCK_WORDS in answer.body["detail"]
        else:
            answer, cookies = form_login(base, path, variant, http_server.password, attacker)
            assert LOCK_WORDS in answer.body, (variant, answer.status)
            assert "sessionid" not in cookies, variant
    # The spellings do reach the account: from an address that is not locked, each
    # logs in (so the refusals above are the lock's, not a wrong name's).
    for variant in (spell(name) for spell in VARIANTS):
        answer = token_login(base, variant, http_server.password, control)
        assert answer.status == 200, (variant, answer)
    assert failures_recorded(http_server, name) == PAIR_LIMIT


def test_a_burst_from_one_address_is_evaluated_no_further_than_the_limit(http_server):
    create_staff(http_server, "burst-one")
    base = http_server.server.base_url
    statuses = burst(
        lambda i: token_login(base, "burst-one", f"guess-{i}", "127.0.0.31", timeout=60), BURST
    )
    assert set(statuses) <= {401, 429}, statuses
    assert statuses[401] <= PAIR_LIMIT, statuses  # the passwords that were checked
    assert failures_recorded(http_server, "burst-one") == statuses[401]


def test_a_burst_from_many_addresses_is_slowed_down_per_account(http_server):
    create_staff(http_server, "burst-many")
    base = http_server.server.base_url
    statuses = burst(
        lambda i: token_login(base, "burst-many", f"guess-{i}", f"127.0.1.{i + 1}", timeout=60),
        BURST,
    )
    assert set(statuses) <= {401, 429}, statuses
    # The account's limit, plus the few the doubling delay lets through while the
    # burst lasts (1 + 2 + 4 + ... seconds apart).
    assert statuses[401] <= ACCOUNT_LIMIT + 4, statuses
    assert failures_recorded(http_server, "burst-many") == statuses[401]


def test_the_owner_gets_in_from_their_address_while_the_attackers_is_locked(http_server):
    create_staff(http_server, "owner1")
    base, attacker, owner = http_server.server.base_url, "127.0.0.41", "127.0.0.42"
    lock_pair(http_server, "owner1", attacker)
    assert token_login(base, "owner1", http_server.password, owner).status == 200
    answer, cookies = form_login(base, "/login/", "owner1", http_server.password, owner)
    assert "sessionid" in cookies, answer.status
    # and the attacker's address stays locked, right password or not
    assert token_login(base, "owner1", http_server.password, attacker).status == 429


def test_an_account_attacked_from_everywhere_is_slowed_but_its_owner_gets_in(http_server):
    create_staff(http_server, "owner2")
    base, owner = http_server.server.base_url, "127.0.0.51"
    assert token_login(base, "owner2", http_server.password, owner).status == 200
    for n in range(ACCOUNT_LIMIT):  # one failure from each of many addresses
        assert token_login(base, "owner2", "wrong", f"127.0.2.{n + 1}").status == 401
    slowed = token_login(base, "owner2", http_server.password, "127.0.2.200")
    assert slowed.status == 429, slowed
    assert slowed.body["code"] == "login_throttled"
    assert 1 <= slowed.body["retry_after"] <= 30
    # the owner at the address they logged in from before is not slowed down
    assert token_login(base, "owner2", http_server.password, owner).status == 200
    # nor locked anywhere: once the delay passed, the right password gets in
    time.sleep(slowed.body["retry_after"] + 0.2)
    assert token_login(base, "owner2", http_server.password, "127.0.2.201").status == 200


@pytest.mark.postgres_redis
def test_a_burst_split_across_two_servers_is_evaluated_no_further_than_the_limit(pg_redis_cluster):
    servers = pg_redis_cluster.servers
    statuses = burst(
        lambda i: token_login(
            servers[i % 2].base_url, "doomed", f"guess-{i}", "127.0.0.61", timeout=60
        ),
        BURST,
    )
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
    env = harness.server_env(
        SYSMANAGE_VAR_DIR=str(work / "var"),
        PORT=str(port),
        HOST="127.0.0.1",
        DEMO="0",
        **harness.COMMON_SETTINGS,
    )
    output = work / "serve.log"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [str(harness.REPO_ROOT / "scripts" / "serve")],
            cwd=harness.REPO_ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            preexec_fn=_usual_umask,
        )
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
    secrets_sent = {
        name: f"{name}-{uuid.uuid4().hex}"
        for name in (
            "http-ws",
            "agent-ws",
            "bad-path",
            "bad-query",
            "drf-400",
            "encoded",
            "upper",
            "access",
            "not-found",
            "bad-host",
        )
    }
    base, port = serve_script.base_url, serve_script.port
    # /ws?token= as plain HTTP (no upgrade): Django answers 404
    assert http_request("GET", f"{base}/ws?token={secrets_sent['http-ws']}").status == 404
    # a WebSocket to the SysManage agents' endpoint with a (bad) connection token
    with contextlib.suppress(Exception):
        async with ws_connect(
            f"ws://127.0.0.1:{port}/api/agent/connect?token={secrets_sent['agent-ws']}"
        ) as ws:
            await ws.expect_closed()
    # request lines Daphne itself refuses (400) before any application code runs
    for raw in (
        f"GET /\xff?token={secrets_sent['bad-path']} HTTP/1.1",
        f"GET /api/hosts/?token={secrets_sent['bad-query']}\xff HTTP/1.1",
    ):
        answer = _raw_http(
            port, raw.encode("latin-1") + b"\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    # Django and DRF refusals that log their own warnings
    assert http_request(
        "GET", f"{base}/api/hosts/?limit=x&token={secrets_sent['drf-400']}"
    ).status in (400, 401)
    assert http_request("GET", f"{base}/nowhere/?token={secrets_sent['not-found']}").status == 404
    assert (
        http_request(
            "GET", f"{base}/?token={secrets_sent['bad-host']}", headers={"Host": "evil.example"}
        ).status
        == 400
    )
    # spellings of the parameter Django decodes as "token", and other credential names
    for query in (
        f"t%6Fken={secrets_sent['encoded']}",
        f"TOKEN={secrets_sent['upper']}",
        f"access_token={secrets_sent['access']}",
    ):
        assert http_request("GET", f"{base}/ws?{query}").status == 404
    await asyncio.sleep(0.5)  # the last access-log lines
    serve_script.stop()
    text = serve_script.text()
    leaked = [name for name, secret in secrets_sent.items() if secret in text]
    assert not leaked, f"secrets in the output: {leaked}\n{text[-5000:]}"
    # and the requests were logged (redacted), so the test saw a working access log
    assert '"GET /ws?token=[redacted]" 404' in text, text[-5000:]
    assert "/api/agent/connect" in text, text[-5000:]


# -- malformed input: 400 or 401 with words, never 500 -----------------------------------

#: (path, parameter named in the answer): the reported ones first, then the rest of every
#: list endpoint's filters and page parameters.
MALFORMED_QUERIES = [
    ("/api/commands/?host=abc", "host"),
    ("/api/package-operations/?host=1", "host"),
    ("/api/alerts/?host=zzz", "host"),
    ("/api/activity/?since=notadate", "since"),
    ("/api/activity/?until=2024-13-45T99:00", "until"),
    ("/api/activity/?user=42", "user"),
    ("/api/activity/?ip_address=999.1.1.1", "ip_address"),
    ("/api/activity/?username=" + "x" * 151, "username"),
    ("/api/alerts/?severity=warning,apocalyptic", "severity"),
    ("/api/alerts/?status=open,gone", "status"),
    ("/api/commands/?status=nope", "status"),
    ("/api/package-operations/?status=exploded", "status"),
    ("/api/hosts/?status=sleeping", "status"),
    ("/api/hosts/?search=a%00b", "search"),
    ("/api/registrations/?status=maybe", "status"),
    ("/api/hosts/?limit=abc", "limit"),
    ("/api/activity/?limit=99999999999999999999999999", "limit"),
    ("/api/alerts/?offset=-1", "offset"),
    ("/api/commands/?offset=99999999999999999999", "offset"),
]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def post_raw(url: str, body: str, token: str | None = None) -> HttpResponse:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return http_request("POST", url, headers=headers, json_body=None, raw_body=body.encode())


@pytest.mark.parametrize(("path", "param"), MALFORMED_QUERIES)
def test_malformed_filters_are_400_with_words(http_server, path, param):
    answer = http_request(
        "GET", http_server.server.base_url + path, token=http_server.token("admin")
    )
    assert answer.status == 400, (path, answer)
    assert param in answer.body["detail"], answer.body


@pytest.mark.parametrize("path", ["/api/token/", "/api/token/refresh/"])
@pytest.mark.parametrize(
    "body",
    [
        nested(100_000),
        '{"a":' * 10_000 + "1" + "}" * 10_000,
        nested(65),
        '{"refresh": ' + nested(5000) + "}",
    ],
)
def test_deeply_nested_json_is_400(http_server, path, body):
    answer = post_raw(http_server.server.base_url + path, body)
    assert answer.status == 400, answer
    assert "nested deeper than 64" in answer.body["detail"]


def test_a_deleted_users_refresh_token_is_401(http_server):
    create_staff(http_server, "leaver")
    base = http_server.server.base_url
    tokens = token_login(base, "leaver", http_server.password, "127.0.0.71").body
    harness.manage_shell(
        http_server.env,
        "from django.contrib.auth import get_user_model\n"
        "get_user_model().objects.filter(username='leaver').delete()",
    )
    answer = http_request(
        "POST", f"{base}/api/token/refresh/", json_body={"refresh": tokens["refresh"]}
    )
    assert answer.status == 401, answer
    # (deleting a user also blacklists its refresh tokens: either refusal is clear)
    assert answer.body["detail"] in (
        "No active account found for the given token.",
        "Token is blacklisted",
    ), answer.body


def test_other_malformed_requests_found_by_fuzzing_are_4xx(http_server):
    base, admin = http_server.server.base_url, http_server.token("admin")
    for action in ("acknowledge", "resolve"):  # ids that are not UUIDs were a 500
        assert (
            http_request(
                "POST", f"{base}/api/alerts/abc/{action}/", token=admin, json_body={}
            ).status
            == 404
        )
    for body in (
        {"username": 12, "password": "x"},
        {"username": "ad\x00min", "password": "x"},
        ["admin", "x"],
    ):
        answer = http_request("POST", f"{base}/api/token/", json_body=body)
        assert answer.status == 400, (body, answer)
        assert answer.body["detail"], answer.body


@pytest.mark.postgres_redis
def test_a_login_name_with_nul_is_400_on_postgresql(pg_redis_cluster):
    # PostgreSQL stores no NUL in text: the lockout's counter once sent it there (500).
    answer = http_request(
        "POST",
        f"{pg_redis_cluster.server.base_url}/api/token/",
        json_body={"username": "ad\x00min", "password": "x"},
    )
    assert answer.status == 400, answer
    form = http_request(
        "POST",
        f"{pg_redis_cluster.server.base_url}/api/token/",
        form={"username": "ad\x00min", "password": "x"},
    )
    assert form.status == 400, form


# -- large outputs and page sizes ---------------------------------------------------------


def test_lists_are_capped_and_carry_no_whole_outputs(http_server):
    big = 3 * 1024 * 1024  # characters of stdout, and of output
    host_id = http_server.host_id("fleet-02")
    harness.manage_shell(
        http_server.env,
        f"""
from hosts.models import CommandExecution, PackageOperation
CommandExecution.objects.bulk_create(
    CommandExecution(host_id={host_id!r}, command=f"echo {{n}}", status="completed",
                     stdout="x" * {big} if n >= 596 else "small", stderr="e" * 1000)
    for n in range(600))
PackageOperation.objects.bulk_create(
    PackageOperation(host_id={host_id!r}, operation="install", package=f"p{{n}}",
                     status="completed", output="o" * {big} if n >= 596 else "")
    for n in range(600))
""",
        timeout=120,
    )
    base, admin = http_server.server.base_url, http_server.token("admin")
    listed = http_request(
        "GET", f"{base}/api/commands/?host={host_id}&limit=100000", token=admin, timeout=60
    )
    assert listed.status == 200
    assert listed.body["count"] == 600
    assert len(listed.body["results"]) == 500
    biggest = max(listed.body["results"], key=lambda c: c["stdout_length"])
    assert biggest["stdout_length"] == big
    assert len(biggest["stdout_preview"]) == 200
    assert all("stdout" not in c and "stderr" not in c for c in listed.body["results"])
    assert len(json.dumps(listed.body)) < 1024 * 1024
    whole = http_request("GET", f"{base}/api/commands/{biggest['id']}/", token=admin, timeout=60)
    assert len(whole.body["stdout"]) == big
    operations = http_request(
        "GET",
        f"{base}/api/package-operations/?host={host_id}&limit=100000",
        token=admin,
        timeout=60,
    )
    assert len(operations.body["results"]) == 500
    assert all("output" not in o for o in operations.body["results"])
    assert max(o["output_length"] for o in operations.body["results"]) == big
    assert len(json.dumps(operations.body)) < 1024 * 1024


# -- production mode ----------------------------------------------------------------------


def documented_production_env() -> dict[str, str]:
    """The ``export`` lines of the README's deployment commands, with a real secret key
    in place of its ``...``."""
    readme = (harness.REPO_ROOT / "README.md").read_text()
    block = readme.split("## PostgreSQL, Redis, several processes", 1)[1].split("```sh", 1)[1]
    exports = dict(re.findall(r"^export (\w+)=(\S+)", block.split("```", 1)[0], re.M))
    assert {"DJANGO_SECURE", "DJANGO_TRUST_PROXY_HEADERS", "DATABASE_URL"} <= exports.keys()
    exports["DJANGO_SECRET_KEY"] = harness.new_secret()
    return exports


def test_check_deploy_passes_in_the_documented_production_environment(tmp_path):
    env = harness.server_env(**documented_production_env(), SYSMANAGE_VAR_DIR=str(tmp_path))
    result = harness.run_python(
        ["manage.py", "check", "--deploy", "--fail-level", "DEBUG"],
        env,
        what="manage.py check --deploy",
    )
    assert result.stdout.strip() == "System check identified no issues (0 silenced).", (
        result.stdout,
        result.stderr,
    )
    assert "WARNING" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    "path", ["/", "/login/", "/admin/login/", "/hosts/", "/api/", "/api/hosts/", "/nowhere/"]
)
def test_every_page_carries_a_content_security_policy(http_server, path):
    session = http_request(
        "GET",
        http_server.server.base_url + path,
        token=http_server.token("admin"),
        headers={"Accept": "text/html"},
    )
    policy = session.headers.get("Content-Security-Policy", "")
    assert "script-src 'self';" in policy, (path, session.status, policy)
    assert "frame-ancestors 'none'" in policy, (path, session.status, policy)
    assert f"connect-src 'self' ws://127.0.0.1:{http_server.server.port};" in policy


def create_sysmanage_host(deployment: harness.Deployment, hostname: str) -> None:
    harness.manage_shell(
        deployment.env,
        "from hosts.models import Host\n"
        f"Host.objects.create(hostname={hostname!r}, agent_kind='sysmanage',"
        " token_hash='0' * 64)",
    )


@pytest.fixture(scope="module")
def proxied_server(
    tmp_path_factory: pytest.TempPathFactory, sqlite_template: tuple[Path, dict[str, Any]]
) -> Iterator[harness.Deployment]:
    """A server in production mode behind a (pretend) TLS proxy: DJANGO_SECURE and
    DJANGO_TRUST_PROXY_HEADERS set, started with ``--proxy-headers`` as documented."""
    work = tmp_path_factory.mktemp("proxied")
    harness.copy_sqlite(sqlite_template[0], work / "db.sqlite3")
    env = harness.server_env(
        **harness.COMMON_SETTINGS,
        DATABASE_URL=harness.sqlite_url(work / "db.sqlite3"),
        SYSMANAGE_VAR_DIR=str(work / "var"),
        DJANGO_SECRET_KEY=harness.new_secret(),
        DJANGO_SECURE="true",
        DJANGO_TRUST_PROXY_HEADERS="true",
    )
    server = harness.DaphneServer(
        "proxied", env, work / "proxied.log", args=["--proxy-headers"]
    ).start()
    try:
        server.wait_ready()
        yield harness.Deployment(env=env, seed=sqlite_template[1], servers=[server], work_dir=work)
    finally:
        server.stop()


def agent_auth(base_url: str, hostname: str, **headers: str) -> HttpResponse:
    return http_request(
        "POST",
        f"{base_url}/api/agent/auth",
        json_body={},
        headers={"x-agent-hostname": hostname, **headers},
    )


def test_behind_a_tls_proxy_the_agent_endpoint_is_wss(proxied_server):
    create_sysmanage_host(proxied_server, "behind-proxy")
    base = proxied_server.server.base_url
    for headers in (
        {"X-Forwarded-Proto": "https"},
        {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.5"},
    ):
        answer = agent_auth(base, "behind-proxy", **headers)
        assert answer.status == 200, (headers, answer)
        assert answer.body["websocket_endpoint"].startswith("wss://"), answer.body


def test_production_mode_is_https_only_but_health_checks_answer(proxied_server):
    base = proxied_server.server.base_url
    plain = http_request("GET", f"{base}/login/", opener=_no_redirects())
    assert plain.status == 301
    assert plain.headers["Location"].startswith("https://")
    secure = http_request(
        "GET", f"{base}/login/", headers={"X-Forwarded-Proto": "https", "Accept": "text/html"}
    )
    assert secure.status == 200
    assert (
        secure.headers["Strict-Transport-Security"]
        == "max-age=31536000; includeSubDomains; preload"
    )
    assert "; secure" in secure.headers["Set-Cookie"].lower()
    assert (
        f"wss://127.0.0.1:{proxied_server.server.port}" in secure.headers["Content-Security-Policy"]
    )
    assert harness.http_get(f"{base}/healthz") == (200, "ok")


def test_without_trusting_the_proxy_a_forged_proto_is_ignored(http_server):
    create_sysmanage_host(http_server, "no-proxy")
    answer = agent_auth(http_server.server.base_url, "no-proxy", **{"X-Forwarded-Proto": "https"})
    assert answer.status == 200, answer
    assert answer.body["websocket_endpoint"].startswith("ws://"), answer.body


def _no_redirects() -> Any:
    class Keep(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    return urllib.request.build_opener(urllib.request.ProxyHandler({}), Keep())


# -- the data directory -------------------------------------------------------------------


def test_an_open_var_dir_and_database_are_made_private_at_start(tmp_path, sqlite_template):
    var = tmp_path / "var"
    var.mkdir(mode=0o755)
    var.chmod(0o755)
    harness.copy_sqlite(sqlite_template[0], var / "sysmanage.sqlite3")
    (var / "sysmanage.sqlite3").chmod(0o644)
    env = harness.server_env(
        **harness.COMMON_SETTINGS,
        SYSMANAGE_VAR_DIR=str(var),
        DJANGO_SECRET_KEY=harness.new_secret(),
    )
    server = harness.DaphneServer("open-var", env, tmp_path / "open-var.log").start()
    try:
        server.wait_ready()
        assert http_request("GET", f"{server.base_url}/login/").status == 200
        assert stat.S_IMODE(var.stat().st_mode) == 0o700
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in var.iterdir()}
        assert modes["sysmanage.sqlite3"] == 0o600, modes
        assert set(modes.values()) == {0o600}, modes
    finally:
        server.stop()
