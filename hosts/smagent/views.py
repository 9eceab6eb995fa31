"""
The HTTP side of the SysManage agent: registration, connection tokens and polling.

These endpoints are called by agents, not people: no session, no CSRF, JSON in and out,
and every refusal is a JSON ``{"detail": …}`` with the status the agent acts on.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.db import OperationalError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from hosts import services
from hosts.models import Host, HostStatus
from hosts.smagent import enrollment, protocol, tokens
from hosts.smagent.enrollment import EnrollmentRefused, RegistrationRequest
from hosts.smagent.protocol import AgentProtocolError, CommandMessage, ServerMessage
from hosts.smagent.session import AgentSession
from sysmanage import dbgate
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.node import Node

logger = logging.getLogger(__name__)

HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252}[A-Za-z0-9_])?$")
KEY_FIELDS = ("registration_key", "enrollment_token", "auto_approve_token")
MAX_POLL_MESSAGES = 100
MAX_POLL_WAIT = 25.0
BUSY_RETRY_AFTER = 5
POLL_WAIT_STEP = 1.0


def _refuse(status: int, detail: str) -> JsonResponse:
    return JsonResponse({"detail": detail}, status=status)


def _busy() -> JsonResponse:
    """503 with ``Retry-After``: the database could not take the request in time (a
    connect storm on SQLite's single writer, or no pooled connection free).  The agent
    retries; a 500 would only fill the log with tracebacks."""
    response = _refuse(503, "The server is busy; retry shortly")
    response["Retry-After"] = str(BUSY_RETRY_AFTER)
    return response


def _note_busy(request: HttpRequest, exc: OperationalError) -> None:
    """Count a database fault (logged once per interval), or log another error."""
    fault = dbgate.unavailable(exc)
    if fault is not None:
        dbgate.note(fault, exc)
    else:
        logger.warning("%s answered 503: %s", request.path, exc)


def when_busy_503(view: Any) -> Any:
    """Answer :func:`_busy` when the database is locked, unreachable or out of
    connections."""
    if asyncio.iscoroutinefunction(view):

        @functools.wraps(view)
        async def wrapped_async(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            try:
                return await view(request, *args, **kwargs)
            except OperationalError as exc:
                _note_busy(request, exc)
                return _busy()

        return wrapped_async

    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        try:
            return view(request, *args, **kwargs)
        except OperationalError as exc:
            _note_busy(request, exc)
            return _busy()

    return wrapped


def _json_body(request: HttpRequest, limit: int) -> Mapping[str, object]:
    """The request's JSON object, or :class:`EnrollmentRefused` with 400/413."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > limit:
        raise EnrollmentRefused(413, f"The body exceeds {limit} bytes")
    raw = request.read(limit + 1)
    if len(raw) > limit:
        raise EnrollmentRefused(413, f"The body exceeds {limit} bytes")
    try:
        body = json.loads(raw or b"null")
    except (ValueError, RecursionError):
        raise EnrollmentRefused(400, "The body is not valid JSON") from None
    if not isinstance(body, dict):
        raise EnrollmentRefused(400, "The body must be a JSON object")
    return body


def _text(body: Mapping[str, object], key: str, limit: int) -> str:
    value = body.get(key)
    return str(value)[:limit].replace("\x00", "") if isinstance(value, str | int | float) else ""


def parse_registration(body: Mapping[str, object]) -> RegistrationRequest:
    """The parts of a ``registration_request`` kept; unknown fields are tolerated."""
    hostname = body.get("hostname")
    if not isinstance(hostname, str) or not HOSTNAME.match(hostname):
        raise EnrollmentRefused(
            400,
            "'hostname' must be a host name (letters, digits, dots, "
            "dashes; at most 255 characters)",
        )
    keys: list[str] = []
    for name in KEY_FIELDS:
        key = body.get(name)
        if key:
            if not isinstance(key, str) or len(key) > 200:
                raise EnrollmentRefused(400, "A registration key must be a string")
            keys.append(key)
    details = protocol.storable_object(
        {
            k: body[k]
            for k in (
                "platform",
                "is_privileged",
                "script_execution_enabled",
                "enabled_shells",
                "agent_capabilities",
            )
            if k in body
        }
    )
    if len(json.dumps(details, default=str)) > 64 * 1024:
        details = {k: v for k, v in details.items() if k != "agent_capabilities"}
    return RegistrationRequest(
        hostname=hostname,
        fqdn=_text(body, "fqdn", 255),
        ip_addresses=protocol.facts_from_system_info(body).get("ip_addresses", []),
        agent_version=_text(body, "agent_version", 50),
        key=keys[0] if keys else None,
        details=details,
    )


@csrf_exempt
@require_POST
@when_busy_503
def register(request: HttpRequest) -> JsonResponse:
    """``POST /api/host/register``: 201 new (pending or approved), 200 re-enrolled with a
    key, 409 already registered, 403 refused, 400 malformed, 429 too many, 503 busy."""
    try:
        outcome = enrollment.registration_submit(
            request=parse_registration(_json_body(request, 256 * 1024)),
            remote_address=request.META.get("REMOTE_ADDR"),
        )
    except EnrollmentRefused as exc:
        return _refuse(exc.status, exc.detail)
    return JsonResponse(outcome.body, status=outcome.status)


@csrf_exempt
@require_POST
@when_busy_503
def auth(request: HttpRequest) -> JsonResponse:
    """``POST /api/agent/auth`` (header ``x-agent-hostname``): a connection token."""
    hostname = request.headers.get("x-agent-hostname", "").strip()
    if not hostname or not HOSTNAME.match(hostname):
        return _refuse(400, "Send the host name in the x-agent-hostname header")
    try:
        token = enrollment.connection_token_issue(hostname)
    except EnrollmentRefused as exc:
        return _refuse(exc.status, exc.detail)
    scheme = "wss" if request.is_secure() else "ws"
    return JsonResponse(
        {
            "connection_token": token,
            "expires_in": settings.SYSMANAGE_AGENT_TOKEN_SECONDS,
            "websocket_endpoint": f"{scheme}://{request.get_host()}/api/agent/connect",
        }
    )


#: Poll bodies parsed at once per process: each may be megabytes from anyone holding a
#: connection token, and parsing holds the interpreter.
_PARSING = asyncio.Semaphore(2)


async def _poll_body(request: HttpRequest) -> Mapping[str, object]:
    """The poll's JSON body, parsed off the event loop and the database thread."""
    async with _PARSING:
        return await asyncio.to_thread(
            _json_body, request, settings.SYSMANAGE_AGENT_MAX_MESSAGE_BYTES
        )


async def _poll_request(request: HttpRequest) -> tuple[AgentSession, list[object], float]:
    """``(session, messages, max_wait)`` of a poll, or :class:`EnrollmentRefused`."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    opened = tokens.open_token(token.strip() if scheme.lower() == "bearer" else "")
    if opened is None:
        raise EnrollmentRefused(401, "Missing, invalid or expired connection token")
    body = await _poll_body(request)
    host_id = str(body.get("host_id"))
    candidates = await database_sync_to_async(enrollment.named_host_ids)(opened.name)
    if host_id not in candidates:
        raise EnrollmentRefused(403, "host_id does not match the connection token")
    messages = body.get("messages") or []
    if not isinstance(messages, list) or len(messages) > MAX_POLL_MESSAGES:
        raise EnrollmentRefused(
            400, f"'messages' must be a list of at most {MAX_POLL_MESSAGES} messages"
        )
    wait = body.get("max_wait") or 0
    if isinstance(wait, bool) or not isinstance(wait, int | float) or wait < 0:
        raise EnrollmentRefused(400, "'max_wait' must be a number of seconds")
    session = AgentSession(opened.name, polled=True, candidates={host_id})
    if settings.SYSMANAGE_AGENT_TRUST_POLLING:
        # Trusted by configuration: the host the poll names, without host_token.
        session.bind(await database_sync_to_async(Host.objects.get)(id=host_id))
    return session, messages, min(float(wait), MAX_POLL_WAIT)


async def _handle_polled(
    session: AgentSession, messages: list[object]
) -> tuple[list[ServerMessage], bool]:
    """Handle a poll's messages in order: ``(replies, proven)``, proven when one of them
    proved the host's identity."""
    replies: list[ServerMessage] = []
    proven = False
    for raw in messages:
        try:
            if not isinstance(raw, dict):
                raise AgentProtocolError("invalid_message", "A message must be a JSON object")
            answers, first_proof = await session.handle(raw)
            replies += answers
            proven = proven or first_proof
        except AgentProtocolError as exc:
            replies.append(exc.to_message())
        except Exception:
            logger.exception("error handling a polled message from %s", session.name)
            replies.append(
                protocol.error_message("server_error", "The server could not process this message")
            )
    return replies + session.refuse_held(), proven


@csrf_exempt
@require_POST
@when_busy_503
async def poll(request: HttpRequest) -> JsonResponse:
    """``POST /api/agent/poll``: the agent's messages in, queued commands out.

    Each message is handled as on the socket and answered (ack or error) in the reply.
    A poll speaks for its host only if one of its own messages carries the host's
    ``host_token`` (or ``SYSMANAGE_AGENT_TRUST_POLLING`` is on): only then are its
    messages processed, the host brought online and queued commands handed out; with
    ``max_wait`` the reply then waits (up to 25 s) for a command when none is queued.
    Every reply ends with a ``ping``, whose ``pong`` proves the next poll.
    """
    try:
        session, messages, max_wait = await _poll_request(request)
    except EnrollmentRefused as exc:
        return _refuse(exc.status, exc.detail)
    try:
        await Node.for_running_loop()  # handling publishes events through it
    except Exception:
        logger.exception("cannot reach the channel layer; a poll answered 503")
        return _busy()
    replies, proven = await _handle_polled(session, messages)
    commands: list[ServerMessage] = []
    if session.verified:
        assert session.host is not None
        if (
            proven or settings.SYSMANAGE_AGENT_TRUST_POLLING
        ) and session.host.status != HostStatus.ONLINE:
            await database_sync_to_async(services.host_agent_hello)(
                host_id=session.host_id, session=f"poll-{uuid.uuid4().hex}", facts={}
            )
            if session.mounts is None:  # not sent with a held hardware report
                replies.append(await session.initial_metrics_command())
            if settings.SYSMANAGE_AGENT_CHECK_UPDATES_ON_CONNECT:
                replies.append(session.check_updates_command())
        else:
            session.seen()
        commands += await _due_commands(session, max_wait)
    if not settings.SYSMANAGE_AGENT_TRUST_POLLING:
        # The agent's polls carry host_token only in some messages, and an idle poll
        # carries none: the pong to this ping proves the next poll.
        commands.append(protocol.ping_message())
    return JsonResponse(
        {
            "messages": [protocol.for_polling(m) for m in replies + commands],
            "poll_interval": settings.SYSMANAGE_AGENT_POLL_INTERVAL,
        }
    )


async def _due_commands(session: AgentSession, max_wait: float) -> list[CommandMessage]:
    """The commands due for a proven poll's host, waiting up to ``max_wait`` for one."""
    commands = await session.due_commands()
    deadline = time.monotonic() + max_wait
    while not commands and time.monotonic() < deadline:
        await asyncio.sleep(min(POLL_WAIT_STEP, max(0.0, deadline - time.monotonic())))
        commands = await session.due_commands()
    return commands
