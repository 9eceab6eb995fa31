"""
Limiting password guessing at every login (token endpoint, dashboard and admin forms).

The design is django-axes' combination mode, locking the *combination* of account and
address (``AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]``; axes' default locks
the address alone), plus an address limit and, for attacks on one account from many
addresses, the exponential delay the OWASP Authentication Cheat Sheet describes as the
alternative to locking the account:

* ``pair``: an account tried from one address is locked after
  ``LOGIN_LOCKOUT_THRESHOLD`` failures, for ``LOGIN_LOCKOUT_SECONDS``.  The owner, at
  another address, is not affected.
* ``address``: an address is locked after ``LOGIN_LOCKOUT_ADDRESS_THRESHOLD`` failures
  whatever the accounts (password spraying).
* ``account``: an account failing ``LOGIN_THROTTLE_THRESHOLD`` times from anywhere is
  *slowed down*, never locked: each further attempt must wait a delay that doubles up to
  ``LOGIN_THROTTLE_MAX_SECONDS``.  Addresses the account logged in from within
  ``LOGIN_FAMILIAR_DAYS`` are exempt, so a distributed attack cannot keep the owner out
  of their usual address.

Every entry point normalizes the username once (:func:`login_username_normalize`), and
authenticates with that same string; counters use its case-folded form, so every
spelling that reaches an account counts against the same account.  Counters are rows
(:class:`~activity.models.LoginCounter`) checked and incremented in one transaction
*before* the password is checked; a correct password gives the reservation back.  A
burst of concurrent attempts therefore cannot be evaluated beyond the limits, and every
server process sees the same counts.
"""

from __future__ import annotations

import ipaddress
import math
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.http import HttpRequest
from django.utils import timezone
from rest_framework.request import Request

from activity import selectors
from activity.models import LoginCounter
from activity.services import activity_record, request_origin

PAIR, ADDRESS, ACCOUNT = "pair", "address", "account"
Outcome = Literal["succeeded", "failed", "not_checked"]
#: The login paths: Django's session login forms, or the token endpoint.
LoginVia = Literal["session", "token"]
#: Counter keys are at most this long; longer usernames match no account anyway.
KEY_LENGTH = 200


def login_username_normalize(raw: object) -> str | None:
    """The username a login names, as every entry point authenticates it (None: none).

    NFKC, then surrounding whitespace removed: what Django's login forms do to the
    username before authenticating, applied to the token endpoint too.  Lookups of
    the user model stay exact (case-sensitive) on this string.  A name with a NUL
    character is none (Django's forms refuse it too).
    """
    if not isinstance(raw, str) or "\x00" in raw:  # no database stores NUL in text
        return None
    return unicodedata.normalize("NFKC", raw).strip() or None


def account_key(username: str) -> str:
    """The counting key of an account: case-folded, so that case variants share it
    even on databases whose collation matches usernames case-insensitively."""
    return unicodedata.normalize("NFKC", username.casefold())[:KEY_LENGTH]


def address_key(ip_address: str | None) -> str:
    """The counting key of an address: an IPv6 client counts by its /64, which one
    subscriber usually holds whole."""
    try:
        address = ipaddress.ip_address(ip_address or "")
    except ValueError:
        return (ip_address or "-")[:KEY_LENGTH]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _threshold(scope: str) -> int:
    """The failures at which ``scope``'s counters lock (or slow down); 0: never."""
    return {
        PAIR: settings.LOGIN_LOCKOUT_THRESHOLD,
        ADDRESS: settings.LOGIN_LOCKOUT_ADDRESS_THRESHOLD,
        ACCOUNT: settings.LOGIN_THROTTLE_THRESHOLD,
    }[scope]


@dataclass(frozen=True)
class LoginAttempt:
    """An attempt allowed to check its password, holding its place in ``counters``.

    ``blocks`` maps each counter to ``(blocked_until this attempt set, the value
    before)``, so that an attempt giving its place back also takes back the delay or
    lock it started.
    """

    username: str
    counters: tuple[tuple[str, str], ...]
    blocks: dict[tuple[str, str], tuple[datetime | None, datetime | None]]


@dataclass(frozen=True)
class LoginRefusal:
    """An attempt refused before its password was checked."""

    scope: str
    retry_after: int

    @property
    def code(self) -> str:
        """``login_throttled`` for a slowed-down account, else ``login_locked``."""
        return "login_throttled" if self.scope == ACCOUNT else "login_locked"

    @property
    def message(self) -> str:
        """The words shown to the person refused."""
        return lockout_message(self.retry_after, scope=self.scope)


def lockout_message(seconds: int, *, scope: str = PAIR) -> str:
    """Why a login was refused, and when to try again."""
    if scope == ACCOUNT:
        return (
            f"Too many failed logins for this account. Wait {max(1, seconds)} s before "
            f"trying again."
        )
    minutes = max(1, math.ceil(seconds / 60))
    who = "from this address" if scope == ADDRESS else "for this account from this address"
    return (
        f"Too many failed logins {who}. Try again in {minutes} minute{'s' if minutes != 1 else ''}."
    )


def _counter_keys(username: str, ip_address: str | None) -> list[tuple[str, str]]:
    """The ``(scope, key)`` of every counter an attempt counts in, in locking order."""
    account, address = account_key(username), address_key(ip_address)
    keys = [(PAIR, f"{account}|{address}"[:255]), (ADDRESS, address), (ACCOUNT, account)]
    return sorted(key for key in keys if _threshold(key[0]) > 0)


def _locked_counters(keys: list[tuple[str, str]], now: datetime) -> list[LoginCounter]:
    """The counters of ``keys``, created if new and locked for this transaction, in one
    order (no deadlock between attempts locking the same rows)."""
    LoginCounter.objects.bulk_create(
        [LoginCounter(scope=scope, key=key, window_started=now) for scope, key in keys],
        ignore_conflicts=True,
    )
    match = Q(pk__in=[])
    for scope, key in keys:
        match |= Q(scope=scope, key=key)
    return list(LoginCounter.objects.select_for_update().filter(match).order_by("scope", "key"))


def _expire(counter: LoginCounter, now: datetime) -> None:
    """Start ``counter`` afresh when its window passed or its lock ended."""
    blocked = counter.blocked_until is not None and counter.blocked_until > now
    lock_ended = counter.scope != ACCOUNT and counter.blocked_until is not None and not blocked
    window_over = now >= counter.window_started + timedelta(
        seconds=settings.LOGIN_LOCKOUT_WINDOW_SECONDS
    )
    if lock_ended or (window_over and not blocked):
        counter.failures, counter.window_started, counter.blocked_until = 0, now, None


def _refusal(counters: list[LoginCounter], now: datetime, *, familiar: bool) -> LoginRefusal | None:
    """The longest-lasting reason to refuse, if any."""
    refusals = [
        LoginRefusal(c.scope, max(1, math.ceil((c.blocked_until - now).total_seconds())))
        for c in counters
        if c.blocked_until is not None
        and c.blocked_until > now
        and c.failures >= _threshold(c.scope)
        and not (c.scope == ACCOUNT and familiar)
    ]
    return max(refusals, key=lambda r: r.retry_after, default=None)


def _reserve(counter: LoginCounter, now: datetime) -> None:
    """Count the attempt as failed until its password proves otherwise."""
    counter.failures += 1
    excess = counter.failures - _threshold(counter.scope)
    if excess < 0:
        return
    if counter.scope == ACCOUNT:
        delay = min(2 ** min(excess, 20), settings.LOGIN_THROTTLE_MAX_SECONDS)
    else:
        delay = settings.LOGIN_LOCKOUT_SECONDS
    counter.blocked_until = now + timedelta(seconds=delay)


def login_attempt_begin(*, username: str, ip_address: str | None) -> LoginAttempt | LoginRefusal:
    """Check and count one attempt on ``username`` (normalized) from ``ip_address``,
    atomically, before its password is checked."""
    familiar = selectors.login_address_familiar(username=username, ip_address=ip_address)
    keys = _counter_keys(username, ip_address)
    now = timezone.now()
    with transaction.atomic():
        counters = _locked_counters(keys, now)
        stored = {id(c): (c.failures, c.window_started, c.blocked_until) for c in counters}
        for counter in counters:
            _expire(counter, now)
        refusal = _refusal(counters, now, familiar=familiar)
        blocks: dict[tuple[str, str], tuple[datetime | None, datetime | None]] = {}
        for counter in counters:
            if refusal is None:
                before = counter.blocked_until
                _reserve(counter, now)
                blocks[(counter.scope, counter.key)] = (counter.blocked_until, before)
            # Refused attempts usually change nothing: no write for them under a flood.
            if stored[id(counter)] != (
                counter.failures,
                counter.window_started,
                counter.blocked_until,
            ):
                counter.save(update_fields=["failures", "window_started", "blocked_until"])
    return refusal or LoginAttempt(username=username, counters=tuple(keys), blocks=blocks)


def login_attempt_end(attempt: LoginAttempt, *, outcome: Outcome) -> None:
    """Settle an attempt: a failure keeps its place; a right password (or an attempt
    that never checked one) gives it back, and a right one clears its pair's count."""
    if outcome == "failed":
        return
    now = timezone.now()
    with transaction.atomic():
        for counter in _locked_counters(list(attempt.counters), now):
            if counter.scope == PAIR and outcome == "succeeded":
                counter.failures = 0
            counter.failures = max(0, counter.failures - 1)
            set_by_us, before = attempt.blocks.get((counter.scope, counter.key), (None, None))
            if set_by_us is not None and counter.blocked_until == set_by_us:
                counter.blocked_until = before  # no later attempt moved it since
            if counter.scope != ACCOUNT and counter.failures < _threshold(counter.scope):
                counter.blocked_until = None
            counter.save(update_fields=["failures", "blocked_until"])


def login_attempt_start(
    *, request: HttpRequest | Request | None, raw_username: object, via: LoginVia
) -> LoginAttempt | LoginRefusal | None:
    """The one gate of every login: normalize, then begin the attempt (None: no
    username, so no password will be checked).  A refusal is recorded as
    ``login_locked``."""
    username = login_username_normalize(raw_username)
    if username is None:
        return None
    ip_address, user_agent = request_origin(request)
    result = login_attempt_begin(username=username, ip_address=ip_address)
    if isinstance(result, LoginRefusal):
        activity_record(
            action="login_locked",
            username=username[:150],
            ip_address=ip_address,
            user_agent=user_agent,
            details={"via": via, "retry_after": result.retry_after, "limit": result.scope},
        )
    return result
