"""Small files in the state directory, written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


class StateError(Exception):
    """The state directory cannot be created or written."""


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if needed and check that it is writable."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create state directory {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StateError(f"state directory {path} is not writable")
    return path


def atomic_write_json(path: Path, payload: object) -> None:
    """Write ``payload`` as JSON to ``path``: temp file, fsync, rename (mode 0600)."""
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    _sync_directory(path.parent)


def read_json(path: Path) -> object:
    """Return the JSON content of ``path``, or ``None`` if it is missing or unreadable."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None


def remove_file(path: Path) -> bool:
    """Delete ``path``; return whether it existed."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    _sync_directory(path.parent)
    return True


def _sync_directory(directory: Path) -> None:
    """Flush a directory entry change to disk where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
