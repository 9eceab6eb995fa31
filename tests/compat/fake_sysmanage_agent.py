"""
A fake of the third-party "SysManage agent", written from the message shapes observed on
the wire (``shared/spec/sysmanage-agent-protocol.md``), not from the agent's code.

It speaks to a server exactly as the unchanged agent does:

* ``POST /api/host/register`` with a full ``registration_request``;
* ``GET /`` (must be 200) before every socket attempt;
* ``POST /api/agent/auth`` with ``x-agent-hostname`` for a fresh connection token;
* a WebSocket on ``/api/agent/connect?token=...`` (no ``Origin`` header, the default
  1 MiB frame limit), where every message it sends has the envelope
  ``{message_type, message_id, timestamp, data{..., host_id, host_token}}`` -- except
  that messages whose data names the host already (``system_info``, ``hardware_update``,
  ``software_inventory_update``, the periodic ``user_access_update``) carry ``host_id``
  without ``host_token``, as the real agent's do;
* or, as a fallback, ``POST /api/agent/poll`` with ``Authorization: Bearer <token>``.

Commands (``execute_shell``, ``install_packages``, ``uninstall_packages``,
``sync_custom_metrics``) are handled as the agent handles them: shell commands really
run, package operations are faked, custom metric scripts really run on request.
``check_updates`` is acknowledged, answered and followed by a ``package_updates_update``
of :attr:`FakeSysManageAgent.available_updates`; it is kept apart (``update_checks``)
from the other commands, which tests count, as is ``check_reboot_status``
(``reboot_checks``, answered with a ``reboot_status_update``).  ``apply_updates`` takes
updates off that list (and makes a reboot required); ``reboot_system`` succeeds, then
the socket drops as the host goes down (``reboots``).  With ``certificates`` (a
list such as :meth:`FakeSysManageAgent.sample_certificates`), the agent reports them
(``host_certificates_update``, every file twice, as the real agent does) when it
connects (``tests/integration/smagent.go_online``) and on ``collect_certificates``.  The
order of acknowledgment and result, and dropping a delivery on purpose, are
configurable so that tests can reach the server's resend and ordering paths.

Only the standard library (urllib, no proxy) and ``websockets`` are used.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

AGENT_VERSION = "0.9.9-fake"
#: The package managers whose updates the agent applies on Linux (and ``*_release``).
PACKAGE_MANAGERS = frozenset({"apt", "snap", "flatpak", "dnf", "yum", "fwupd"})
#: Default bound of every wait.
TIMEOUT = 5.0
#: Orders in which a command's acknowledgment and result can be sent.
ACK_ORDERS = ("ack_first", "result_first", "no_ack")

Predicate = Callable[[dict[str, Any]], bool]


def now_iso() -> str:
    """ISO-8601 UTC, as the agent writes its timestamps."""
    return datetime.now(UTC).isoformat()


def new_message_id() -> str:
    return str(uuid.uuid4())


class AgentHttpError(AssertionError):
    """An HTTP call of the agent got an answer it cannot use."""

    def __init__(self, what: str, status: int, body: Any) -> None:
        super().__init__(f"{what}: HTTP {status}: {body!r}")
        self.status = status
        self.body = body


@dataclass
class Execution:
    """One command the fake agent actually carried out."""

    queue_message_id: str
    command_id: str
    command_type: str
    parameters: dict[str, Any]
    via: str  # "ws" or "poll"
    result: dict[str, Any] = field(default_factory=dict)


class FakeSysManageAgent:
    """One fake agent for ``hostname`` against the server at ``base_url``.

    ``ack_order``: ``"ack_first"`` (acknowledge, then run and send the result),
    ``"result_first"`` (run, send the result, then acknowledge) or ``"no_ack"``.
    ``package_failures``: package names whose install/uninstall the fake reports failed.
    """

    def __init__(
        self,
        base_url: str,
        hostname: str,
        *,
        registration_key: str | None = None,
        ack_order: str = "ack_first",
        fqdn: str | None = None,
        ipv4: str = "127.0.0.1",
        ipv6: str = "::1",
        package_failures: set[str] | None = None,
        compression: str | None = "deflate",
        source_address: str | None = None,
        certificates: list[dict[str, Any]] | None = None,
    ) -> None:
        assert ack_order in ACK_ORDERS, ack_order
        self.set_base_url(base_url)
        self.hostname = hostname
        self.fqdn = fqdn or f"{hostname}.example.test"
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.registration_key = registration_key
        self.ack_order = ack_order
        self.package_failures = set(package_failures or ())
        self.compression = compression
        # the local address to connect from (a loopback address other than 127.0.0.1
        # stands for another machine)
        self.source_address = source_address
        # identity, as the agent keeps it after registering
        self.host_id: str | None = None
        self.host_token: str | None = None
        self.approved: bool | None = None
        # the socket and what came over it (and over polls)
        self.ws: ClientConnection | None = None
        self.connection_token: str | None = None
        self.received: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self.raw_received: list[str | bytes] = []
        self.close_code: int | None = None
        self.close_reason: str = ""
        self._closed = asyncio.Event()
        self._new_message = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # commands
        self.commands: list[dict[str, Any]] = []  # every command message received
        self.executions: list[Execution] = []
        self.dropped: list[dict[str, Any]] = []
        self._drop_next = 0
        self._seen_queue_ids: set[str] = set()
        self.poll_outbox: list[dict[str, Any]] = []
        self.poll_intervals: list[Any] = []
        # pending updates: what a check_updates reports (package_updates_data() if None)
        self.available_updates: list[dict[str, Any]] | None = None
        self.update_checks: list[dict[str, Any]] = []  # check_updates commands received
        # the reboot flag check_reboot_status reports, and those commands received
        self.reboot_required = False
        self.reboot_checks: list[dict[str, Any]] = []
        # reboot_system: each one done (the socket then closes, as the host goes down;
        # the test brings the agent back, as the host's boot does)
        self.reboots: list[float] = []
        # apply_updates: the update_apply_result of the last one, until sent, its delay,
        # and those sent
        self._applied: dict[str, Any] | None = None
        self.apply_delay = 0.2
        self.apply_results: list[dict[str, Any]] = []
        # the certificates found on the host (None: this agent reports none)
        self.certificates = certificates
        self.certificate_collections: list[dict[str, Any]] = []  # collect_certificates
        # custom metrics
        self.custom_metrics: list[dict[str, Any]] = []
        self.host_not_registered_errors = 0

    def set_base_url(self, base_url: str) -> None:
        """Talk to the server at ``base_url`` from now on (REST and socket alike)."""
        self.base_url = base_url.rstrip("/")
        parts = urllib.parse.urlsplit(self.base_url)
        self.ws_base = urllib.parse.urlunsplit(
            ("wss" if parts.scheme == "https" else "ws", parts.netloc, "", "", "")
        )

    # -- HTTP --------------------------------------------------------------------------

    def _http(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        *,
        raw: bytes | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        """One HTTP request (no proxy); JSON answers are decoded."""
        all_headers = {
            "Accept": "application/json",
            "User-Agent": "sysmanage-agent/fake",
            **(headers or {}),
        }
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            all_headers.setdefault("Content-Type", "application/json")
        url = self.base_url + path
        assert url.startswith(("http://", "https://")), url
        if self.source_address is not None:
            return self._http_from(method, path, data, all_headers, timeout)
        request = urllib.request.Request(  # noqa: S310
            url,
            data=data,
            method=method,
            headers=all_headers,
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=timeout) as response:
                status, content = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, content = exc.code, exc.read()
        text = content.decode(errors="replace")
        try:
            parsed: Any = json.loads(text) if text else None
        except ValueError:
            parsed = text
        return status, parsed

    def _http_from(
        self, method: str, path: str, data: bytes | None, headers: dict[str, str], timeout: float
    ) -> tuple[int, Any]:
        """:meth:`_http` from ``source_address`` (plain HTTP only)."""
        parts = urllib.parse.urlsplit(self.base_url)
        assert parts.scheme == "http", self.base_url
        assert parts.hostname, self.base_url
        connection = http.client.HTTPConnection(
            parts.hostname, parts.port, timeout=timeout, source_address=(self.source_address, 0)
        )
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            status, text = response.status, response.read().decode(errors="replace")
        finally:
            connection.close()
        try:
            return status, (json.loads(text) if text else None)
        except ValueError:
            return status, text

    def registration_body(self, **extra: Any) -> dict[str, Any]:
        """The agent's ``registration_request``, plus ``extra`` fields."""
        body: dict[str, Any] = {
            "message_type": "registration_request",
            "message_id": new_message_id(),
            "timestamp": now_iso(),
            "hostname": self.hostname,
            "fqdn": self.fqdn,
            "ipv4": self.ipv4,
            "ipv6": self.ipv6,
            "active": True,
            "script_execution_enabled": True,
            "is_privileged": False,
            "enabled_shells": ["sh", "bash"],
            "agent_version": AGENT_VERSION,
            "agent_capabilities": {
                "schema_version": 1,
                "capabilities": ["shell", "packages", "custom_metrics"],
                "commands": [
                    "execute_shell",
                    "install_packages",
                    "uninstall_packages",
                    "sync_custom_metrics",
                ],
                "unavailable": {"reboot_system": "not privileged"},
                "partial": {},
                "not_applicable": {"firewall": "container"},
            },
            # a field this server has never heard of: it must be tolerated
            "fake_agent_extra_field": {"nested": [1, 2, 3]},
        }
        if self.registration_key is not None:
            body["registration_key"] = self.registration_key
        body.update(extra)
        return body

    def register(self, **extra: Any) -> tuple[int, Any]:
        """``POST /api/host/register``; on 200/201 keep ``id`` and ``host_token``."""
        status, body = self._http("POST", "/api/host/register", self.registration_body(**extra))
        if status in (200, 201) and isinstance(body, dict):
            self.host_id = body.get("id")
            self.host_token = body.get("host_token")
            self.approved = body.get("approved")
        return status, body

    def health(self) -> int:
        """``GET /``: the agent's liveness probe before every socket attempt."""
        status, _ = self._http("GET", "/", timeout=5.0)
        return status

    def auth_raw(self, hostname: str | None = None) -> tuple[int, Any]:
        headers = {} if hostname == "" else {"x-agent-hostname": hostname or self.hostname}
        return self._http("POST", "/api/agent/auth", headers=headers)

    def auth(self) -> str:
        """``POST /api/agent/auth``: a fresh connection token (raise otherwise)."""
        status, body = self.auth_raw()
        if status != 200 or not isinstance(body, dict) or "connection_token" not in body:
            raise AgentHttpError("auth", status, body)
        self.connection_token = body["connection_token"]
        return self.connection_token

    # -- envelopes -----------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        ident = {}
        if self.host_id is not None:
            ident["host_id"] = self.host_id
        if self.host_token is not None:
            ident["host_token"] = self.host_token
        return ident

    def envelope(
        self, message_type: str, data: dict[str, Any] | None = None, *, identity: bool = True
    ) -> dict[str, Any]:
        payload = dict(data or {})
        if identity and "host_id" not in payload:
            # As the agent does: it adds host_id and host_token together, and only to
            # data that does not name the host already -- system_info, hardware_update and
            # software_inventory_update carry host_id alone (seen with the real agent).
            payload.update(self.identity())
        return {
            "message_type": message_type,
            "message_id": new_message_id(),
            "timestamp": now_iso(),
            "data": payload,
        }

    def system_info_data(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "fqdn": self.fqdn,
            "ipv4": self.ipv4,
            "ipv6": self.ipv6,
            "platform": "Linux",
            "platform_release": "6.1.0-fake-amd64",
            "platform_version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.0-1",
            "architecture": "x86_64",
            "processor": "x86_64",
            "os_info": {
                "distribution": "Debian GNU/Linux",
                "distribution_version": "12",
                "distribution_codename": "bookworm",
            },
            "timezone": "UTC",
            "is_privileged": False,
            "script_execution_enabled": True,
            "enabled_shells": ["sh", "bash"],
            "agent_version": AGENT_VERSION,
            "host_id": self.host_id,
        }

    def heartbeat_data(self) -> dict[str, Any]:
        return {
            "agent_status": "healthy",
            "hostname": self.hostname,
            "ipv4": self.ipv4,
            "ipv6": self.ipv6,
            "agent_version": AGENT_VERSION,
        }

    @staticmethod
    def os_version_data() -> dict[str, Any]:
        return {
            "platform": "Linux",
            "platform_release": "6.1.0-fake-amd64",
            "platform_version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.0-1",
            "machine_architecture": "x86_64",
            "processor": "x86_64",
            "os_info": {"distribution": "Debian GNU/Linux", "distribution_version": "12"},
        }

    @staticmethod
    def hardware_data() -> dict[str, Any]:
        return {
            "cpu_vendor": "GenuineFake",
            "cpu_model": "Fake CPU @ 2.40GHz",
            "cpu_cores": 2,
            "cpu_threads": 4,
            "cpu_frequency_mhz": 2400,
            "memory_total_mb": 8192,
            "memory_available_mb": 4096,
            "storage_devices": [
                {
                    "name": "/dev/vda1",
                    "mount_point": "/",
                    "total_size": 50 * 2**30,
                    "used_size": 20 * 2**30,
                    "file_system": "ext4",
                },
                {
                    "name": "/dev/vdb1",
                    "mount_point": "/var",
                    "total_size": 100 * 2**30,
                    "used_size": 91 * 2**30,
                    "file_system": "xfs",
                },
            ],
            "network_interfaces": [
                {
                    "name": "lo",
                    "ipv4_addresses": ["127.0.0.1"],
                    "ipv6_addresses": ["::1"],
                    "mac_address": "00:00:00:00:00:00",
                    "is_up": True,
                },
                {
                    "name": "eth0",
                    "ipv4_addresses": ["192.0.2.10"],
                    "ipv6_addresses": [],
                    "mac_address": "02:00:00:00:00:01",
                    "is_up": True,
                },
            ],
        }

    @staticmethod
    def software_inventory_data(packages: int = 3, *, pad: int = 0) -> dict[str, Any]:
        """``packages`` installed packages; ``pad`` extra characters of description each."""
        software = [
            {
                "package_name": f"fake-package-{i:05d}",
                "version": f"1.{i}.0-1",
                "package_manager": "apt",
                "description": "x" * pad,
            }
            for i in range(packages)
        ]
        return {"software_packages": software, "total_packages": len(software)}

    @staticmethod
    def package_updates_data() -> dict[str, Any]:
        updates = [
            {
                "package_name": "openssl",
                "current_version": "3.0.11-1",
                "available_version": "3.0.13-1",
                "package_manager": "apt",
                "is_security_update": True,
            },
            {
                "package_name": "curl",
                "current_version": "7.88.1-10",
                "available_version": "7.88.1-11",
                "package_manager": "apt",
                "is_security_update": False,
            },
        ]
        return {"available_updates": updates, "total_updates": len(updates)}

    def user_access_data(self) -> dict[str, Any]:
        """``user_access_update``'s report: two regular users and two system accounts
        (sent periodically, the agent adds ``host_id`` and no ``host_token``)."""
        users = [
            {
                "username": "root",
                "uid": 0,
                "home_directory": "/root",
                "shell": "/bin/bash",
                "is_system_user": True,
                "groups": ["root"],
            },
            {
                "username": "www-data",
                "uid": 33,
                "home_directory": "/var/www",
                "shell": "/usr/sbin/nologin",
                "is_system_user": True,
                "groups": ["www-data"],
            },
            {
                "username": "alice",
                "uid": 1000,
                "home_directory": "/home/alice",
                "shell": "/bin/bash",
                "is_system_user": False,
                "groups": ["alice", "sudo"],
            },
            {
                "username": "nobody",
                "uid": 65534,
                "home_directory": "/nonexistent",
                "shell": "/usr/sbin/nologin",
                "is_system_user": False,
                "groups": ["nogroup"],
            },
        ]
        groups = [
            {"group_name": "root", "gid": 0, "is_system_group": True},
            {"group_name": "sudo", "gid": 27, "is_system_group": True},
            {"group_name": "alice", "gid": 1000, "is_system_group": False},
        ]
        return {
            "users": users,
            "groups": groups,
            "platform": "Linux",
            "total_users": len(users),
            "total_groups": len(groups),
            "system_users": 2,
            "regular_users": 2,
            "system_groups": 2,
            "regular_groups": 1,
            "hostname": self.hostname,
        }

    def role_data(self) -> dict[str, Any]:
        """``role_data``: the services of two server packages, one running, one stopped
        (the agent adds ``host_id`` and ``host_token``)."""
        roles = [
            {
                "role": "Database Server",
                "package_name": "postgresql",
                "package_version": "15+248+deb12u2",
                "service_name": "postgresql",
                "service_status": "running",
                "is_active": True,
            },
            {
                "role": "Web Server",
                "package_name": "nginx",
                "package_version": "1.22.1-9+deb12u1",
                "service_name": "nginx",
                "service_status": "stopped",
                "is_active": False,
            },
        ]
        return {
            "hostname": self.hostname,
            "roles": roles,
            "role_count": len(roles),
            "collection_timestamp": now_iso(),
        }

    # -- the socket ----------------------------------------------------------------------

    def connect_url(self, token: str | None) -> str:
        url = f"{self.ws_base}/api/agent/connect"
        if token is not None:
            url += "?" + urllib.parse.urlencode({"token": token})
        return url

    async def connect(
        self,
        token: str | None = None,
        *,
        fetch_token: bool = True,
        origin: str | None = None,
        check_health: bool = True,
    ) -> None:
        """Open the socket as the agent does (``GET /``, ``auth``, connect) and start
        reading.  ``token`` replaces the one from ``auth``; with ``fetch_token=False``
        and no token the URL carries none."""
        await self.disconnect()
        if check_health:
            status = await asyncio.to_thread(self.health)
            assert status == 200, f"GET / answered {status}"
        if token is None and fetch_token:
            token = await asyncio.to_thread(self.auth)
        kwargs: dict[str, Any] = {}
        if origin is not None:
            kwargs["origin"] = origin
        if self.source_address is not None:
            kwargs["local_addr"] = (self.source_address, 0)
        self.ws = await connect(
            self.connect_url(token),
            open_timeout=TIMEOUT,
            close_timeout=2,
            proxy=None,
            compression=self.compression,
            **kwargs,
        )
        self.close_code = None
        self.close_reason = ""
        self._closed = asyncio.Event()
        self._reader = asyncio.create_task(self._read_loop(self.ws))

    @property
    def is_closed(self) -> bool:
        """True once the current socket has ended (or before any was opened)."""
        return self.ws is None or self._closed.is_set()

    async def disconnect(self) -> None:
        """Close the socket (normal closure) and stop reading."""
        ws, self.ws = self.ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 3)
            self._reader = None

    async def abort(self) -> None:
        """Drop the connection without a close frame (the network went away)."""
        ws, self.ws = self.ws, None
        if ws is not None:
            ws.transport.abort()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 3)
            self._reader = None

    async def close(self) -> None:
        """Disconnect and wait for the commands still running."""
        await self.disconnect()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _read_loop(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                self.raw_received.append(raw)
                try:
                    message = json.loads(raw)
                except ValueError:
                    message = {"message_type": "<not json>", "raw": raw}
                if not isinstance(message, dict):
                    message = {"message_type": "<not an object>", "raw": message}
                message["_via"] = "ws"
                self._record(message)
                await self._dispatch(message, "ws")
        except ConnectionClosed:
            pass
        finally:
            rcvd = ws.protocol.close_rcvd
            self.close_code = rcvd.code if rcvd is not None else 1006
            self.close_reason = rcvd.reason if rcvd is not None else ""
            self._closed.set()
            self._new_message.set()

    def _record(self, message: dict[str, Any]) -> None:
        message["_at"] = time.monotonic()
        self.received.append(message)
        self._new_message.set()

    async def _dispatch(self, message: dict[str, Any], via: str) -> None:
        kind = message.get("message_type")
        if kind == "ping":
            data = message.get("data") if isinstance(message.get("data"), dict) else {}
            ping_id = data.get("ping_id", message.get("ping_id", message.get("message_id")))
            await self._emit(self.envelope("pong", {"ping_id": ping_id}), via)
        elif kind == "command":
            self._spawn(self._handle_command(message, via))
        elif kind == "sync_custom_metrics":
            # the bare form of the table of server messages: metrics at the top or in data
            data = message.get("data") if isinstance(message.get("data"), dict) else message
            self._store_metrics(data.get("metrics", message.get("metrics", [])))
        elif kind == "registration_success":
            if message.get("host_id"):
                self.host_id = message["host_id"]
            if message.get("host_token"):
                self.host_token = message["host_token"]
            self.approved = message.get("approved", self.approved)
        elif kind == "error" and message.get("error_type") == "host_not_registered":
            self.host_not_registered_errors += 1

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sending ---------------------------------------------------------------------------

    async def _emit(self, message: dict[str, Any], via: str) -> None:
        """Send over the socket, or keep for the next poll (poll message shape)."""
        self.sent.append(message)
        if via == "poll":
            self.poll_outbox.append(self.as_poll_message(message))
            return
        text = json.dumps(message)
        deadline = time.monotonic() + TIMEOUT
        while True:
            ws = self.ws
            if ws is not None:
                try:
                    await ws.send(text)
                    return
                except ConnectionClosed:
                    if ws is self.ws and time.monotonic() >= deadline:
                        raise
            elif time.monotonic() >= deadline:
                raise ConnectionError("the fake agent is not connected")
            # like the agent, keep what is to be said for the next connection (briefly)
            while self.ws is ws and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

    async def send(
        self, message_type: str, data: dict[str, Any] | None = None, *, identity: bool = True
    ) -> dict[str, Any]:
        """Send one enveloped message over the socket; return it (``message_id`` is in it)."""
        message = self.envelope(message_type, data, identity=identity)
        await self._emit(message, "ws")
        return message

    async def send_message(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send ``message`` as it is (JSON-encoded)."""
        await self._emit(message, "ws")
        return message

    async def send_raw(self, frame: str | bytes) -> None:
        """Send one text (str) or binary (bytes) frame as it is."""
        assert self.ws is not None, "not connected"
        await self.ws.send(frame)

    async def send_system_info(self) -> dict[str, Any]:
        return await self.send("system_info", self.system_info_data())

    async def send_heartbeat(self) -> dict[str, Any]:
        return await self.send("heartbeat", self.heartbeat_data())

    async def send_os_version(self) -> dict[str, Any]:
        return await self.send("os_version_update", self.os_version_data())

    async def send_hardware(self) -> dict[str, Any]:
        return await self.send("hardware_update", {**self.hardware_data(), "host_id": self.host_id})

    async def send_software_inventory(self, packages: int = 3, *, pad: int = 0) -> dict[str, Any]:
        return await self.send(
            "software_inventory_update",
            {**self.software_inventory_data(packages, pad=pad), "host_id": self.host_id},
        )

    async def send_certificates(self) -> dict[str, Any]:
        """``host_certificates_update`` of :attr:`certificates`."""
        return await self.send("host_certificates_update", self.certificates_report())

    def certificates_report(self) -> dict[str, Any]:
        """The ``host_certificates_update`` data of :attr:`certificates`: each file
        listed twice, as the real agent lists them (it searches flat, then recursively)."""
        listed = list(self.certificates or [])
        collected = now_iso()
        return {
            "hostname": self.fqdn,
            "certificates": [{**c, "collected_at": collected} for c in listed + listed],
            "collected_at": collected,
        }

    @staticmethod
    def certificate(
        path: str, days: float, *, ca: bool = False, name: str | None = None
    ) -> dict[str, Any]:
        """One certificate as the agent reports it, expiring ``days`` from now (the
        OpenSSL one-line subject; ``certificate_name`` and the fingerprint null, as the
        real agent sends them with OpenSSL 3)."""
        now = datetime.now(UTC)
        cn = name or path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        return {
            "file_path": path,
            "certificate_name": None,
            "subject": f"C = US, O = Example, CN = {cn}",
            "issuer": "C = US, O = Example, CN = Example Root CA" if not ca else f"CN = {cn}",
            "not_before": (now - timedelta(days=400)).isoformat(timespec="seconds"),
            "not_after": (now + timedelta(days=days)).isoformat(timespec="seconds"),
            "serial_number": uuid.uuid5(uuid.NAMESPACE_URL, path).hex.upper(),
            "fingerprint_sha256": None,
            "is_ca": ca,
            "key_usage": "CA",
        }

    @classmethod
    def sample_certificates(cls) -> list[dict[str, Any]]:
        """A CA certificate of the trust store, a server certificate expiring in 5 days,
        an expired one and one good for a year."""
        return [
            cls.certificate("/etc/ssl/certs/Example_Root_CA.pem", 3000, ca=True),
            cls.certificate("/etc/nginx/ssl/shop.example.test.crt", 5),
            cls.certificate("/etc/apache2/ssl/certs/old.example.test.crt", -3),
            cls.certificate("/etc/pki/tls/certs/api.example.test.crt", 365),
        ]

    async def send_package_updates(self) -> dict[str, Any]:
        return await self.send("package_updates_update", self.package_updates_data())

    async def send_user_access(self) -> dict[str, Any]:
        return await self.send(
            "user_access_update", {**self.user_access_data(), "host_id": self.host_id}
        )

    async def send_roles(self) -> dict[str, Any]:
        return await self.send("role_data", self.role_data())

    async def send_script_execution_result(
        self,
        execution_id: str,
        *,
        stdout: str = "",
        stderr: str = "",
        exit_code: int = 0,
        execution_time: float = 0.01,
    ) -> dict[str, Any]:
        """The one flat message: its fields at the top level, no ``data``; it names the
        host by ``host_id`` only."""
        message = {
            "message_type": "script_execution_result",
            "message_id": new_message_id(),
            "timestamp": now_iso(),
            "execution_id": execution_id,
            "success": exit_code == 0,
            "exit_code": exit_code,
            "stdout": stdout,
            "stderr": stderr,
            "execution_time": execution_time,
            "shell_used": "sh",
            "error": None if exit_code == 0 else f"exit code {exit_code}",
            "timeout": False,
            "host_id": self.host_id,
        }
        await self._emit(message, "ws")
        return message

    async def send_custom_metric_samples(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return await self.send("custom_metric_samples", {"samples": samples})

    # -- waiting ---------------------------------------------------------------------------

    async def wait_for(
        self,
        predicate: Predicate,
        timeout: float = TIMEOUT,
        *,
        what: str = "a matching message",
        start: int = 0,
    ) -> dict[str, Any]:
        """The first message received (from index ``start`` on) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            self._new_message.clear()
            for message in self.received[start:]:
                if predicate(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{self.hostname}: no {what} within {timeout}s; received "
                    f"{_short(self.received[start:])}; close code {self.close_code}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_message.wait(), left)

    async def wait_type(
        self,
        message_type: str,
        timeout: float = TIMEOUT,
        *,
        start: int = 0,
        where: Predicate | None = None,
    ) -> dict[str, Any]:
        return await self.wait_for(
            lambda m: m.get("message_type") == message_type and (where is None or where(m)),
            timeout,
            what=f"{message_type!r} message",
            start=start,
        )

    async def wait_ack(self, message_id: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The server's ``ack`` of the message ``message_id``."""
        return await self.wait_for(
            lambda m: (
                m.get("message_type") == "ack"
                and isinstance(m.get("data"), dict)
                and m["data"].get("acked_message_id") == message_id
            ),
            timeout,
            what=f"ack of {message_id}",
        )

    async def send_acked(
        self, message_type: str, data: dict[str, Any] | None = None, timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        """Send a message and return the server's ack of it."""
        message = await self.send(message_type, data)
        return await self.wait_ack(message["message_id"], timeout)

    async def wait_closed(self, timeout: float = TIMEOUT) -> int | None:
        """Wait until the server closed the socket; return the close code (1006 if none)."""
        try:
            await asyncio.wait_for(self._closed.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.hostname}: socket still open after {timeout}s; "
                f"received {_short(self.received)}"
            ) from None
        return self.close_code

    async def wait_execution(
        self, predicate: Callable[[Execution], bool] | None = None, timeout: float = TIMEOUT
    ) -> Execution:
        """The first command the agent carried out (and answered) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for execution in self.executions:
                if execution.result and (predicate is None or predicate(execution)):
                    return execution
            await asyncio.sleep(0.02)
        raise AssertionError(
            f"{self.hostname}: no matching execution within {timeout}s; "
            f"commands received: {_short(self.commands)}"
        )

    # -- commands --------------------------------------------------------------------------

    def drop_next_commands(self, count: int = 1) -> None:
        """Ignore the next ``count`` command deliveries entirely (no ack, no result)."""
        self._drop_next += count

    @staticmethod
    def command_ids(message: dict[str, Any]) -> tuple[str, str]:
        """(queue_message_id, message_id) of a command, whichever form it came in."""
        data = message.get("data") if isinstance(message.get("data"), dict) else {}
        queue_id = message.get("queue_message_id") or data.get("queue_message_id")
        message_id = message.get("message_id") or queue_id
        return str(queue_id or message_id), str(message_id)

    @staticmethod
    def _command_body(message: dict[str, Any]) -> dict[str, Any]:
        data = message.get("data") if isinstance(message.get("data"), dict) else {}
        if "command_type" not in data and isinstance(data.get("data"), dict):
            data = data["data"]  # the un-merged poll form
        return data

    async def _handle_command(self, message: dict[str, Any], via: str) -> None:
        if self._command_body(message).get("command_type") == "check_updates":
            await self._check_updates(message, via)
            return
        if self._command_body(message).get("command_type") == "check_reboot_status":
            await self._check_reboot(message, via)
            return
        if self._command_body(message).get("command_type") == "collect_certificates":
            await self._collect_certificates(message, via)
            return
        self.commands.append(message)
        queue_id, message_id = self.command_ids(message)
        if self._drop_next > 0:
            self._drop_next -= 1
            self.dropped.append(message)
            return
        ack = {
            "message_type": "command_acknowledgment",
            "message_id": queue_id,
            "timestamp": now_iso(),
        }
        if queue_id in self._seen_queue_ids:
            # a repeat of a command already taken: acknowledge again, never run it twice
            await self._emit(ack, via)
            return
        self._seen_queue_ids.add(queue_id)
        body = self._command_body(message)
        command_type = body.get("command_type", "")
        parameters = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
        execution = Execution(queue_id, message_id, command_type, parameters, via)
        self.executions.append(execution)
        if self.ack_order == "ack_first":
            await self._emit(ack, via)
        data = await self._carry_out(command_type, parameters, body)
        data = {"command_id": message_id, "command_type": command_type, **data}
        result = self.envelope("command_result", data)
        await self._emit(result, via)
        execution.result = data
        if self.ack_order == "result_first":
            await self._emit(ack, via)
        if command_type == "apply_updates" and data.get("success"):
            self._spawn(self._report_applied(via))
        if command_type == "reboot_system" and data.get("success"):
            self.reboots.append(time.monotonic())
            self.reboot_required = False
            self._spawn(self.abort())  # the host goes down: no close frame

    async def _answer_check(
        self, message: dict[str, Any], via: str, command_type: str, result: dict[str, Any]
    ) -> None:
        """Acknowledge a check command and send its successful ``command_result``."""
        queue_id, message_id = self.command_ids(message)
        await self._emit(
            {
                "message_type": "command_acknowledgment",
                "message_id": queue_id,
                "timestamp": now_iso(),
            },
            via,
        )
        answer = {
            "command_id": message_id,
            "command_type": command_type,
            "success": True,
            "result": result,
            "error": None,
            "exit_code": 0,
        }
        await self._emit(self.envelope("command_result", answer), via)

    async def _check_updates(self, message: dict[str, Any], via: str) -> None:
        """Acknowledge and answer ``check_updates``, then report the updates found."""
        self.update_checks.append(message)
        await self._answer_check(
            message, via, "check_updates", {"message": "Update check completed"}
        )
        await self._emit(self.envelope("package_updates_update", self.updates_report()), via)

    async def _check_reboot(self, message: dict[str, Any], via: str) -> None:
        """Acknowledge and answer ``check_reboot_status``, then report the reboot flag."""
        self.reboot_checks.append(message)
        await self._answer_check(
            message, via, "check_reboot_status", {"reboot_required": self.reboot_required}
        )
        data = self.reboot_status_data(self.reboot_required)
        await self._emit(self.envelope("reboot_status_update", data), via)

    async def _collect_certificates(self, message: dict[str, Any], via: str) -> None:
        """Acknowledge and answer ``collect_certificates``, then report them (no report
        when there are none, as the real agent does)."""
        self.certificate_collections.append(message)
        count = len(self.certificates or [])
        await self._answer_check(message, via, "collect_certificates", {"certificate_count": count})
        if count:
            await self._emit(
                self.envelope("host_certificates_update", self.certificates_report()), via
            )

    def _apply_updates(self, parameters: dict[str, Any]) -> dict[str, Any]:
        """``apply_updates``, as the real agent does it: only ``packages`` entries naming
        both a package and a package manager it knows count (an empty list is refused,
        there is no "every update" form, ``security_only`` is not read); it answers at
        once that it started, and reports how it went in an ``update_apply_result``
        (:attr:`apply_results`) sent after :attr:`apply_delay` seconds, then looks for
        updates again (a ``package_updates_update``)."""
        asked = [
            p
            for p in parameters.get("packages") or []
            if isinstance(p, dict) and p.get("package_name") and p.get("package_manager")
        ]
        if not asked:
            return {
                "success": False,
                "result": None,
                "error": "No packages specified for update",
                "exit_code": None,
            }
        pending = {u["package_name"]: u for u in self.updates_report()["available_updates"]}
        updated, failed = [], []
        for entry in asked:
            name, manager = entry["package_name"], entry["package_manager"]
            update = pending.get(name)
            if manager not in PACKAGE_MANAGERS and not str(manager).endswith("_release"):
                error = f"Unsupported package manager: {manager}"
            elif update is None:
                error = f"E: Unable to locate package {name}"
            else:
                updated.append(
                    {
                        "package_name": name,
                        "old_version": update.get("current_version"),
                        "new_version": update.get("available_version"),
                        "package_manager": manager,
                    }
                )
                continue
            failed.append({"package_name": name, "package_manager": manager, "error": error})
        done = {u["package_name"] for u in updated}
        self.available_updates = [u for u in pending.values() if u["package_name"] not in done]
        self.reboot_required = self.reboot_required or bool(updated)
        self._applied = {
            "updated_packages": updated,
            "failed_packages": failed,
            "requires_reboot": bool(updated),
            "timestamp": "",
            "hostname": self.hostname,
        }
        return {
            "success": True,
            "result": {
                "result": "Updates started in background",
                "packages": [p["package_name"] for p in asked],
            },
            "error": None,
            "exit_code": None,
        }

    async def _report_applied(self, via: str) -> None:
        """Send the ``update_apply_result`` of the last ``apply_updates``, then the
        updates still pending."""
        await asyncio.sleep(self.apply_delay)
        applied, self._applied = self._applied, None
        if applied is None:
            return
        self.apply_results.append(applied)
        await self._emit(self.envelope("update_apply_result", applied), via)
        await self._emit(self.envelope("package_updates_update", self.updates_report()), via)

    def updates_report(self) -> dict[str, Any]:
        """The ``package_updates_update`` data of :attr:`available_updates`."""
        if self.available_updates is None:
            return self.package_updates_data()
        updates = list(self.available_updates)
        return {"available_updates": updates, "total_updates": len(updates)}

    @staticmethod
    def reboot_status_data(required: bool, reason: str = "Kernel updated") -> dict[str, Any]:
        """``reboot_status_update``: whether the host needs a reboot, and why."""
        return {"reboot_required": required, "reboot_required_reason": reason if required else ""}

    async def _carry_out(
        self, command_type: str, parameters: dict[str, Any], body: dict[str, Any]
    ) -> dict[str, Any]:
        if command_type == "execute_shell":
            return await self._execute_shell(parameters, body)
        if command_type in ("install_packages", "uninstall_packages"):
            return self._package_operation(command_type, parameters)
        if command_type == "apply_updates":
            return self._apply_updates(parameters)
        if command_type == "reboot_system":
            return {"success": True, "result": {"message": "Reboot scheduled"}, "error": None}
        if command_type == "sync_custom_metrics":
            metrics = parameters.get("metrics", [])
            self._store_metrics(metrics)
            return {
                "success": True,
                "result": {"metric_count": len(self.custom_metrics)},
                "error": None,
                "exit_code": 0,
            }
        return {
            "success": False,
            "result": None,
            "error": f"Unknown command type: {command_type}",
            "exit_code": None,
        }

    async def _execute_shell(
        self, parameters: dict[str, Any], body: dict[str, Any]
    ) -> dict[str, Any]:
        command = parameters.get("command")
        if not isinstance(command, str) or not command:
            return {
                "success": False,
                "result": None,
                "error": "No command specified",
                "exit_code": None,
            }
        timeout = parameters.get("timeout") or body.get("timeout") or 300
        cwd = parameters.get("working_directory") or None
        try:
            process = await asyncio.create_subprocess_shell(
                command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd
            )
        except OSError as exc:
            return {"success": False, "result": None, "error": str(exc), "exit_code": None}
        try:
            out, err = await asyncio.wait_for(process.communicate(), float(timeout))
        except TimeoutError:
            process.kill()
            await process.wait()
            return {
                "success": False,
                "result": {"result": {"stdout": "", "stderr": "", "exit_code": None}},
                "error": f"Command timed out after {timeout} seconds",
                "exit_code": None,
            }
        code = process.returncode
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        return {
            "success": code == 0,
            "result": {"result": {"stdout": stdout, "stderr": stderr, "exit_code": code}},
            "error": None if code == 0 else (stderr or f"exit code {code}"),
            "exit_code": code,
        }

    def _package_operation(self, command_type: str, parameters: dict[str, Any]) -> dict[str, Any]:
        verb = "Installed" if command_type == "install_packages" else "Removed"
        ok, failed, log = [], [], []
        for package in parameters.get("packages") or []:
            name = package.get("package_name") if isinstance(package, dict) else str(package)
            if name in self.package_failures:
                failed.append({"package_name": name, "error": f"Unable to locate {name}"})
                log.append(f"E: Unable to locate package {name}")
            else:
                ok.append({"package_name": name, "version": "1.0.0-1"})
                log.append(f"{verb} {name} 1.0.0-1")
        success = not failed and bool(ok)
        return {
            "success": success,
            "result": {
                "request_id": parameters.get("request_id"),
                "successful_packages": ok,
                "failed_packages": failed,
                "installation_log": "\n".join(log),
            },
            "error": None
            if success
            else "; ".join(f["error"] for f in failed) or "No packages given",
            "exit_code": 0 if success else 1,
        }

    # -- custom metrics --------------------------------------------------------------------

    def _store_metrics(self, metrics: Any) -> None:
        self.custom_metrics = (
            [m for m in metrics if isinstance(m, dict)] if isinstance(metrics, list) else []
        )

    async def collect_custom_metrics(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Run every stored metric script once, for real (``<interpreter> -c <script>``)."""
        # each script runs on its own cadence in the agent: side by side here
        return list(
            await asyncio.gather(
                *(self._run_metric(metric, timeout) for metric in self.custom_metrics)
            )
        )

    async def _run_metric(self, metric: dict[str, Any], timeout: float) -> dict[str, Any]:
        interpreter = metric.get("interpreter") or "sh"
        sample: dict[str, Any] = {
            "metric_id": metric.get("id"),
            "value": None,
            "status": "error",
            "error_detail": None,
            "collected_at": now_iso(),
        }
        try:
            process = await asyncio.create_subprocess_exec(
                interpreter,
                "-c",
                str(metric.get("script", "")),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except (OSError, TimeoutError) as exc:
            sample["error_detail"] = f"{type(exc).__name__}: {exc}"
            return sample
        lines = out.decode(errors="replace").strip().splitlines()
        if process.returncode != 0:
            sample["error_detail"] = (
                err.decode(errors="replace").strip() or f"exit code {process.returncode}"
            )[:500]
            return sample
        try:
            sample["value"] = float(lines[-1].strip())
            sample["status"] = "ok"
        except (IndexError, ValueError):
            sample["error_detail"] = f"not a number: {lines[-1:]!r}"
        return sample

    async def send_custom_metrics(
        self, timeout: float = 10.0
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Run every metric script and send one ``custom_metric_samples`` batch; return
        (the message, the samples)."""
        samples = await self.collect_custom_metrics(timeout)
        message = await self.send_custom_metric_samples(samples)
        return message, samples

    # -- polling ---------------------------------------------------------------------------

    def poll_message(self, message_type: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        """A message as the agent posts it in a poll (see :meth:`as_poll_message`)."""
        return self.as_poll_message(self.envelope(message_type, data))

    @staticmethod
    def as_poll_message(message: dict[str, Any]) -> dict[str, Any]:
        """As the agent's polling transport posts a message: taken from its outbound
        queue, with the whole message JSON-encoded in ``data`` and the queue entry's
        own id as ``message_id``."""
        return {
            "message_type": message["message_type"],
            "data": json.dumps(message),
            "message_id": new_message_id(),
        }

    def poll_raw(
        self,
        body: Any,
        *,
        token: str | None = None,
        raw: bytes | None = None,
        timeout: float = 40.0,
    ) -> tuple[int, Any]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return self._http("POST", "/api/agent/poll", body, headers, raw=raw, timeout=timeout)

    async def poll(
        self,
        messages: list[dict[str, Any]] | None = None,
        max_wait: float = 0,
        *,
        flush_outbox: bool = True,
    ) -> dict[str, Any]:
        """One poll with a fresh connection token: post ``messages`` (and, unless told
        otherwise, the acknowledgments and results waiting from the last poll), handle
        the commands that come back; return the reply ``{messages, poll_interval}``."""
        token = await asyncio.to_thread(self.auth)
        outgoing = list(messages or [])
        if flush_outbox:
            outgoing += self.poll_outbox
            self.poll_outbox = []
        body = {"host_id": self.host_id, "messages": outgoing, "max_wait": max_wait}
        status, reply = await asyncio.to_thread(
            self.poll_raw, body, token=token, timeout=max_wait + 30
        )
        if status != 200 or not isinstance(reply, dict):
            raise AgentHttpError("poll", status, reply)
        self.poll_intervals.append(reply.get("poll_interval"))
        for item in reply.get("messages") or []:
            message = dict(item)
            # the agent merges a delivered message's data into its top level
            if isinstance(message.get("data"), dict):
                inner = message.pop("data")
                message.update(inner)
            message["_via"] = "poll"
            self._record(message)
            if message.get("message_type") == "command":
                await self._handle_command(message, "poll")
            else:
                await self._dispatch(message, "poll")
        return reply


def _short(messages: list[dict[str, Any]], limit: int = 2000) -> str:
    """The messages, the latest last; long ones (the metric scripts) cut short."""
    parts = []
    for message in messages:
        text = json.dumps(message, default=str)
        parts.append(text if len(text) <= 300 else text[:300] + "...}")
    text = "[" + ", ".join(parts) + "]"
    return text if len(text) <= limit else "[..." + text[-limit:]
