"""
Token refresh against a real server on SQLite, the default deployment.

* A storm of concurrent refreshes while SQLite's write lock is held longer than the
  server's lock timeout: every refresh is answered 200 or 503 with ``Retry-After`` --
  never 500 -- and a refresh told to retry succeeds when retried with the same token
  (the old token is spent only together with the new one being recorded), so nobody
  ends up logged out.
* The reuse grace: a client that never saw the answer to its refresh sends the same
  token again and gets a working pair -- within the grace only, and never after the
  sign-in logged out or the password changed.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.integration import harness
from tests.integration.client import HttpResponse, http_request

pytestmark = pytest.mark.integration

#: Concurrent clients of the storm, each with a sign-in of its own.
STORM = 400
#: The server's SQLite lock timeout (DB_SQLITE_LOCK_TIMEOUT), and how long the test
#: holds the write lock: longer, so that the lock wins for the first wave.
LOCK_TIMEOUT = 2
LOCK_HOLD = LOCK_TIMEOUT + 1.5
#: Tries per client before the test gives up on it.
MAX_TRIES = 25
#: The server's refresh-token reuse grace (JWT_REFRESH_REUSE_GRACE_SECONDS), short so
#: that the test can outwait it.
GRACE = 3


@pytest.fixture(scope="module")
def refresh_server(launch_sqlite: Any) -> Iterator[harness.Deployment]:
    with launch_sqlite(
        "refresh",
        DB_SQLITE_LOCK_TIMEOUT=str(LOCK_TIMEOUT),
        JWT_REFRESH_REUSE_GRACE_SECONDS=str(GRACE),
    ) as deployment:
        yield deployment


def database_path(d: harness.Deployment) -> str:
    return d.env["DATABASE_URL"].removeprefix("sqlite:///")


def mint_refresh_tokens(d: harness.Deployment, count: int, username: str = "viewer") -> list[str]:
    """``count`` sign-ins of ``username`` (refresh tokens as /api/token/ issues them),
    made in a shell: a password check per sign-in would take minutes."""
    out = harness.manage_shell(
        d.env,
        (
            "import json\n"
            "from django.contrib.auth import get_user_model\n"
            "from sysmanage.credentials import FingerprintedRefreshToken\n"
            f"user = get_user_model().objects.get(username={username!r})\n"
            f"print('TOKENS', json.dumps([str(FingerprintedRefreshToken.for_user(user))"
            f" for _ in range({count})]))"
        ),
    )
    return json.loads(out.split("TOKENS ", 1)[1])


def refresh(d: harness.Deployment, token: str) -> HttpResponse:
    return http_request(
        "POST",
        f"{d.server.base_url}/api/token/refresh/",
        json_body={"refresh": token},
        timeout=60,
    )


def refresh_until_done(d: harness.Deployment, token: str) -> tuple[list[int], dict[str, str]]:
    """Refresh, honouring ``Retry-After`` on 503; return the statuses seen and the
    tokens of the answer that succeeded."""
    statuses: list[int] = []
    for _ in range(MAX_TRIES):
        answer = refresh(d, token)
        statuses.append(answer.status)
        if answer.status != 503:
            return statuses, answer.body
        assert answer.body["code"] == "service_unavailable", answer.body
        time.sleep(int(answer.headers["Retry-After"]))
    return statuses, {}


def hold_write_lock(
    path: str, taken: threading.Event, seconds: float, until: Callable[[], bool] = lambda: True
) -> None:
    """Take SQLite's write lock (as a long write of another process would) and hold it
    for ``seconds``, and then until ``until()`` (at most 30 s more)."""
    writer = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        taken.set()
        time.sleep(seconds)
        deadline = time.monotonic() + 30
        while not until() and time.monotonic() < deadline:
            time.sleep(0.1)
        writer.execute("COMMIT")
    finally:
        writer.close()


def test_a_refresh_storm_is_answered_200_or_503_and_nobody_is_logged_out(refresh_server):
    d = refresh_server
    tokens = mint_refresh_tokens(d, STORM)
    log_from = d.server.log_size()
    taken = threading.Event()
    # held until a refresh was told to retry: the requests queue in the server's one
    # database thread, so on a loaded machine the first may arrive late
    holder = threading.Thread(
        target=hold_write_lock,
        args=(
            database_path(d),
            taken,
            LOCK_HOLD,
            lambda: "database busy" in d.server.log_since(log_from),
        ),
    )
    holder.start()
    assert taken.wait(10)
    start = threading.Barrier(STORM)

    def client(token: str) -> tuple[list[int], dict[str, str]]:
        start.wait()
        return refresh_until_done(d, token)

    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=STORM) as pool:
        outcomes = list(pool.map(client, tokens))
    took = time.monotonic() - began
    holder.join()
    statuses = Counter(s for seen, _ in outcomes for s in seen)
    print(f"{STORM} clients refreshed in {took:.1f}s; answers: {dict(statuses)}")
    assert set(statuses) <= {200, 503}, statuses  # never a server error
    assert statuses[503] > 0, "the lock never outlasted the timeout: nothing was tested"
    assert all(seen[-1] == 200 for seen, _ in outcomes), [s for s, _ in outcomes if s[-1] != 200]

    # nobody is logged out: every client's new refresh token works
    with ThreadPoolExecutor(max_workers=20) as pool:
        again = list(pool.map(lambda o: refresh_until_done(d, o[1]["refresh"]), outcomes))
    assert all(seen[-1] == 200 for seen, _ in again), Counter(s for seen, _ in again for s in seen)
    log = d.server.log_since(log_from)
    assert "database busy (database is locked)" in log
    assert "django.request" not in log, log  # counted, not a line per request


def usable(d: harness.Deployment, pair: dict[str, str]) -> bool:
    """Whether the pair's access token is accepted and its refresh token refreshes."""
    hosts = http_request("GET", f"{d.server.base_url}/api/hosts/", token=pair["access"])
    return hosts.status == 200 and refresh(d, pair["refresh"]).status == 200


def refresh_and_hang_up(d: harness.Deployment, token: str) -> None:
    """Send a refresh and close the connection without reading the answer, as a client
    whose network dropped does."""
    body = json.dumps({"refresh": token}).encode()
    with socket.create_connection(("127.0.0.1", d.server.port), timeout=5) as conn:
        conn.sendall(
            b"POST /api/token/refresh/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )


def test_a_refresh_whose_answer_was_lost_can_be_sent_again(refresh_server):
    d = refresh_server
    first, second = mint_refresh_tokens(d, 2)
    seen = refresh(d, first)
    assert seen.status == 200
    again = refresh(d, first)  # as if the first answer never arrived
    assert again.status == 200, again
    assert again.body["refresh"] != seen.body["refresh"]
    assert usable(d, again.body)

    refresh_and_hang_up(d, second)
    retried = refresh(d, second)
    assert retried.status == 200, retried
    assert usable(d, retried.body)


def test_the_grace_ends(refresh_server):
    d = refresh_server
    (token,) = mint_refresh_tokens(d, 1)
    assert refresh(d, token).status == 200
    time.sleep(GRACE + 0.5)
    late = refresh(d, token)
    assert late.status == 401, late
    assert late.body["code"] == "token_not_valid", late.body


def test_no_grace_after_logout(refresh_server):
    d = refresh_server
    (token,) = mint_refresh_tokens(d, 1)
    new = refresh(d, token)
    rotated = time.monotonic()
    assert new.status == 200
    out = http_request(
        "POST", f"{d.server.base_url}/api/token/logout/", json_body={"refresh": new.body["refresh"]}
    )
    assert out.status == 200, out
    assert refresh(d, token).status == 401
    assert time.monotonic() - rotated < GRACE  # it was refused within the grace


def test_no_grace_after_a_password_change(refresh_server):
    d = refresh_server
    harness.manage_shell(
        d.env,
        "from django.contrib.auth import get_user_model\n"
        "get_user_model().objects.create_user(username='grace', password='first horse')\n",
    )
    (token,) = mint_refresh_tokens(d, 1, "grace")
    # a shell ready to change the password at once (starting one takes seconds)
    shell = subprocess.Popen(
        [
            harness.PYTHON,
            "manage.py",
            "shell",
            "--no-imports",
            "-c",
            "import sys\n"
            "from django.contrib.auth import get_user_model\n"
            "user = get_user_model().objects.get(username='grace')\n"
            "print('READY', flush=True)\n"
            "sys.stdin.readline()\n"
            "user.set_password('second horse')\n"
            "user.save()\n"
            "print('DONE', flush=True)\n",
        ],
        cwd=harness.REPO_ROOT,
        env=d.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert shell.stdout is not None
        assert shell.stdin is not None
        assert shell.stdout.readline().strip() == "READY"
        assert refresh(d, token).status == 200
        rotated = time.monotonic()
        shell.stdin.write("\n")
        shell.stdin.flush()
        assert shell.stdout.readline().strip() == "DONE"
        assert refresh(d, token).status == 401
        assert time.monotonic() - rotated < GRACE  # it was refused within the grace
    finally:
        shell.kill()
        shell.wait(10)
