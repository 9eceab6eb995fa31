"""``manage.py backup_sqlite DEST``: copy the SQLite database, safely while serving."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from sysmanage.backup import BackupFailed, sqlite_backup


def database_file() -> Path:
    """The server's SQLite database file; CommandError for any other database."""
    database = settings.DATABASES["default"]
    if not database["ENGINE"].endswith("sqlite3"):
        raise CommandError(
            "The database is not SQLite: back up PostgreSQL with "
            "pg_dump --format=custom (docs/operations.md, Backup and restore)"
        )
    name = str(database["NAME"])
    if name in ("", ":memory:") or name.startswith("file:"):
        raise CommandError(f"The database {name!r} is not a file that can be backed up")
    return Path(name)


def secret_key_hint() -> str:
    """Where the secret key that belongs with the backup is."""
    if os.environ.get("DJANGO_SECRET_KEY"):
        return "DJANGO_SECRET_KEY, as set in this environment"
    return str(settings.VAR_DIR / "secret_key")


class Command(BaseCommand):
    """Write a consistent copy of the SQLite database to a new file."""

    help = (
        "Copy the SQLite database to DEST (a new file, mode 600) with SQLite's online "
        "backup: consistent while servers run. Keep the secret key with the copy."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Take the file to write."""
        parser.add_argument("dest", help="the backup file to create, e.g. backup.sqlite3")

    def handle(self, *args: Any, **options: Any) -> None:
        """Back up and say where the secret key is."""
        source = database_file()
        dest = Path(options["dest"]).expanduser().absolute()
        if not dest.parent.is_dir():
            raise CommandError(f"{dest.parent} is not a directory")
        try:
            size = sqlite_backup(source=source, dest=dest)
        except FileExistsError:
            raise CommandError(f"{dest} exists already; name a new file") from None
        except BackupFailed as exc:
            raise CommandError(f"Backup failed: {exc}") from None
        self.stdout.write(f"Backed up {source} to {dest} ({size} bytes, integrity check ok).")
        self.stdout.write(
            f"Keep the secret key with it ({secret_key_hint()}): without it, "
            "every sign-in and session ends at restore."
        )
