"""
Who may be managed: registrations of SysManage agents, their approval, registration
keys, and the short-lived connection tokens an approved agent connects with.

Every write here runs in one transaction; approvals and key changes are audited.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import secrets
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from hosts.models import (
    AgentKind,
    AgentRegistration,
    Host,
    HostGroup,
    RegistrationKey,
    RegistrationStatus,
)
from hosts.services import host_create
from hosts.smagent import tokens
from hosts.smagent.tokens import normalize_name
from hosts.tokens import token_digest
from sysmanage.audit import Actor, audit
from sysmanage.control import CloseAgent
from sysmanage.events import publish_control

KEY_PREFIX = "smrk_"


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
    details: dict[str, object]


@dataclass(frozen=True)
class RegistrationOutcome:
    """What ``POST /api/host/register`` answers."""

    status: int
    body: dict[str, Any]


# -- registration keys ---------------------------------------------------------------


def _key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_create(
    *,
    name: str,
    max_uses: int | None = None,
    expires_at: Any = None,
    groups: Collection[HostGroup] = (),
    actor: Actor | None = None,
) -> tuple[RegistrationKey, str]:
    """Create a registration key (hosts enrolled with it join ``groups``); returns it and
    its secret, which is not stored."""
    if not name.strip():
        raise ValueError("a registration key needs a name")
    if max_uses is not None and max_uses < 1:
        raise ValueError("max_uses must be at least 1")
    secret = KEY_PREFIX + secrets.token_urlsafe(24)
    with transaction.atomic():
        key = RegistrationKey.objects.create(
            name=name.strip()[:100],
            key_hash=_key_digest(secret),
            key_prefix=secret[:12],
            max_uses=max_uses,
            expires_at=expires_at,
            created_by=actor.user if actor and getattr(actor.user, "pk", None) else None,
        )
        key.groups.set(list(groups))
        joined = {"groups": ", ".join(sorted(g.name for g in groups))} if groups else {}
        audit("registration_key_created", actor, key=key.name, key_id=str(key.id), **joined)
    return key, secret


def key_set_groups(
    *, key_id: Any, groups: Collection[HostGroup], actor: Actor | None = None
) -> RegistrationKey:
    """Make ``groups`` the groups that hosts enrolled with a key join from now on (hosts
    enrolled before keep theirs)."""
    with transaction.atomic():
        key = RegistrationKey.objects.select_for_update().get(id=key_id)
        before = set(key.groups.values_list("pk", flat=True))
        key.groups.set(list(groups))
        if before != {group.pk for group in groups}:
            audit(
                "registration_key_changed",
                actor,
                key=key.name,
                key_id=str(key.id),
                groups=", ".join(sorted(group.name for group in groups)) or "(none)",
            )
    return key


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


def _network(address: str) -> str:
    """The network an address belongs to for the registration limits: its /24 (IPv4)
    or /56 (IPv6), the block one site or customer usually holds."""
    parsed = ipaddress.ip_address(address)
    prefix = 24 if parsed.version == 4 else 56
    return str(ipaddress.ip_network(f"{parsed}/{prefix}", strict=False))


def _flood_problem(remote_address: str | None) -> str | None:
    """Why a registration without a key is refused for the registrations already
    waiting (in all, from its address, from its network) or made within the hour from
    its address; None when it may wait for approval.

    Keyed registrations never get here: a flood of unapproved ones must not stop a
    roll-out with keys.
    """
    unkeyed = AgentRegistration.objects.filter(key__isnull=True)
    pending = unkeyed.filter(status=RegistrationStatus.PENDING)
    if pending.count() >= settings.SYSMANAGE_AGENT_MAX_PENDING:
        return "Too many registrations are waiting for approval"
    if remote_address is None:
        return None
    since = timezone.now() - timedelta(hours=1)
    if (
        pending.filter(remote_address=remote_address).count()
        >= settings.SYSMANAGE_AGENT_PENDING_PER_ADDRESS
        or unkeyed.filter(remote_address=remote_address, created_at__gte=since).count()
        >= settings.SYSMANAGE_AGENT_REGISTRATIONS_PER_HOUR
    ):
        return "Too many registrations from this address; try again later"
    network = _network(remote_address)
    same_network = sum(
        1
        for address in pending.exclude(remote_address=None).values_list("remote_address", flat=True)
        if address is not None and _network(address) == network
    )
    if same_network >= settings.SYSMANAGE_AGENT_PENDING_PER_NETWORK:
        return f"Too many registrations from {network} are waiting; try again later"
    return None


def registration_submit(
    *, request: RegistrationRequest, remote_address: str | None
) -> RegistrationOutcome:
    """Handle a ``registration_request``.

    A new hostname is recorded as waiting for approval, or approved at once with a
    valid registration key (or when auto-approval is on); a key also approves a waiting
    one.  A hostname that is already registered or waiting answers 409 (the agent keeps
    the identity it has), unless an administrator allowed its host to register again
    (:func:`allow_reregistration`): then the first registration in that window waits
    for approval like a new one, and only staff hand the host's identity over.
    """
    try:
        with transaction.atomic():
            return _submit(request, remote_address)
    except IntegrityError:  # a concurrent registration of the same hostname won
        return RegistrationOutcome(409, {"detail": f"{request.hostname} is already registered"})


def _submit(request: RegistrationRequest, remote_address: str | None) -> RegistrationOutcome:
    host = Host.objects.select_for_update().filter(hostname__iexact=request.hostname).first()
    if host is not None:
        return _submit_known(host, request, remote_address)
    key = _take_key(request.key) if request.key else None
    pending = (
        AgentRegistration.objects.select_for_update()
        .filter(hostname__iexact=request.hostname, status=RegistrationStatus.PENDING)
        .first()
    )
    if pending is not None and key is None:
        return RegistrationOutcome(
            409, {"detail": f"{request.hostname} is registered and waiting for approval"}
        )
    if key is None and not settings.SYSMANAGE_AGENT_AUTO_APPROVE:
        rejected = AgentRegistration.objects.filter(
            hostname__iexact=request.hostname,
            status=RegistrationStatus.REJECTED,
            for_host__isnull=True,
        ).exists()
        if rejected:
            raise EnrollmentRefused(
                403, f"The registration of {request.hostname} was rejected by an administrator"
            )
        problem = _flood_problem(remote_address)
        if problem:
            raise EnrollmentRefused(429, problem)
        token, digest = _new_host_token()
        record = _record(request, remote_address, RegistrationStatus.PENDING, digest, None)
        return RegistrationOutcome(
            201, {"id": str(record.id), "host_token": token, "approved": False}
        )
    token, digest = _new_host_token()
    if pending is not None:  # a key now approves the waiting registration
        record = pending
        record.token_hash, record.key = digest, key
        _update_details(record, request, remote_address)
    else:
        record = _record(request, remote_address, RegistrationStatus.PENDING, digest, key)
    host = _approve(record, actor=None)
    return RegistrationOutcome(201, {"id": str(host.id), "host_token": token, "approved": True})


def _submit_known(
    host: Host, request: RegistrationRequest, remote_address: str | None
) -> RegistrationOutcome:
    """A registration naming a known host.

    The agent registers on every start, with the same key if it has one: a known host
    keeps its identity (409), and a key is neither checked nor used up, so revoking or
    using up a key never stops an enrolled agent from starting.  Within a window staff
    opened (:func:`allow_reregistration`) the first registration is recorded as a
    re-registration waiting for approval, with the address it came from; the window
    closes with it, and the host's current token keeps working until staff approve.
    """
    if host.agent_kind != AgentKind.SYSMANAGE:
        raise EnrollmentRefused(
            409, f"{request.hostname} is managed by another kind of agent on this server"
        )
    allowed = host.reregistration_allowed_until
    if allowed is None or allowed <= timezone.now():
        return RegistrationOutcome(409, {"detail": f"{request.hostname} is already registered"})
    host.reregistration_allowed_until = None
    host.save(update_fields=["reregistration_allowed_until", "updated_at"])
    token, digest = _new_host_token()
    record = AgentRegistration(
        hostname=host.hostname, status=RegistrationStatus.PENDING, token_hash=digest, for_host=host
    )
    _update_details(record, request, remote_address)
    record.save()
    return RegistrationOutcome(201, {"id": str(host.id), "host_token": token, "approved": False})


def _update_details(
    record: AgentRegistration, request: RegistrationRequest, remote_address: str | None
) -> None:
    record.fqdn, record.ip_addresses = request.fqdn, request.ip_addresses
    record.agent_version, record.details = request.agent_version, request.details
    record.remote_address = remote_address


def _record(
    request: RegistrationRequest,
    remote_address: str | None,
    status: str,
    digest: str,
    key: RegistrationKey | None,
) -> AgentRegistration:
    record = AgentRegistration(hostname=request.hostname, status=status, token_hash=digest, key=key)
    _update_details(record, request, remote_address)
    record.save()
    return record


def _approve(record: AgentRegistration, *, actor: Actor | None) -> Host:
    """Create the host of a waiting registration (same id, its host token), in the
    groups of the key it registered with."""
    host = host_create(
        hostname=record.hostname,
        host_id=record.id,
        agent_kind=AgentKind.SYSMANAGE,
        groups=list(record.key.groups.all()) if record.key is not None else (),
        fqdn=record.fqdn[:255],
        ip_addresses=record.ip_addresses,
        agent_version=record.agent_version[:50],
    )
    host.token_hash, host.token_issued_at = record.token_hash, timezone.now()
    host.save(update_fields=["token_hash", "token_issued_at", "updated_at"])
    _decide(record, RegistrationStatus.APPROVED, actor, host=host)
    return host


def _approve_reregistration(
    record: AgentRegistration, host_id: uuid.UUID, *, actor: Actor | None
) -> Host:
    """Give ``host_id``, the host of an approved re-registration, the agent's new token:
    the old one, and every connection proven with it, stop working."""
    host = Host.objects.select_for_update().get(id=host_id)
    host.token_hash, host.token_issued_at, host.token_revoked_at = (
        record.token_hash,
        timezone.now(),
        None,
    )
    host.save(update_fields=["token_hash", "token_issued_at", "token_revoked_at", "updated_at"])
    AgentRegistration.objects.filter(host=host).update(host=None)
    _decide(record, RegistrationStatus.APPROVED, actor, host=host)
    publish_control(CloseAgent(host_id=str(host.id), reason="The host registered again"))
    return host


def _decide(
    record: AgentRegistration, status: str, actor: Actor | None, host: Host | None = None
) -> None:
    record.status, record.decided_at = status, timezone.now()
    record.decided_by = actor.user if actor and getattr(actor.user, "pk", None) else None
    if host is not None:
        record.host = host
    record.save()


def registration_approve(*, registration_id: Any, actor: Actor | None = None) -> Host:
    """Approve a waiting registration: the host exists from now on (or, for a
    re-registration, takes the new token), with the id and host token its agent
    already holds."""
    with transaction.atomic():
        record = AgentRegistration.objects.select_for_update().get(id=registration_id)
        if record.status != RegistrationStatus.PENDING:
            raise EnrollmentRefused(409, f"The registration is {record.status}, not waiting")
        if record.for_host_id is not None:
            host = _approve_reregistration(record, record.for_host_id, actor=actor)
        elif Host.objects.filter(hostname__iexact=record.hostname).exists():
            raise EnrollmentRefused(409, f"A host named {record.hostname} exists already")
        else:
            host = _approve(record, actor=actor)
        audit(
            "registration_approved",
            actor,
            host_id=str(host.id),
            hostname=host.hostname,
            reregistration=record.for_host_id is not None,
            remote_address=record.remote_address,
        )
    return host


def registration_reject(*, registration_id: Any, actor: Actor | None = None) -> AgentRegistration:
    """Reject a waiting registration: its agent is refused until the record is deleted."""
    with transaction.atomic():
        record = AgentRegistration.objects.select_for_update().get(id=registration_id)
        if record.status != RegistrationStatus.PENDING:
            raise EnrollmentRefused(409, f"The registration is {record.status}, not waiting")
        _decide(record, RegistrationStatus.REJECTED, actor)
        audit("registration_rejected", actor, hostname=record.hostname)
    return record


def registrations_expire() -> int:
    """End registrations left waiting longer than ``SYSMANAGE_AGENT_PENDING_EXPIRE_SECONDS``
    (run by the maintenance sweep): a flood of registrations nobody approves frees its
    place in the limits by itself, and the records stay, with their addresses."""
    cutoff = timezone.now() - timedelta(seconds=settings.SYSMANAGE_AGENT_PENDING_EXPIRE_SECONDS)
    return AgentRegistration.objects.filter(
        status=RegistrationStatus.PENDING, created_at__lt=cutoff
    ).update(status=RegistrationStatus.EXPIRED, decided_at=timezone.now())


def allow_reregistration(*, host_id: Any, minutes: int = 60, actor: Actor | None = None) -> Host:
    """Let the host's agent register again within ``minutes`` (once): for an agent that
    lost its identity (its local database), which otherwise gets 409 forever."""
    with transaction.atomic():
        host = Host.objects.select_for_update().get(id=host_id)
        if host.agent_kind != AgentKind.SYSMANAGE:
            raise EnrollmentRefused(409, f"{host.hostname} is not managed by a SysManage agent")
        host.reregistration_allowed_until = timezone.now() + timedelta(minutes=minutes)
        host.save(update_fields=["reregistration_allowed_until", "updated_at"])
        audit("host_reregistration_allowed", actor, host_id=str(host.id), hostname=host.hostname)
    return host


# -- connection tokens and proof of identity ---------------------------------------


def name_matches(hostname: str, name: str) -> bool:
    """Whether the agent that calls itself ``name`` may be the host ``hostname``.

    Names compare without regard to case.  The agent registers with its fully qualified
    name (``hostname -f``) but names itself to ``/api/agent/auth`` with the short one
    (``gethostname()``), so a short name also matches ``name.domain``.
    """
    hostname, name = normalize_name(hostname), normalize_name(name)
    return hostname == name or ("." not in name and hostname.startswith(name + "."))


def _named(rows: Any, name: str) -> Any:
    """The rows of ``rows`` (hosts or registrations) that ``name`` may be."""
    name = normalize_name(name)
    matching = Q(hostname__iexact=name)
    if "." not in name:
        matching |= Q(hostname__istartswith=name + ".")
    return rows.filter(matching)


def named_host_ids(name: str) -> set[str]:
    """The SysManage-agent hosts with an agent token that an agent called ``name`` may
    prove to be (usually one; a short name may match several fully qualified ones)."""
    rows = _named(Host.objects.filter(agent_kind=AgentKind.SYSMANAGE), name)
    return {str(pk) for pk in rows.exclude(token_hash="").values_list("id", flat=True)}


def connection_token_issue(hostname: str) -> str:
    """An opaque, short-lived connection token for an agent that calls itself
    ``hostname`` (see :mod:`hosts.smagent.tokens`).

    The token names no host: whichever host of that name the connection then proves to
    be (its ``host_id`` and ``host_token``) is the one it speaks for.  Unknown, waiting
    and rejected names are refused here with the status the agent acts on.
    """
    hosts = list(_named(Host.objects.all(), hostname)[:10])
    if not hosts:
        registrations = AgentRegistration.objects.all()
        if _named(registrations.filter(status=RegistrationStatus.PENDING), hostname).exists():
            raise EnrollmentRefused(403, f"{hostname} is waiting for approval")
        if _named(registrations.filter(status=RegistrationStatus.REJECTED), hostname).exists():
            raise EnrollmentRefused(403, f"The registration of {hostname} was rejected")
        raise EnrollmentRefused(404, f"No host named {hostname} is registered")
    agents = [host for host in hosts if host.agent_kind == AgentKind.SYSMANAGE]
    if not agents:
        raise EnrollmentRefused(403, f"{hostname} is managed by another kind of agent")
    if not any(host.token_hash for host in agents):
        raise EnrollmentRefused(403, f"The agent token of {hostname} was revoked")
    return tokens.issue(hostname)


def connection_token_name(token: str) -> str | None:
    """The name a valid, unexpired connection token was issued for, while a host of
    that name can still be proven; None otherwise."""
    opened = tokens.open_token(token)
    if opened is None or not named_host_ids(opened.name):
        return None
    return opened.name


class Proof(enum.Enum):
    """What a message's ``host_id`` and ``host_token`` prove."""

    REFUSED = "refused"
    #: The token of a re-registration that staff have not approved yet.
    AWAITING_APPROVAL = "awaiting_approval"


def prove(*, name: str, host_id: Any, host_token: Any) -> Host | Proof:
    """The host that ``host_id`` and ``host_token`` prove, if it is one the agent called
    ``name`` may be; else why not."""
    try:
        key = uuid.UUID(str(host_id))
    except ValueError:
        return Proof.REFUSED
    host = Host.objects.filter(id=key, agent_kind=AgentKind.SYSMANAGE).first()
    if host is None or not name_matches(host.hostname, name):
        return Proof.REFUSED
    if host_token_matches(host, host_token):
        return host
    if (
        isinstance(host_token, str)
        and host_token
        and AgentRegistration.objects.filter(
            for_host=host, status=RegistrationStatus.PENDING, token_hash=token_digest(host_token)
        ).exists()
    ):
        return Proof.AWAITING_APPROVAL
    return Proof.REFUSED


def host_token_matches(host: Host, host_token: Any) -> bool:
    """Whether ``host_token`` is the host's current token (compared in constant time)."""
    if not isinstance(host_token, str) or not host_token or not host.token_hash:
        return False
    return secrets.compare_digest(token_digest(host_token), host.token_hash)
