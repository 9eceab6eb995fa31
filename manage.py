#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys

#: Commands that do not use the database: they run whether it answers or not.
WITHOUT_DATABASE = {"help", "version", "check", "makemigrations", "collectstatic", "diffsettings"}


def main() -> None:
    """Run administrative tasks."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sysmanage.settings")
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        from django.conf import settings

        settings.INSTALLED_APPS  # noqa: B018  # loads the settings: a bad variable is one line
    except ImproperlyConfigured as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    command = sys.argv[1] if len(sys.argv) > 1 else "help"
    if command not in WITHOUT_DATABASE and not command.startswith("-"):
        from sysmanage.preflight import check_database

        # A database that does not exist or refuses the login: one line now, rather
        # than the pool's wait and a traceback from inside the command.
        problem = check_database()
        if problem:
            sys.stderr.write(f"error: {problem}\n")
            sys.exit(2)

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
