"""
Checks of the configuration before the server starts, each problem said in one line that
names what to change: ``python -m sysmanage.preflight [--host HOST]``.

``scripts/serve`` runs it before anything else, and ``python -m sysmanage.serve`` before
Daphne starts, so a mistyped ``DATABASE_URL``, a database that does not exist, a Redis
that does not answer or a public address without ``DJANGO_ALLOWED_HOSTS`` stops the start
with a line a person can act on, and exit status 2, instead of a traceback or a server
that refuses every request.  Once the server runs, losing the database or Redis is
not fatal: it answers 503/4503 and recovers by itself (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

#: What ``DJANGO_ALLOWED_HOSTS`` allows when unset: this machine only.
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}
#: Seconds each dependency gets to answer.
TIMEOUT = 3


def _redacted(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc}"))


def check_settings() -> str | None:
    """Load the settings; a variable they refuse is the problem."""
    from django.core.exceptions import ImproperlyConfigured

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sysmanage.settings")
    try:
        from django.conf import settings

        settings.INSTALLED_APPS  # noqa: B018  # loads the settings module
    except ImproperlyConfigured as exc:
        return str(exc)
    return None


def check_database(db: Mapping[str, Any] | None = None) -> str | None:
    """Connect once to the configured database (or ``db``, settings of the same form),
    bypassing the server's pool and gate."""
    from django.conf import settings

    db = settings.DATABASES["default"] if db is None else db
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return None  # a file under a directory the settings created
    import psycopg

    where = f"{db.get('HOST') or 'localhost'}:{db.get('PORT') or 5432}"
    try:
        psycopg.connect(
            dbname=db["NAME"],
            user=db.get("USER") or None,
            password=db.get("PASSWORD") or None,
            host=db.get("HOST") or None,
            port=db.get("PORT") or None,
            connect_timeout=TIMEOUT,
        ).close()
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split())
        if f'database "{db["NAME"]}" does not exist' in reason:
            return (
                f"DATABASE_URL: PostgreSQL at {where} has no database {db['NAME']!r} "
                f"(create it with: createdb {db['NAME']}, or fix the name in DATABASE_URL)"
            )
        if "password authentication failed" in reason or 'role "' in reason:
            return f"DATABASE_URL: PostgreSQL at {where} refused the login: {reason}"
        return f"DATABASE_URL: cannot reach PostgreSQL at {where}: {reason}"
    return None


def check_redis() -> str | None:
    """Ping Redis when ``REDIS_URL`` is set."""
    from django.conf import settings

    url = settings.REDIS_URL
    if not url:
        return None
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT, socket_timeout=TIMEOUT)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, ValueError) as exc:
        return (
            f"REDIS_URL: no Redis answers at {_redacted(url)} ({exc}); start Redis, "
            "or unset REDIS_URL to run one process on the in-memory layer"
        )
    return None


def check_host(host: str) -> str | None:
    """A server bound to every address must allow the names other machines will use."""
    from django.conf import settings

    if not is_wildcard(host):
        return None
    allowed = {name.lower() for name in settings.ALLOWED_HOSTS}
    if "*" in allowed or allowed - LOOPBACK_NAMES:
        return None
    return (
        f"HOST={host} accepts other machines, but DJANGO_ALLOWED_HOSTS allows only "
        f"{', '.join(sorted(allowed))}: set DJANGO_ALLOWED_HOSTS to the name or address "
        "clients will use, e.g. DJANGO_ALLOWED_HOSTS=fleet.example.com,192.0.2.10"
    )


def problems(host: str | None = None) -> list[str]:
    """Every problem found, settings first (the other checks need them)."""
    broken = check_settings()
    if broken:
        return [broken]
    checks: list[Callable[[], str | None]] = [check_database, check_redis]
    if host:
        checks.append(lambda: check_host(host))
    return [found for check in checks if (found := check()) is not None]


def bound_host(daphne_argv: list[str]) -> str | None:
    """The address a Daphne command line binds (``-b``/``--bind``), if any."""
    for index, arg in enumerate(daphne_argv):
        if arg in ("-b", "--bind") and index + 1 < len(daphne_argv):
            return daphne_argv[index + 1]
        if arg.startswith("--bind="):
            return arg.split("=", 1)[1]
    return None


def is_wildcard(host: str) -> bool:
    """Whether ``host`` is an address that listens on every interface."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def exit_on_problems(host: str | None = None) -> None:
    """Print each problem as ``error: ...`` and exit with status 2 if there is one."""
    found = problems(host)
    for line in found:
        sys.stderr.write(f"error: {line}\n")
    if found:
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """Command line: check, print problems, exit 2 when there is one."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--host", help="the address the server will bind (HOST)")
    args = parser.parse_args(argv)
    exit_on_problems(args.host)


if __name__ == "__main__":
    main()
