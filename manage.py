#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


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
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-") and sys.argv[1] != "help":
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
