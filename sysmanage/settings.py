"""
Settings for the SysManage server.

Everything that differs between a first run and a deployment comes from the
environment through :func:`env`; ``docs/configuration.md`` lists every variable.
"""

from __future__ import annotations

import os
import secrets
from contextlib import suppress
from datetime import timedelta
from pathlib import Path
from typing import overload

import dj_database_url
import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# Django's generic classes take type arguments at run time too (``ModelAdmin[Alert]``),
# as mypy with django-stubs wants them written.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent


@overload
def env(name: str) -> str | None: ...
@overload
def env(name: str, default: str) -> str: ...
@overload
def env(name: str, default: str | None) -> str | None: ...
def env(name: str, default: str | None = None) -> str | None:
    """Return environment variable ``name``, or ``default`` when unset or empty."""
    value = os.environ.get(name, "")
    return value if value != "" else default


def env_bool(name: str, default: bool) -> bool:
    """Read a yes/no variable; anything but a clear yes/no is a configuration error."""
    value = env(name)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, not {value!r}")


def env_int(name: str, default: int) -> int:
    """Read an integer variable, refusing anything that is not one."""
    value = env(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, not {value!r}") from exc


DEBUG = env_bool("DJANGO_DEBUG", False)
VAR_DIR = Path(env("SYSMANAGE_VAR_DIR", str(BASE_DIR / "var")) or BASE_DIR / "var")


def _private_dir(path: Path) -> None:
    """Create ``path`` for this user only (0700), or make an existing one so.

    ``var/`` holds the secret key, the SQLite database and the admin password; created
    under the usual umask it was 0755, readable by every local user.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    with suppress(OSError):  # another user's directory, a read-only mount: leave it
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)


def _private_sqlite_file(name: str) -> None:
    """Create the SQLite database file 0600 before SQLite does (it would follow the
    umask, 0644), or make an existing one and its journal files so."""
    with suppress(FileExistsError):
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for path in (name, f"{name}-wal", f"{name}-shm", f"{name}-journal"):
        with suppress(OSError):
            if os.stat(path).st_mode & 0o077:
                os.chmod(path, 0o600)


if VAR_DIR.exists():
    _private_dir(VAR_DIR)


def _local_secret_key() -> str:
    """A random key kept in VAR_DIR, so a first run is safe without configuration.

    Several server processes (or hosts) must share DJANGO_SECRET_KEY instead.
    """
    path = VAR_DIR / "secret_key"
    if not path.exists():
        _private_dir(VAR_DIR)
        with suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


def _secret_key_fallbacks(listed: str, key: str) -> list[str]:
    """The former keys of ``DJANGO_SECRET_KEY_FALLBACKS`` (comma-separated), in order.

    The current key among them is refused: it is what an operator who changed
    DJANGO_SECRET_KEY but not this list would have left there (the old key, missing,
    would log everyone out), and it is never needed.
    """
    keys = list(dict.fromkeys(k.strip() for k in listed.split(",") if k.strip()))
    if key in keys:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY_FALLBACKS holds the current DJANGO_SECRET_KEY; list the "
            'former keys only (docs/operations.md, "Rotating the secret key")'
        )
    return keys


SECRET_KEY = env("DJANGO_SECRET_KEY") or _local_secret_key()
# Former keys during a rotation: what was signed with them (sessions, tokens, the agents'
# connection tokens) is still accepted; everything new is signed with SECRET_KEY
# (sysmanage/secretkeys.py; docs/operations.md, "Rotating the secret key").
SECRET_KEY_FALLBACKS = _secret_key_fallbacks(env("DJANGO_SECRET_KEY_FALLBACKS", ""), SECRET_KEY)
ALLOWED_HOSTS = [
    h.strip()
    for h in (env("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]") or "").split(",")
    if h.strip()
]
CSRF_TRUSTED_ORIGINS = [
    o.strip() for o in (env("DJANGO_CSRF_TRUSTED_ORIGINS", "") or "").split(",") if o.strip()
]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "rest_framework_simplejwt.token_blacklist",
    "drf_spectacular",
    "sysmanage",
    "hosts",
    "hosts.smagent",
    "alerts",
    "activity",
]

MIDDLEWARE = [
    "sysmanage.metrics.RequestDurationMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "sysmanage.middleware.ContentSecurityPolicyMiddleware",
    "sysmanage.middleware.DatabaseUnavailableMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "sysmanage.urls"
ASGI_APPLICATION = "sysmanage.asgi.application"
AUTH_USER_MODEL = "sysmanage.User"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------
# DATABASE_URL takes any URL of the usual form (postgres://..., sqlite:///path).
# Without it the server keeps a SQLite file under var/.
DATABASE_URL = env("DATABASE_URL", f"sqlite:///{VAR_DIR / 'sysmanage.sqlite3'}")
# Keep database connections open between requests and socket messages: the database
# threads (DB_THREADS) run every call of the sockets, and opening a connection per call
# cost more than the queries themselves under agent load (docs/benchmarks.md).
try:
    DATABASES = {
        "default": dj_database_url.parse(
            DATABASE_URL, conn_max_age=env_int("DB_CONN_MAX_AGE", 60), conn_health_checks=True
        )
    }
except ValueError as _exc:  # dj_database_url.UnknownSchemeError among them
    _scheme = DATABASE_URL.split(":", 1)[0]
    raise ImproperlyConfigured(
        f"DATABASE_URL: unknown kind of database {_scheme!r}; use postgres://USER@HOST:PORT/NAME "
        "or sqlite:////absolute/path"
    ) from _exc
# Threads that run the database calls of sockets, periodic jobs and the token refresh in
# each process (sysmanage/dbthreads.py); one connection each.  SQLite always uses 1: it
# allows one writer at a time.
DB_THREADS = env_int("DB_THREADS", 4)
# How long a request waits for a pooled PostgreSQL connection before it is answered 503.
DB_POOL_TIMEOUT = env_int("DB_POOL_TIMEOUT", 20)
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Django's backend behind a gate (sysmanage/dbgate.py): once a connection attempt
    # fails, the database counts as unreachable and requests are refused at once (503,
    # 4503) until a probe connects again, instead of each waiting out a timeout.
    DATABASES["default"]["ENGINE"] = "sysmanage.postgres"
    # A connection attempt to a host that never answers gives up after this long
    # (libpq's own default waits forever; psycopg's, 130 s).  libpq's minimum is 2 s.
    DATABASES["default"].setdefault("OPTIONS", {})["connect_timeout"] = env_int(
        "DB_CONNECT_TIMEOUT", 2
    )
    # A connection whose database host died or dropped off the network: a query sent on
    # it fails once TCP has waited DB_TCP_TIMEOUT seconds for an acknowledgement, and a
    # query waiting for its answer once keep-alive probes go unanswered for about as long
    # (the system's defaults wait some fifteen minutes, holding a database thread).  A
    # slow query on a live database is not affected: its host answers the probes.
    _tcp_timeout = max(2, env_int("DB_TCP_TIMEOUT", 10))
    DATABASES["default"]["OPTIONS"].update(
        {
            "keepalives": 1,
            "keepalives_idle": max(1, _tcp_timeout // 2),
            "keepalives_interval": max(1, _tcp_timeout // 6),
            "keepalives_count": 3,
            "tcp_user_timeout": _tcp_timeout * 1000,
        }
    )
if DATABASES["default"]["ENGINE"] == "sysmanage.postgres" and env_int("DB_POOL_MAX", 10) > 0:
    # A pool per process (psycopg_pool): Django gives every HTTP request a thread of its
    # own, so per-thread connections meant one new PostgreSQL connection per request and,
    # in a connect storm of agents, "too many clients".  Pooled connections are returned
    # after each request or socket message and reused; a request waits (up to
    # DB_POOL_TIMEOUT) for one instead of failing.  Pooling replaces CONN_MAX_AGE.
    # DB_POOL_MAX=0 turns it off (behind an external pooler such as PgBouncer).
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"]["pool"] = {
        "min_size": env_int("DB_POOL_MIN", 2),
        "max_size": env_int("DB_POOL_MAX", 10),
        # One step of the wait: the backend waits DB_POOL_TIMEOUT in steps this long,
        # so that a waiting request notices at once that the database became unreachable.
        "timeout": 0.25,
    }
elif DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets readers proceed while the single writer commits; the timeout rides
    # out short write bursts instead of failing with "database is locked".  Transactions
    # take the write lock when they begin: a deferred one that reads, then writes, fails
    # at once (the timeout does not apply) when another connection wrote in between.
    # A request whose write still finds the lock held after the timeout is answered 503
    # with Retry-After (sysmanage.middleware.DatabaseUnavailableMiddleware), not 500.
    DATABASES["default"].setdefault("OPTIONS", {})
    DATABASES["default"]["OPTIONS"].update(
        {
            "timeout": env_int("DB_SQLITE_LOCK_TIMEOUT", 20),
            "init_command": "PRAGMA journal_mode=WAL;",
            "transaction_mode": "IMMEDIATE",
        }
    )
    if DATABASES["default"]["NAME"] not in ("", ":memory:"):
        _database_dir = Path(DATABASES["default"]["NAME"]).parent
        if _database_dir == VAR_DIR or not _database_dir.exists():
            _private_dir(_database_dir)
        _private_sqlite_file(str(DATABASES["default"]["NAME"]))
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Channel layer ------------------------------------------------------------
# REDIS_URL switches to channels-redis, required for more than one server process.
REDIS_URL = env("REDIS_URL")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # redis-py's default socket timeout equals channels-redis's 5 s BRPOP
                # timeout, which kills idle receivers; give reads room to finish.
                # A command that meets a pooled connection broken by a Redis restart
                # reconnects and is sent again once, instead of failing.
                "hosts": [
                    {"address": REDIS_URL, "socket_timeout": 30, "retry": Retry(NoBackoff(), 1)}
                ],
                "prefix": env("SYSMANAGE_REDIS_PREFIX", "sysmanage") or "sysmanage",
                # Only per-process hub channels receive events; let them queue deep.
                "capacity": 1000,
                "channel_capacity": {"hub*": 100_000},
                "group_expiry": 86400,
                "expiry": 60,
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": 100_000, "expiry": 60},
        }
    }
# How often each server process checks and renews its membership of the layer's events
# group: a Redis that restarted empty (or was flushed) loses it, and the process then
# rejoins and tells its clients that events may have been missed (sysmanage.node).
LAYER_REJOIN_SECONDS = float(env("LAYER_REJOIN_SECONDS", "5") or "5")
# On SIGTERM a server process closes its sockets (1012) spread over this many seconds,
# then stops (sysmanage/drain.py).
DRAIN_SECONDS = max(0.0, float(env("DRAIN_SECONDS", "10") or "10"))

# Channel streams (sysmanage.streams): how much of each channel's recent history is kept
# for clients that resume after a disconnect (count and age; whichever is reached first).
# host_metrics keeps less: its charts back-fill from the stored per-minute history.
STREAM_HISTORY = {
    "default": {
        "size": env_int("STREAM_HISTORY_SIZE", 10_000),
        "seconds": float(env("STREAM_HISTORY_SECONDS", "600") or "600"),
    },
    "host_metrics": {
        "size": env_int("STREAM_METRICS_HISTORY_SIZE", 2_000),
        "seconds": float(env("STREAM_METRICS_HISTORY_SECONDS", "120") or "120"),
    },
}
# With Redis, how long a process lets events gather after reading some, before it reads
# again: each read costs a round trip whatever it brings (docs/benchmarks.md, "Cluster").
STREAM_READ_LINGER_SECONDS = float(env("STREAM_READ_LINGER_MS", "5") or "5") / 1000
# Redis keys of the streams (with REDIS_URL): beside the channel layer's, same prefix.
STREAM_KEY_PREFIX = (env("SYSMANAGE_REDIS_PREFIX", "sysmanage") or "sysmanage") + ":stream"

# --- Authentication -----------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
# Login lockout (activity/lockout.py): failures within the window lock an account for
# one address, or (larger threshold) an address for every account, LOGIN_LOCKOUT_SECONDS;
# an account failing from anywhere is slowed down (never locked), except at addresses it
# logged in from within LOGIN_FAMILIAR_DAYS.
LOGIN_LOCKOUT_THRESHOLD = env_int("LOGIN_LOCKOUT_THRESHOLD", 5)
LOGIN_LOCKOUT_ADDRESS_THRESHOLD = env_int("LOGIN_LOCKOUT_ADDRESS_THRESHOLD", 20)
LOGIN_LOCKOUT_WINDOW_SECONDS = env_int("LOGIN_LOCKOUT_WINDOW_SECONDS", 900)
LOGIN_LOCKOUT_SECONDS = env_int("LOGIN_LOCKOUT_SECONDS", 900)
LOGIN_THROTTLE_THRESHOLD = env_int("LOGIN_THROTTLE_THRESHOLD", 10)
LOGIN_THROTTLE_MAX_SECONDS = env_int("LOGIN_THROTTLE_MAX_SECONDS", 60)
LOGIN_FAMILIAR_DAYS = env_int("LOGIN_FAMILIAR_DAYS", 30)

SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(seconds=env_int("JWT_ACCESS_TTL_SECONDS", 900)),
    "REFRESH_TOKEN_LIFETIME": timedelta(seconds=env_int("JWT_REFRESH_TTL_SECONDS", 86400)),
    "ROTATE_REFRESH_TOKENS": True,
    "BLACKLIST_AFTER_ROTATION": True,
    "UPDATE_LAST_LOGIN": True,
    # Verified with SECRET_KEY_FALLBACKS too (sysmanage.secretkeys.RotatingTokenBackend).
    "SIGNING_KEY": SECRET_KEY,
    "USER_ID_FIELD": "id",
    "USER_ID_CLAIM": "user_id",
    # Tokens carry a fingerprint of the user's credentials, checked wherever a token is
    # accepted: a password change voids them all (sysmanage/credentials.py).
    "AUTH_TOKEN_CLASSES": ("sysmanage.credentials.FingerprintedAccessToken",),
    "TOKEN_OBTAIN_SERIALIZER": "sysmanage.credentials.FingerprintTokenObtainPairSerializer",
    "TOKEN_REFRESH_SERIALIZER": "sysmanage.credentials.FingerprintTokenRefreshSerializer",
}

# A refresh token presented again this soon after it was rotated (the client never saw
# the answer) gets a new pair of its sign-in, unless its successor was spent since or
# the sign-in logged out (sysmanage/credentials.py).  0 turns the grace off.
JWT_REFRESH_REUSE_GRACE_SECONDS = env_int("JWT_REFRESH_REUSE_GRACE_SECONDS", 30)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "sysmanage.credentials.FingerprintJWTAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "sysmanage.pagination.CappedLimitOffsetPagination",
    "PAGE_SIZE": 100,
    "DEFAULT_PARSER_CLASSES": [
        "sysmanage.api_input.BoundedJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "EXCEPTION_HANDLER": "sysmanage.api_input.api_exception_handler",
}
# Request limits of the REST API: the most items one page of a list may hold (?limit=
# beyond it gets this many), and how deep a JSON body may nest.
API_MAX_PAGE_SIZE = env_int("API_MAX_PAGE_SIZE", 500)
API_MAX_JSON_DEPTH = env_int("API_MAX_JSON_DEPTH", 64)
SPECTACULAR_SETTINGS = {
    "TITLE": "SysManage server API",
    "DESCRIPTION": "REST API of the SysManage fleet-management server. "
    "The live WebSocket API is at /ws; see docs/websocket-protocol.md.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Several models have a "status" (and an "operation") of their own values: name each
    # set of values.
    "ENUM_NAME_OVERRIDES": {
        "HostStatusEnum": "hosts.models.HostStatus",
        "ExecutionStatusEnum": "hosts.models.ExecutionStatus",
        "OperationStatusEnum": "hosts.models.OperationStatus",
        "RegistrationStatusEnum": "hosts.models.RegistrationStatus",
        "AlertStatusEnum": "alerts.models.AlertStatus",
        # and "operation": what a package operation did, and what a request may ask
        "PackageOperationKindEnum": "hosts.models.PackageOperationKind",
        "PackageChangeEnum": "hosts.models.PACKAGE_CHANGES",
    },
}

# --- WebSocket protocol limits --------------------------------------------------
WS_MAX_MESSAGE_BYTES = env_int("WS_MAX_MESSAGE_BYTES", 64 * 1024)
WS_RATE_LIMIT_PER_SECOND = env_int("WS_RATE_LIMIT_PER_SECOND", 20)
WS_RATE_LIMIT_BURST = env_int("WS_RATE_LIMIT_BURST", 60)
WS_MAX_SEND_BUFFER_BYTES = env_int("WS_MAX_SEND_BUFFER_BYTES", 4 * 1024 * 1024)
# The most items (alerts, commands, package operations) a ``status`` snapshot on subscribe
# lists, and the most bytes of JSON they may take (well under WS_MAX_SEND_BUFFER_BYTES, so
# that a reading client always takes it); it says how many there are in all, and that it
# left some out.
WS_SNAPSHOT_MAX_ITEMS = max(1, env_int("WS_SNAPSHOT_MAX_ITEMS", 500))
WS_SNAPSHOT_MAX_BYTES = max(1024, env_int("WS_SNAPSHOT_MAX_BYTES", 1024 * 1024))
# Open sockets one user may hold in one server process (0: no limit); more get 4429.
WS_MAX_SOCKETS_PER_USER = env_int("WS_MAX_SOCKETS_PER_USER", 50)
# Handshakes failing authentication from one address (IPv6: one /64) within the window
# after which that address is refused at once (4403) until the window passes (0: off).
WS_AUTH_FAILURES_PER_ADDRESS = env_int("WS_AUTH_FAILURES_PER_ADDRESS", 30)
WS_AUTH_FAILURE_WINDOW_SECONDS = env_int("WS_AUTH_FAILURE_WINDOW_SECONDS", 60)
# Origins (scheme://host[:port]) of pages on other hosts allowed to open /ws.
WS_ALLOWED_ORIGINS = [
    o.strip().rstrip("/") for o in (env("WS_ALLOWED_ORIGINS", "") or "").split(",") if o.strip()
]
# Every host's live metrics at once (``host_metrics`` with ``host_id: "*"``): one summary
# per interval of the hosts that reported meanwhile, at most so many hosts and bytes of
# JSON each (the hosts left out lead the next one).  Keep the bytes well under
# WS_MAX_SEND_BUFFER_BYTES; a host's report takes at most about 20 KB.
WS_FLEET_METRICS_INTERVAL = max(0.1, float(env("WS_FLEET_METRICS_INTERVAL", "1.0") or "1.0"))
WS_FLEET_METRICS_MAX_HOSTS = max(1, env_int("WS_FLEET_METRICS_MAX_HOSTS", 2000))
WS_FLEET_METRICS_MAX_BYTES = max(65536, env_int("WS_FLEET_METRICS_MAX_BYTES", 512 * 1024))
FLEET_STATUS_MIN_INTERVAL = float(env("FLEET_STATUS_MIN_INTERVAL", "1.0") or "1.0")
# How often each server process rechecks its client sockets against the database
# (deleted or disabled users, changed passwords, ended sessions, lost rights): the bound
# on how long a change no signal sees (QuerySet.update, raw SQL, an expired session)
# takes to close a socket or end a subscription.  Changes made through save(), the
# admin or the REST API are acted on at once.
WS_RECHECK_SECONDS = max(0.2, float(env("WS_RECHECK_SECONDS", "5") or "5"))
# A socket opened with an access token is told this long before the token expires
# (status ``token_expiring``), or at half the token's lifetime if that is later; 0: never.
WS_TOKEN_WARNING_SECONDS = max(0.0, float(env("WS_TOKEN_WARNING_SECONDS", "60") or "60"))
# How long such a socket stays open after its token expired, waiting for a ``refresh``
# (it keeps its subscriptions but may not subscribe or run commands); 0: closed at expiry.
WS_TOKEN_GRACE_SECONDS = max(0.0, float(env("WS_TOKEN_GRACE_SECONDS", "30") or "30"))

# --- Agents -------------------------------------------------------------------------
HOST_OFFLINE_AFTER_SECONDS = env_int("HOST_OFFLINE_AFTER_SECONDS", 90)
AGENT_HEARTBEAT_INTERVAL = env_int("AGENT_HEARTBEAT_INTERVAL", 30)
AGENT_METRICS_INTERVAL = env_int("AGENT_METRICS_INTERVAL", 5)
AGENT_MAX_MESSAGE_BYTES = env_int("AGENT_MAX_MESSAGE_BYTES", 1024 * 1024)
AGENT_RATE_LIMIT_PER_SECOND = env_int("AGENT_RATE_LIMIT_PER_SECOND", 50)
AGENT_RATE_LIMIT_BURST = env_int("AGENT_RATE_LIMIT_BURST", 200)
# How long a requester waits for the agent's server process to confirm it took a command.
AGENT_DISPATCH_CONFIRM_SECONDS = float(env("AGENT_DISPATCH_CONFIRM_SECONDS", "5") or "5")
# How often each agent connection re-checks its token and its queued work (a safety net
# for revocations and nudges that did not arrive through the channel layer).
AGENT_RECHECK_SECONDS = float(env("AGENT_RECHECK_SECONDS", "10") or "10")
# Extra time past a command's own timeout before the server gives up on its result.
COMMAND_RESULT_GRACE_SECONDS = env_int("COMMAND_RESULT_GRACE_SECONDS", 30)
# A package operation with no word from its agent this long is failed.
PACKAGE_OPERATION_STALL_SECONDS = env_int("PACKAGE_OPERATION_STALL_SECONDS", 1800)
# A reboot whose host is not back online this long after its agent began it is failed.
HOST_REBOOT_TIMEOUT_SECONDS = env_int("HOST_REBOOT_TIMEOUT_SECONDS", 600)
# Certificates that expire within this many days are counted and marked "expiring" on
# the host page and in GET /api/hosts/<id>/certificates/ (alerts follow their own rule).
HOST_CERTIFICATE_WARNING_DAYS = env_int("HOST_CERTIFICATE_WARNING_DAYS", 30)
# How often each server process sweeps for silent hosts and overdue commands.
MAINTENANCE_SWEEP_SECONDS = env_int("MAINTENANCE_SWEEP_SECONDS", 15)
# Fleet runs (a command on many hosts): how often the process running one says it is
# alive, how long a run may go unheard of before the sweep marks it interrupted, and how
# often, at most, its aggregated progress is published (seconds).
FLEET_RUN_HEARTBEAT_SECONDS = float(env("FLEET_RUN_HEARTBEAT_SECONDS", "10") or "10")
FLEET_RUN_STALE_SECONDS = float(env("FLEET_RUN_STALE_SECONDS", "60") or "60")
FLEET_RUN_PROGRESS_INTERVAL = float(env("FLEET_RUN_PROGRESS_INTERVAL", "0.25") or "0.25")
# The most fleet runs one user may have running at once, over every server process (a
# further one is refused until one ended); 0: no limit.
FLEET_RUNS_MAX_RUNNING_PER_USER = env_int("FLEET_RUNS_MAX_RUNNING_PER_USER", 10)

# --- The SysManage agent (POST /api/host/register, /api/agent/*) --------------------
# Approve every registration at once (no admin approval, no key needed).  Off: new
# agents wait for approval unless they present a registration key.
SYSMANAGE_AGENT_AUTO_APPROVE = env_bool("SYSMANAGE_AGENT_AUTO_APPROVE", False)
# Registrations waiting for approval at most; further new ones are refused (429).
SYSMANAGE_AGENT_MAX_PENDING = env_int("SYSMANAGE_AGENT_MAX_PENDING", 1000)
# New registrations without a key accepted from one address per hour, and waiting at
# once from one address and from one network (/24 or /56).  Keyed registrations are
# never counted or refused by these limits.
SYSMANAGE_AGENT_REGISTRATIONS_PER_HOUR = env_int("SYSMANAGE_AGENT_REGISTRATIONS_PER_HOUR", 20)
SYSMANAGE_AGENT_PENDING_PER_ADDRESS = env_int("SYSMANAGE_AGENT_PENDING_PER_ADDRESS", 10)
SYSMANAGE_AGENT_PENDING_PER_NETWORK = env_int("SYSMANAGE_AGENT_PENDING_PER_NETWORK", 50)
# Registrations nobody approved or rejected expire after this long.
SYSMANAGE_AGENT_PENDING_EXPIRE_SECONDS = env_int(
    "SYSMANAGE_AGENT_PENDING_EXPIRE_SECONDS", 7 * 86400
)
# Lifetime of the connection tokens /api/agent/auth hands out (one per connection).
SYSMANAGE_AGENT_TOKEN_SECONDS = env_int("SYSMANAGE_AGENT_TOKEN_SECONDS", 300)
# Until a connection proves whose agent it is (a message with host_id and host_token):
# how long it may take, how many connections one address may hold in that state (per
# process), how many messages and wire bytes each may have held for then, the bytes all
# of them may hold together (per process), and the largest frame parsed before proof
# (larger ones are held unread).
SYSMANAGE_AGENT_PROVE_SECONDS = env_int("SYSMANAGE_AGENT_PROVE_SECONDS", 120)
SYSMANAGE_AGENT_UNPROVEN_PER_ADDRESS = env_int("SYSMANAGE_AGENT_UNPROVEN_PER_ADDRESS", 256)
SYSMANAGE_AGENT_HELD_MESSAGES = env_int("SYSMANAGE_AGENT_HELD_MESSAGES", 50)
SYSMANAGE_AGENT_HELD_BYTES = env_int("SYSMANAGE_AGENT_HELD_BYTES", 1024 * 1024)
SYSMANAGE_AGENT_HELD_BYTES_TOTAL = env_int("SYSMANAGE_AGENT_HELD_BYTES_TOTAL", 64 * 1024 * 1024)
SYSMANAGE_AGENT_UNPROVEN_PARSE_BYTES = env_int("SYSMANAGE_AGENT_UNPROVEN_PARSE_BYTES", 64 * 1024)
# Trust a polling agent that names its host_id (and holds a connection token for that
# host's name) without host_token.  The unchanged agent's polls carry host_token only
# inside some of its messages; off, commands reach a polling agent only in replies to
# polls that carry one.  On, anyone who can reach /api/agent/poll and knows a host's
# name and id can act as that host: only on a network where that is acceptable.
SYSMANAGE_AGENT_TRUST_POLLING = env_bool("SYSMANAGE_AGENT_TRUST_POLLING", False)
# Largest frame or poll body accepted from these agents (inventories run to ~200 KB).
SYSMANAGE_AGENT_MAX_MESSAGE_BYTES = env_int("SYSMANAGE_AGENT_MAX_MESSAGE_BYTES", 4 * 1024 * 1024)
# A sent command not acknowledged this long is sent again (same id: never run twice)...
SYSMANAGE_AGENT_ACK_SECONDS = env_int("SYSMANAGE_AGENT_ACK_SECONDS", 15)
# ... up to this many times in all; then it fails as not delivered.
SYSMANAGE_AGENT_MAX_ATTEMPTS = env_int("SYSMANAGE_AGENT_MAX_ATTEMPTS", 5)
# How long a command waits for its (reconnecting or polling) agent to take it.
SYSMANAGE_AGENT_DELIVERY_SECONDS = env_int("SYSMANAGE_AGENT_DELIVERY_SECONDS", 30)
# The poll interval told to agents on the HTTP polling fallback.
SYSMANAGE_AGENT_POLL_INTERVAL = env_int("SYSMANAGE_AGENT_POLL_INTERVAL", 5)
# How often the metric scripts pushed to these agents run (the agent's floor is 60 s).
SYSMANAGE_AGENT_METRICS_CADENCE = env_int("SYSMANAGE_AGENT_METRICS_CADENCE", 60)
# Whether these agents are sent ``check_updates`` when they come online, for a fresh
# report of pending updates rather than their own next hourly check.
SYSMANAGE_AGENT_CHECK_UPDATES_ON_CONNECT = env_bool(
    "SYSMANAGE_AGENT_CHECK_UPDATES_ON_CONNECT", True
)

# How often each server process re-reads alert rules edited in the admin.
ALERT_RULES_RELOAD_SECONDS = env_int("ALERT_RULES_RELOAD_SECONDS", 30)
# How often each server process checks how long hosts have needed a reboot (the
# "reboot_required" alert rules).
ALERT_REBOOT_CHECK_SECONDS = env_int("ALERT_REBOOT_CHECK_SECONDS", 60)
# How often each server process checks how soon the hosts' certificates expire (the
# "cert_expiry" alert rules).
ALERT_CERT_CHECK_SECONDS = env_int("ALERT_CERT_CHECK_SECONDS", 300)

# --- Internationalization, static files ---------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"] if (BASE_DIR / "static").is_dir() else []
STATIC_ROOT = BASE_DIR / "staticfiles"

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# --- HTTPS behind a proxy (docs/configuration.md, "Production mode") ---------------
# The proxy terminates TLS and says so in X-Forwarded-Proto: trust that header only when
# told to (clients must not be able to reach the server around the proxy).  Without it,
# behind a TLS proxy request.is_secure() was false and /api/agent/auth answered ws://.
if env_bool("DJANGO_TRUST_PROXY_HEADERS", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Production mode: HTTPS only.  Plain HTTP is redirected (except the health check, which
# load balancers call directly), cookies are sent over HTTPS only, and browsers are told
# to use HTTPS for a year (HSTS).
if env_bool("DJANGO_SECURE", False):
    SECURE_SSL_REDIRECT = True
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("DJANGO_HSTS_PRELOAD", True)

# GET /metrics (Prometheus): with METRICS_TOKEN set, only to "Authorization: Bearer
# <METRICS_TOKEN>"; without it, only to loopback addresses (docs/operations.md).
METRICS_TOKEN = env("METRICS_TOKEN", "") or ""

# LOG_FORMAT=json: one JSON object per line (Daphne's access log too); text otherwise.
# Either way each line carries the request or connection id it is about
# (sysmanage.logcontext) and has had every credential redacted (sysmanage.logfilters).
LOG_FORMAT = (env("LOG_FORMAT", "text") or "text").strip().lower()
if LOG_FORMAT not in ("text", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be text or json, not {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "redact_tokens": {"()": "sysmanage.logfilters.RedactTokensFilter"},
        "disallowed_host": {"()": "sysmanage.logfilters.DisallowedHostFilter"},
        "context": {"()": "sysmanage.logcontext.ContextFilter"},
    },
    "formatters": {
        "text": {"()": "sysmanage.logcontext.ReadableFormatter"},
        "json": {"()": "sysmanage.logcontext.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["redact_tokens", "context"],
        },
    },
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", "INFO")},
    "loggers": {
        # Django's own configuration gives these loggers handlers of their own, without
        # the redacting filter (the console one in DEBUG); route them through ours.
        "django": {"handlers": ["console"], "level": env("LOG_LEVEL", "INFO"), "propagate": False},
        "django.server": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "django.channels.server": {"level": "INFO"},
        "daphne": {"level": "WARNING"},
        # The pool warns of every failed connection attempt and broken connection; the
        # database gate (sysmanage/dbgate.py) reports an outage once per interval instead.
        "psycopg.pool": {"level": "ERROR"},
        # A request for a host not in ALLOWED_HOSTS: one line saying what to add, once
        # per host and minute, instead of a traceback per request.
        "django.security.DisallowedHost": {"filters": ["disallowed_host"]},
    },
}
