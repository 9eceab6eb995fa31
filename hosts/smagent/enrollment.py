"""
Who may be managed: registrations of SysManage agents, their approval, registration
keys, and the short-lived connection tokens an approved agent connects with.

Every write here runs in one transaction; approvals and key changes are audited.
"""
from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core import signing
from django.db import IntegrityError, transaction
from django.utils import timezone

from hosts.models import (
    AgentKind,
    AgentRegistration,
    Host,
    RegistrationKey,
    RegistrationStatus,
)
from hosts.services import host_create
from hosts.tokens import token_digest
from sysmanage.audit import Actor, audit
from sysmanage.events import publish_control

KEY_PREFIX = "smrk_"  # noqa: S105 - a label, not a secret
CONNECTION_TOKEN_SALT = "sysmanage.agent-connection"  # noqa: S105 - a salt, not a secret
FINGERPRINT_CHARS = 16


class EnrollmentRefused(Exception):
    """A registration or token request that is refused: the HTTP status and why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class RegistrationRequest:
    """The parts of a ``registration_request`` the server keeps."""

    hostname: str
    fqdn: str
    ip_addresses: list[str]
    agent_version: str
    key: str | None
    details: dict[str, Any]


@dataclass(frozen=True)
class RegistrationOutcome:
    """What ``POST /api/host/register`` answers."""

    status: int
    body: dict[str, Any]


# -- registration keys ---------------------------------------------------------------


def _key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_create(*, name: str, max_uses: int | None = None, expires_at: Any = None,
               actor: Actor | None = None) -> tuple[RegistrationKey, str]:
    """Create a registration key; returns it and its secret, which is not stored."""
    if not name.strip():
        raise ValueError("a registration key needs a name")
    if max_uses is not None and max_uses < 1:
        raise ValueError("max_uses must be at least 1")
    secret = KEY_PREFIX + secrets.token_urlsafe(24)
    with transaction.atomic():
        key = RegistrationKey.objects.create(
            name=name.strip()[:100], key_hash=_key_digest(secret), key_prefix=secret[:12],
            max_uses=max_uses, expires_at=expires_at,
            created_by=actor.user if actor and getattr(actor.user, "pk", None) else None)
        audit("registration_key_created", actor, key=key.name, key_id=str(key.id))
    return key, secret


def key_revoke(*, key_id: Any, actor: Actor | None = None) -> RegistrationKey:
    """Revoke a registration key: agents presenting it are refused from now on."""
    with transaction.atomic():
        key = RegistrationKey.objects.select_for_update().get(id=key_id)
        if key.revoked_at is None:
            key.revoked_at = timezone.now()
            key.save(update_fields=["revoked_at"])
            audit("registration_key_revoked", actor, key=key.name, key_id=str(key.id))
    return key


def key_problem(key: RegistrationKey) -> str | None:
    """Why ``key`` cannot be used now, or None."""
    if key.revoked_at is not None:
        return "The registration key was revoked"
    if key.expires_at is not None and key.expires_at <= timezone.now():
        return "The registration key has expired"
    if key.max_uses is not None and key.uses >= key.max_uses:
        return "The registration key has been used up"
    return None


def _take_key(secret: str) -> RegistrationKey:
    """Lock the key ``secret`` names and count one use; refuse an unusable key."""
    key = RegistrationKey.objects.select_for_update().filter(key_hash=_key_digest(secret)).first()
    if key is None:
        raise EnrollmentRefused(403, "Unknown registration key")
    problem = key_problem(key)
    if problem:
        raise EnrollmentRefused(403, problem)
    key.uses += 1
    key.save(update_fields=["uses"])
    return key


# -- registrations -------------------------------------------------------------------


def _new_host_token() -> tuple[str, str]:
    token = secrets.token_urlsafe(32)  # the agent keeps at most 64 characters
    return token, token_digest(token)


def _recent_from(address: str | None) -> int:
    """Registrations without a key from ``address`` in the last hour (a keyed roll-out
    behind one address must not block the hosts that ask for approval there)."""
    since = timezone.now() - timedelta(hours=1)
    return AgentRegistration.objects.filter(remote_address=address, created_at__gte=since,
                                            key__isnull=True).count()


def registration_submit(*, request: RegistrationRequest,
                        remote_address: str | None) -> RegistrationOutcome:
    """Handle a ``registration_request``.

    A new hostname is recorded as waiting for approval, or approved at once with a
    valid registration key (or when auto-approval is on); a key also approves a waiting
    one.  A hostname that is already registered or waiting answers 409 (the agent keeps
    the identity it has), unless an administrator allowed its host to register again
    (:func:`allow_reregistration`): then it is enrolled again with a new host token.
    """
    try:
        with transaction.atomic():
            return _submit(request, remote_address)
    except IntegrityError:  # a concurrent registration of the same hostname won
        return RegistrationOutcome(409, {"detail": f"{request.hostname} is already registered"})


def _submit(request: RegistrationRequest, remote_address: str | None) -> RegistrationOutcome:
    host = Host.objects.select_for_update().filter(hostname__iexact=request.hostname).first()
    if host is not None:
        # The agent registers on every start, with the same key if it has one: a known
        # host keeps its identity (409) unless an administrator let it register again.
        # A key is neither checked nor used up here, so revoking or using up a key never
        # stops an enrolled agent from starting.
        if host.agent_kind != AgentKind.SYSMANAGE:
            raise EnrollmentRefused(409, f"{request.hostname} is managed by another kind of "
                                         "agent on this server")
        allowed = host.reregistration_allowed_until
        if allowed is None or allowed <= timezone.now():
            return RegistrationOutcome(409, {"detail": f"{request.hostname} is already "
                                                       "registered"})
        token, digest = _new_host_token()
        host.token_hash, host.token_issued_at, host.token_revoked_at = digest, timezone.now(), None
        host.reregistration_allowed_until = None
        host.save(update_fields=["token_hash", "token_issued_at", "token_revoked_at",
                                 "reregistration_allowed_until", "updated_at"])
        _record(request, remote_address, RegistrationStatus.APPROVED, digest, None, host)
        publish_control("close_agent", host_id=str(host.id), reason="The host registered again")
        return RegistrationOutcome(200, {"id": str(host.id), "host_token": token,
                                         "approved": True})
    key = _take_key(request.key) if request.key else None
    pending = AgentRegistration.objects.select_for_update().filter(
        hostname__iexact=request.hostname, status=RegistrationStatus.PENDING).first()
    if pending is not None and key is None:
        return RegistrationOutcome(409, {"detail": f"{request.hostname} is registered and "
                                                   "waiting for approval"})
    if key is None and not settings.SYSMANAGE_AGENT_AUTO_APPROVE:
        rejected = AgentRegistration.objects.filter(
            hostname=request.hostname, status=RegistrationStatus.REJECTED).exists()
        if rejected:
            raise EnrollmentRefused(403, f"The registration of {request.hostname} was rejected "
                                         "by an administrator")
        if AgentRegistration.objects.filter(status=RegistrationStatus.PENDING).count() \
                >= settings.SYSMANAGE_AGENT_MAX_PENDING:
            raise EnrollmentRefused(429, "Too many registrations are waiting for approval")
        if _recent_from(remote_address) >= settings.SYSMANAGE_AGENT_REGISTRATIONS_PER_HOUR:
            raise EnrollmentRefused(429, "Too many registrations from this address; "
                                         "try again later")
        token, digest = _new_host_token()
        record = _record(request, remote_address, RegistrationStatus.PENDING, digest, None, None)
        return RegistrationOutcome(201, {"id": str(record.id), "host_token": token,
                                         "approved": False})
    token, digest = _new_host_token()
    if pending is not None:  # a key now approves the waiting registration
        record = pending
        record.token_hash, record.key = digest, key
        _update_details(record, request, remote_address)
    else:
        record = _record(request, remote_address, RegistrationStatus.PENDING, digest, key, None)
    host = _approve(record, actor=None)
    return RegistrationOutcome(201, {"id": str(host.id), "host_token": token, "approved": True})


def _update_details(record: AgentRegistration, request: RegistrationRequest,
                    remote_address: str | None) -> None:
    record.fqdn, record.ip_addresses = request.fqdn, request.ip_addresses
    record.agent_version, record.details = request.agent_version, request.details
    record.remote_address = remote_address


def _record(request: RegistrationRequest, remote_address: str | None, status: str,
            digest: str, key: RegistrationKey | None, host: Host | None) -> AgentRegistration:
    record = AgentRegistration(hostname=request.hostname, status=status, token_hash=digest,
                               key=key)
    _update_details(record, request, remote_address)
    if host is not None:
        AgentRegistration.objects.filter(host=host).update(host=None)
        record.host, record.decided_at = host, timezone.now()
    record.save()
    return record


def _approve(record: AgentRegistration, *, actor: Actor | None) -> Host:
    """Create the host of a waiting registration (same id, its host token)."""
    host = host_create(hostname=record.hostname, host_id=record.id,
                       agent_kind=AgentKind.SYSMANAGE, fqdn=record.fqdn[:255],
                       ip_addresses=record.ip_addresses, agent_version=record.agent_version[:50])
    host.token_hash, host.token_issued_at = record.token_hash, timezone.now()
    host.save(update_fields=["token_hash", "token_issued_at", "updated_at"])
    record.status, record.host = RegistrationStatus.APPROVED, host
    record.decided_at = timezone.now()
    record.decided_by = actor.user if actor and getattr(actor.user, "pk", None) else None
    record.save()
    return host


def registration_approve(*, registration_id: Any, actor: Actor | None = None) -> Host:
    """Approve a waiting registration: the host exists from now on, with the id and
    host token its agent already holds."""
    with transaction.atomic():
        record = AgentRegistration.objects.select_for_update().get(id=registration_id)
        if record.status != RegistrationStatus.PENDING:
            raise EnrollmentRefused(409, f"The registration is {record.status}, not waiting")
        if Host.objects.filter(hostname=record.hostname).exists():
            raise EnrollmentRefused(409, f"A host named {record.hostname} exists already")
        host = _approve(record, actor=actor)
        audit("registration_approved", actor, host_id=str(host.id), hostname=host.hostname)
    return host


def registration_reject(*, registration_id: Any, actor: Actor | None = None) -> AgentRegistration:
    """Reject a waiting registration: its agent is refused until the record is deleted."""
    with transaction.atomic():
        record = AgentRegistration.objects.select_for_update().get(id=registration_id)
        if record.status != RegistrationStatus.PENDING:
            raise EnrollmentRefused(409, f"The registration is {record.status}, not waiting")
        record.status, record.decided_at = RegistrationStatus.REJECTED, timezone.now()
        record.decided_by = actor.user if actor and getattr(actor.user, "pk", None) else None
        record.save(update_fields=["status", "decided_at", "decided_by"])
        audit("registration_rejected", actor, hostname=record.hostname)
    return record


def allow_reregistration(*, host_id: Any, minutes: int = 60,
                         actor: Actor | None = None) -> Host:
    """Let the host's agent register again within ``minutes`` (once): for an agent that
    lost its identity (its local database), which otherwise gets 409 forever."""
    with transaction.atomic():
        host = Host.objects.select_for_update().get(id=host_id)
        if host.agent_kind != AgentKind.SYSMANAGE:
            raise EnrollmentRefused(409, f"{host.hostname} is not managed by a SysManage agent")
        host.reregistration_allowed_until = timezone.now() + timedelta(minutes=minutes)
        host.save(update_fields=["reregistration_allowed_until", "updated_at"])
        audit("host_reregistration_allowed", actor, host_id=str(host.id),
              hostname=host.hostname)
    return host


# -- connection tokens ---------------------------------------------------------------


def _named(rows: Any, name: str) -> Any:
    """The one row of ``rows`` (hosts or registrations) called ``name``.

    The agent registers with its fully qualified name (``hostname -f``) but names itself
    to ``/api/agent/auth`` with the short one (``gethostname()``), so a short name also
    matches a unique ``name.domain``.
    """
    exact = rows.filter(hostname__iexact=name).first()
    if exact is not None or "." in name:
        return exact
    qualified = list(rows.filter(hostname__istartswith=name + ".")[:2])
    return qualified[0] if len(qualified) == 1 else None


def connection_token_issue(hostname: str) -> str:
    """A signed, short-lived token for one connection of ``hostname``'s agent.

    It names the host and a fingerprint of its current host token, so that revoking or
    replacing that token also voids every connection token issued before.
    """
    host = _named(Host.objects.all(), hostname)
    if host is None:
        registrations = AgentRegistration.objects.all()
        if _named(registrations.filter(status=RegistrationStatus.PENDING), hostname):
            raise EnrollmentRefused(403, f"{hostname} is waiting for approval")
        if _named(registrations.filter(status=RegistrationStatus.REJECTED), hostname):
            raise EnrollmentRefused(403, f"The registration of {hostname} was rejected")
        raise EnrollmentRefused(404, f"No host named {hostname} is registered")
    if host.agent_kind != AgentKind.SYSMANAGE:
        raise EnrollmentRefused(403, f"{hostname} is managed by another kind of agent")
    if not host.token_hash:
        raise EnrollmentRefused(403, f"The agent token of {hostname} was revoked")
    payload = {"h": str(host.id), "f": host.token_hash[:FINGERPRINT_CHARS],
               "n": secrets.token_hex(4)}
    return signing.dumps(payload, salt=CONNECTION_TOKEN_SALT, compress=False)


def connection_token_host(token: str) -> Host | None:
    """The host a valid, unexpired connection token names, if its host token is unchanged."""
    if not token or len(token) > 512:
        return None
    try:
        payload = signing.loads(token, salt=CONNECTION_TOKEN_SALT,
                                max_age=settings.SYSMANAGE_AGENT_TOKEN_SECONDS)
        host_id = uuid.UUID(str(payload["h"]))
        fingerprint = str(payload["f"])
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        return None
    host = Host.objects.filter(id=host_id, agent_kind=AgentKind.SYSMANAGE).first()
    if host is None or not host.token_hash \
            or host.token_hash[:FINGERPRINT_CHARS] != fingerprint:
        return None
    return host


def host_token_matches(host: Host, host_token: Any) -> bool:
    """Whether ``host_token`` is the host's current token (compared in constant time)."""
    if not isinstance(host_token, str) or not host_token or not host.token_hash:
        return False
    return secrets.compare_digest(token_digest(host_token), host.token_hash)
