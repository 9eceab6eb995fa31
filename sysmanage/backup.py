"""
Online backups of a SQLite database: one consistent copy while servers read and write it.

SQLite's backup API copies every page in one step inside a read transaction; with the
database in WAL mode (as the server keeps it) writers go on meanwhile, and the copy is the
database as of one commit.  Copying the file instead (``cp``) can miss the commits still
in ``-wal`` or catch a page half written.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from contextlib import closing, suppress
from pathlib import Path

#: How long the backup waits for a lock: reading needs none in WAL mode, but opening the
#: database may wait for a moment while another connection recovers or checkpoints it.
LOCK_TIMEOUT_SECONDS = 20.0


class BackupFailed(Exception):
    """The copy could not be made or did not pass SQLite's integrity check."""


def sqlite_backup(*, source: Path, dest: Path) -> int:
    """Copy the database file ``source`` to the new file ``dest``; return its size.

    ``dest`` is made mode 600 (it holds password hashes, token digests and sessions),
    written under a temporary name beside it and renamed once it is complete, checked
    (``PRAGMA integrity_check``) and turned into a rollback-journal database: one
    self-contained file, with no ``-wal`` to keep beside it.  An existing ``dest`` is
    refused (FileExistsError), as is a missing ``source``.
    """
    if dest.exists():
        raise FileExistsError(dest)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    partial = Path(name)
    try:
        _copy(source, partial)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        partial.replace(dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _sync_directory(dest.parent)
    return dest.stat().st_size


def _copy(source: Path, target: Path) -> None:
    # mode=rw: a mistyped path fails instead of creating an empty database to back up.
    uri = f"{source.absolute().as_uri()}?mode=rw"
    try:
        with (
            closing(sqlite3.connect(uri, uri=True, timeout=LOCK_TIMEOUT_SECONDS)) as src,
            closing(sqlite3.connect(target)) as dst,
        ):
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")
            problems = [row[0] for row in dst.execute("PRAGMA integrity_check")]
    except sqlite3.Error as exc:
        raise BackupFailed(f"{source}: {exc}") from exc
    if problems != ["ok"]:
        raise BackupFailed(f"the copy of {source} is damaged: {'; '.join(problems[:5])}")


def _sync_directory(path: Path) -> None:
    """Make the rename durable (where directories can be opened: not on Windows)."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
