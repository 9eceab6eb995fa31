"""
Debian's nginx with the shipped configuration of ``deploy/nginx/`` on loopback, run as
the current user under a prefix of its own (``-p``: pid file, logs and temporary files
there): ``sysmanage-upstream.conf`` and ``sysmanage-locations.conf`` as shipped, with only
the upstream ports and the static files' directory changed, in a plain-HTTP server.
Used by ``tests/integration/test_deploy_nginx.py`` and ``bench/restart.py``.
"""

from __future__ import annotations

import contextlib
import getpass
import grp
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.integration import harness

DEPLOY = harness.REPO_ROOT / "deploy"
#: What the shipped files name that a test on loopback must change.
UPSTREAMS = ("server 127.0.0.1:8001 ", "server 127.0.0.1:8002 ")
STATIC_ALIAS = "alias /srv/sysmanage/staticfiles/;"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Nginx:
    """nginx with the shipped configuration, in front of ``ports``, under ``prefix``."""

    def __init__(
        self, binary: str, prefix: Path, ports: list[int], connections: int = 1024
    ) -> None:
        """``connections``: nginx's ``worker_connections``; each proxied socket takes two."""
        self.binary = binary
        self.prefix = prefix
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        prefix.mkdir(parents=True, exist_ok=True)
        upstream = (DEPLOY / "nginx/sysmanage-upstream.conf").read_text()
        for line, port in zip(UPSTREAMS, ports, strict=True):
            assert line in upstream, f"deploy/nginx/sysmanage-upstream.conf lost {line!r}"
            upstream = upstream.replace(line, f"server 127.0.0.1:{port} ")
        locations = (DEPLOY / "nginx/sysmanage-locations.conf").read_text()
        assert STATIC_ALIAS in locations, "deploy/nginx/sysmanage-locations.conf lost its alias"
        locations = locations.replace(STATIC_ALIAS, f"alias {harness.REPO_ROOT / 'static'}/;")
        (prefix / "sysmanage-upstream.conf").write_text(upstream)
        (prefix / "sysmanage-locations.conf").write_text(locations)
        user, group = getpass.getuser(), grp.getgrgid(os.getegid()).gr_name
        temp = "\n".join(
            f"    {kind}_temp_path {prefix / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (prefix / "nginx.conf").write_text(
            f"""
# Run as {user}: as root its workers would otherwise switch to nobody (not root: ignored).
user {user} {group};
daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;
worker_rlimit_nofile {connections * 2};
events {{ worker_connections {connections}; }}
http {{
    access_log {prefix / "access.log"};
{temp}
    include {prefix / "sysmanage-upstream.conf"};
    server {{
        listen 127.0.0.1:{self.port};
        include {prefix / "sysmanage-locations.conf"};
    }}
}}
"""
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def _command(self, *extra: str) -> list[str]:
        return [
            self.binary,
            "-p",
            str(self.prefix),
            "-c",
            str(self.prefix / "nginx.conf"),
            "-e",
            str(self.prefix / "error.log"),
            *extra,
        ]

    def start(self) -> Nginx:
        checked = subprocess.run(self._command("-t"), capture_output=True, text=True, check=False)
        assert checked.returncode == 0, f"nginx -t refused the configuration:\n{checked.stderr}"
        self.process = subprocess.Popen(
            self._command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited {self.process.returncode}:\n{self.errors()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen:\n{self.errors()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)

    def errors(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def find_nginx() -> str | None:
    """The nginx binary (Debian's ``nginx`` package), if installed."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None
    )
