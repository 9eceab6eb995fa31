"""Checking package names and local package files before any program sees them."""

from __future__ import annotations

import os
import re

from agent.errors import RequestError
from agent.packages.managers import INSTALL, PackageManager

#: Package names (with optional version or architecture): no leading '-', no whitespace,
#: no shell metacharacters.
PACKAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+:=~@-]*")
#: Local package files: an absolute or relative path of the same safe characters.
PACKAGE_PATH = re.compile(r"[A-Za-z0-9._/][A-Za-z0-9._+:=~@/-]*")
LOCAL_SUFFIXES = (".deb", ".rpm", ".apk")
MAX_LENGTH = 512


def resolve_target(manager: PackageManager, operation: str, package: str) -> str:
    """The argument to pass for ``package``: a checked name, or a local file's absolute path.

    Raises RequestError with a message for the server when ``package`` is not acceptable.
    """
    if len(package) > MAX_LENGTH:
        raise RequestError(f"package must be at most {MAX_LENGTH} characters")
    if package.endswith(LOCAL_SUFFIXES):
        return _local_file(manager, operation, package)
    if not PACKAGE_NAME.fullmatch(package):
        raise RequestError(
            "invalid package name: it must start with a letter or digit and "
            "contain no whitespace or shell metacharacters"
        )
    return package


def _local_file(manager: PackageManager, operation: str, path: str) -> str:
    """The absolute path of an existing local package file that ``manager`` can install."""
    if operation != INSTALL:
        raise RequestError(
            f"a local package file can only be installed, not used for '{operation}'"
        )
    if manager.local_suffix is None or not path.endswith(manager.local_suffix):
        raise RequestError(f"{manager.executable} cannot install local files like {path!r}")
    if not PACKAGE_PATH.fullmatch(path) or path.startswith("-"):
        raise RequestError(
            "invalid package file path: it must contain no whitespace or shell metacharacters"
        )
    absolute = os.path.abspath(path)
    if not os.path.isfile(absolute):
        raise RequestError(f"package file {absolute} does not exist")
    return absolute
