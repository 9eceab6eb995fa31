"""
Process-level machinery of the integration tests: databases, Daphne servers, and
subprocesses that run Django code with a server's environment.

Everything here is synchronous and bounded in time; the fixtures in ``conftest.py``
use it, and tests use :mod:`tests.integration.client` to talk to the servers.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tests.integration.client import obtain_tokens

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
HELPER = Path(__file__).resolve().parent / "_django_helper.py"

SERVER_START_TIMEOUT = 30.0
WS_TRANSPORT_LIMIT = 4 * 1024 * 1024 + 65536
SERVER_STOP_TIMEOUT = 10.0
SUBPROCESS_TIMEOUT = 60.0

#: Environment variables the server reads; never inherited from the test process.
_SERVER_VARS_PREFIXES = ("DJANGO_", "SYSMANAGE_", "JWT_", "WS_")
_SERVER_VARS = {"DATABASE_URL", "REDIS_URL", "FLEET_STATUS_MIN_INTERVAL", "LOG_LEVEL"}

#: Settings of every server and helper process: no host goes offline for silence while
#: the tests run (seeded "online" hosts have no agent to keep them so), and the many
#: deliberately failed handshakes of the tests, all from 127.0.0.1, never block that
#: address (test_security_authz.py tests the limit on servers of its own).
COMMON_SETTINGS = {
    # A server stopped with sockets open closes them over this window (the default is 10 s).
    "DRAIN_SECONDS": "2",
    "HOST_OFFLINE_AFTER_SECONDS": "86400",
    "WS_AUTH_FAILURES_PER_ADDRESS": "100000",
}

#: Settings of the main SQLite server: small enough limits to reach them quickly.
SQLITE_SERVER_SETTINGS = {
    "WS_MAX_SEND_BUFFER_BYTES": str(256 * 1024),
    # A token every 0.5 s: no refill interrupts a flood before its 101st refusal (4029).
    "WS_RATE_LIMIT_PER_SECOND": "2",
    "WS_RATE_LIMIT_BURST": "60",
    "WS_ALLOWED_ORIGINS": "https://dashboard.example.com:8443",
}

#: Every server started and not yet stopped, so failing tests can show their logs.
LIVE_SERVERS: list[DaphneServer] = []


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the test process dies (Linux), so a
    killed test run leaves no server behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@atexit.register
def _stop_leftover_servers() -> None:
    for server in list(LIVE_SERVERS):
        server.stop()


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def server_env(**settings: str | None) -> dict[str, str]:
    """The environment of a server process: ours, minus anything that configures it,
    plus ``settings`` (a None value leaves a variable unset)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _SERVER_VARS and not k.startswith(_SERVER_VARS_PREFIXES)
    }
    env["DJANGO_SETTINGS_MODULE"] = "sysmanage.settings"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTHONPATH", None)
    for key, value in settings.items():
        if value is not None:
            env[key] = value
    return env


def run_python(
    args: list[str],
    env: dict[str, str],
    *,
    timeout: float = SUBPROCESS_TIMEOUT,
    what: str = "subprocess",
) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` in the repository with ``env``; raise with its output on failure."""
    try:
        result = subprocess.run(
            [PYTHON, *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(
            f"{what} timed out after {timeout}s\nstdout:\n{exc.stdout}\nstderr:\n{exc.stderr}"
        ) from None
    if result.returncode != 0:
        raise RuntimeError(
            f"{what} failed with exit code {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def manage_shell(env: dict[str, str], code: str, *, timeout: float = SUBPROCESS_TIMEOUT) -> str:
    """Run ``manage.py shell -c CODE`` with a server's environment; return its stdout."""
    return run_python(
        ["manage.py", "shell", "--no-imports", "-c", code],
        env,
        timeout=timeout,
        what="manage.py shell",
    ).stdout


def seed_database(env: dict[str, str]) -> dict[str, Any]:
    """Migrate the database of ``env`` and create the test users and hosts."""
    result = run_python([str(HELPER), "seed"], env, what="database seeding")
    for line in result.stdout.splitlines():
        if line.startswith("SEED_JSON: "):
            return json.loads(line[len("SEED_JSON: ") :])
    raise RuntimeError(
        f"seeding printed no SEED_JSON line\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


# -- databases ------------------------------------------------------------------------


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


def copy_sqlite(source: Path, target: Path) -> None:
    """Copy a SQLite database (and its WAL, if a writer left one) to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{source}{suffix}")
        if src.exists():
            shutil.copyfile(src, f"{target}{suffix}")


def with_database(url: str, name: str) -> str:
    """``url`` naming database ``name`` instead."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def postgres_reachable(url: str) -> str | None:
    """None if PostgreSQL at ``url`` answers, else why not."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL at {url} is unreachable: {exc}"
    return None


def redis_reachable(url: str) -> str | None:
    """None if Redis at ``url`` answers, else why not."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        client.ping()
        client.close()
    except Exception as exc:
        return f"Redis at {url} is unreachable: {exc}"
    return None


def create_postgres_database(admin_url: str) -> str:
    """Create a fresh, uniquely named database; return its name."""
    import psycopg

    name = f"sysmanage_it_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_postgres_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def delete_redis_keys(url: str, prefix: str) -> int:
    """Delete every Redis key under ``prefix``; return how many."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


# -- servers ------------------------------------------------------------------------


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with _no_proxy_opener().open(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@dataclass
class DaphneServer:
    """One server process (``python -m sysmanage.serve sysmanage.asgi:application``, as
    ``scripts/serve`` runs it: Daphne with a redacting access log) on a port of its own.

    The test process binds the listening socket and hands it to Daphne (``--fd``), so
    the port is known in advance and no other process can take it in between.  A
    ``port`` given before :meth:`start` is bound again (a process restarted where its
    clients and agents look for it); 0 picks a free one.
    """

    name: str
    env: dict[str, str]
    log_path: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    #: more command-line options (``--proxy-headers``)
    args: list[str] = field(default_factory=list)
    _log_file: Any = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> DaphneServer:
        """Start the process (without waiting for it to serve)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(256)
        self.port = listener.getsockname()[1]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("wb")
        try:
            self.process = subprocess.Popen(
                [
                    PYTHON,
                    "-m",
                    "sysmanage.serve",
                    "--fd",
                    str(listener.fileno()),
                    "--application-close-timeout",
                    "5",
                    # as scripts/serve and docs/configuration.md run it: room for large
                    # SysManage-agent inventories (Daphne's default is 1 MiB)
                    "--websocket-max-message-size",
                    str(WS_TRANSPORT_LIMIT),
                    "--websocket-max-frame-size",
                    str(WS_TRANSPORT_LIMIT),
                    *self.args,
                    "sysmanage.asgi:application",
                ],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                pass_fds=[listener.fileno()],
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        finally:
            listener.close()
        LIVE_SERVERS.append(self)
        return self

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT) -> DaphneServer:
        """Wait until ``GET /healthz`` answers ``ok``; raise with the log if it never does."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server {self.name} exited with code "
                    f"{self.process.returncode} while starting:\n{self.log()}"
                )
            try:
                status, body = http_get(f"{self.base_url}/healthz", timeout=1.0)
                if status == 200 and body == "ok":
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"server {self.name} did not answer /healthz within {timeout}s:\n{self.log()}"
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """Terminate the process (SIGTERM, then SIGKILL); return its exit code."""
        if self in LIVE_SERVERS:
            LIVE_SERVERS.remove(self)
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(SERVER_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(SERVER_STOP_TIMEOUT)
            code = self.process.returncode
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def kill(self) -> None:
        """SIGKILL the process, as a crash would end it: no shutdown, no goodbye to any
        client or agent."""
        if self in LIVE_SERVERS:
            LIVE_SERVERS.remove(self)
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(SERVER_STOP_TIMEOUT)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""


def start_servers(specs: list[tuple[str, dict[str, str]]], log_dir: Path) -> list[DaphneServer]:
    """Start several servers at once and wait until all of them serve."""
    servers = [DaphneServer(name, env, log_dir / f"{name}.log").start() for name, env in specs]
    try:
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def new_secret() -> str:
    return secrets.token_urlsafe(50)


@dataclass
class Deployment:
    """Servers sharing one database, the environment they run with, and the seed data."""

    env: dict[str, str]
    seed: dict[str, Any]
    servers: list[DaphneServer]
    work_dir: Path
    tokens: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def server(self) -> DaphneServer:
        return self.servers[0]

    @property
    def password(self) -> str:
        return self.seed["password"]

    def user_id(self, username: str) -> str:
        return self.seed["users"][username]

    def host_id(self, hostname: str) -> str:
        return self.seed["hosts"][hostname]["id"]

    def host_status(self, hostname: str) -> str:
        return self.seed["hosts"][hostname]["status"]

    def token(self, username: str) -> str:
        """An access token of ``username`` (obtained once, through ``/api/token/``)."""
        if username not in self.tokens:
            self.tokens[username] = obtain_tokens(self.server.base_url, username, self.password)
        return self.tokens[username]["access"]

    def refresh_token(self, username: str) -> str:
        self.token(username)
        return self.tokens[username]["refresh"]
