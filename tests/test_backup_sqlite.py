"""``manage.py backup_sqlite`` and :func:`sysmanage.backup.sqlite_backup` on real SQLite
files (the command against a running server: tests/integration/test_backup_restore.py)."""

from __future__ import annotations

import io
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError

from sysmanage.backup import BackupFailed, sqlite_backup
from sysmanage.management.commands import backup_sqlite


def wal_database(path: Path, rows: int) -> sqlite3.Connection:
    """A WAL database whose rows are all still in its ``-wal`` (no checkpoint yet); the
    connection is returned open, as a server's would be."""
    conn = sqlite3.connect(path, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t (n INTEGER)")
    conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(rows)])
    conn.commit()
    return conn


def count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])


def test_the_copy_holds_what_is_still_in_the_wal_and_stands_alone(tmp_path):
    source = tmp_path / "db.sqlite3"
    conn = wal_database(source, 500)
    try:
        assert Path(f"{source}-wal").stat().st_size > 0
        dest = tmp_path / "backup.sqlite3"
        assert sqlite_backup(source=source, dest=dest) == dest.stat().st_size
    finally:
        conn.close()
    assert dest.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("backup")) == [
        "backup.sqlite3"
    ]
    assert dest.read_bytes()[18:20] == b"\x01\x01"  # a rollback-journal file, not WAL
    assert count(dest) == 500


def test_a_writer_goes_on_during_the_backup_and_the_copy_is_one_commit(tmp_path):
    source = tmp_path / "db.sqlite3"
    wal_database(source, 0).close()
    stop = threading.Event()

    def write() -> None:
        with sqlite3.connect(source, timeout=5) as writer:
            while not stop.is_set():
                writer.executemany("INSERT INTO t VALUES (?)", [(1,)] * 100)
                writer.commit()

    thread = threading.Thread(target=write)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while count(source) < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        sqlite_backup(source=source, dest=tmp_path / "backup.sqlite3")
    finally:
        stop.set()
        thread.join(10)
    copied = count(tmp_path / "backup.sqlite3")
    assert copied >= 1000
    assert copied % 100 == 0  # whole transactions only


def test_refuses_an_existing_destination_and_a_missing_source(tmp_path):
    source = tmp_path / "db.sqlite3"
    wal_database(source, 1).close()
    dest = tmp_path / "backup.sqlite3"
    dest.write_text("an older backup")
    with pytest.raises(FileExistsError):
        sqlite_backup(source=source, dest=dest)
    assert dest.read_text() == "an older backup"
    with pytest.raises(BackupFailed):
        sqlite_backup(source=tmp_path / "missing.sqlite3", dest=tmp_path / "new.sqlite3")
    assert not (tmp_path / "missing.sqlite3").exists()  # not created empty
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.sqlite3", "db.sqlite3"]


def test_a_damaged_copy_is_refused(tmp_path):
    source = tmp_path / "db.sqlite3"
    conn = wal_database(source, 2000)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    raw = bytearray(source.read_bytes())
    page_size = int.from_bytes(raw[16:18], "big")
    raw[page_size * 2 + 8 : page_size * 2 + 40] = b"\xff" * 32  # a table page's cells
    source.write_bytes(bytes(raw))
    with pytest.raises(BackupFailed, match="damaged"):
        sqlite_backup(source=source, dest=tmp_path / "backup.sqlite3")
    assert not (tmp_path / "backup.sqlite3").exists()


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("backup_sqlite", *args, stdout=out)
    return out.getvalue()


def test_command_backs_up_the_configured_file_and_names_the_key(tmp_path, monkeypatch):
    source = tmp_path / "sysmanage.sqlite3"
    wal_database(source, 3).close()
    monkeypatch.setitem(
        settings.DATABASES, "default", {"ENGINE": "django.db.backends.sqlite3", "NAME": source}
    )
    monkeypatch.delenv("DJANGO_SECRET_KEY", raising=False)
    out = run(str(tmp_path / "copy.sqlite3"))
    assert count(tmp_path / "copy.sqlite3") == 3
    assert "integrity check ok" in out
    assert str(settings.VAR_DIR / "secret_key") in out
    monkeypatch.setenv("DJANGO_SECRET_KEY", "k" * 50)
    assert "DJANGO_SECRET_KEY" in run(str(tmp_path / "again.sqlite3"))
    with pytest.raises(CommandError, match="exists already"):
        run(str(tmp_path / "copy.sqlite3"))
    with pytest.raises(CommandError, match="is not a directory"):
        run(str(tmp_path / "nowhere" / "copy.sqlite3"))
    source.unlink()
    with pytest.raises(CommandError, match="Backup failed"):
        run(str(tmp_path / "third.sqlite3"))


@pytest.mark.parametrize(
    ("database", "message"),
    [
        ({"ENGINE": "sysmanage.postgres", "NAME": "fleet"}, "pg_dump --format=custom"),
        ({"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}, "not a file"),
    ],
)
def test_command_refuses_other_databases(monkeypatch, database, message):
    monkeypatch.setitem(settings.DATABASES, "default", database)
    with pytest.raises(CommandError, match=message):
        backup_sqlite.database_file()
