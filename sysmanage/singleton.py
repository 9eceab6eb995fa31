"""
Refuse to run two server processes on the in-memory channel layer.

The in-memory layer lives inside one process: a second server process on the same
database would silently miss every event published by the first.  With REDIS_URL
unset, the ASGI application takes an exclusive lock next to the database and refuses
to start when another process holds it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

_lock_file: IO[str] | None = None


def _lock_path() -> Path:
    database = settings.DATABASES["default"]
    key = (
        f"{database.get('ENGINE')}|{database.get('HOST')}|{database.get('PORT')}|"
        f"{database.get('NAME')}"
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"sysmanage-server-{digest}.lock"


def ensure_single_process_on_memory_layer() -> None:
    """Take the per-database server lock when no shared channel layer is configured."""
    global _lock_file
    if settings.REDIS_URL or _lock_file is not None:
        return
    if os.environ.get("SYSMANAGE_ALLOW_UNSHARED_LAYER") == "1":
        return
    path = _lock_path()
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ImproperlyConfigured(
            "Another server process already serves this database on the in-memory channel "
            "layer; events would not reach its clients. Set REDIS_URL to run several "
            "server processes."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _lock_file = handle
