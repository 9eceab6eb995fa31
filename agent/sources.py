"""Where settings come from: the command line, the environment and a TOML file.

Each source yields a mapping of raw values keyed by setting name; :mod:`agent.config`
merges them (command line > environment > file > defaults) and validates them.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeAlias

from agent import __version__

ENV_PREFIX = "SYSMANAGE_AGENT_"

#: Settings read from the environment, as ``SYSMANAGE_AGENT_<NAME>``.
ENV_SETTINGS = (
    "server",
    "token",
    "hostname",
    "metrics_interval",
    "heartbeat_interval",
    "state_dir",
    "config",
    "log_level",
    "patch_interval",
    "reboot_required_file",
    "reboot_command",
)

#: Keys allowed in the config file.
FILE_SETTINGS = frozenset(
    {
        "server",
        "token",
        "hostname",
        "metrics_interval",
        "heartbeat_interval",
        "state_dir",
        "max_output_bytes",
        "max_concurrent_commands",
        "log_level",
        "patch_interval",
        "reboot_required_file",
        "reboot_command",
    }
)


class ConfigError(Exception):
    """Settings that are missing or invalid; the message never contains the token."""


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser; every option defaults to "not given" (``None``)."""
    parser = argparse.ArgumentParser(
        prog="python -m agent",
        description="SysManage agent: connects this host to a SysManage server.",
        epilog="Each option can also be set as SYSMANAGE_AGENT_<OPTION> in the environment "
        "or in the TOML config file. Command line > environment > config file > defaults.",
    )
    add = parser.add_argument
    add("--server", help="server base URL, e.g. http://fleet.example.com:8000")
    add("--token", help="host token (prefer SYSMANAGE_AGENT_TOKEN or the config file)")
    add("--hostname", help="host name to report (default: this machine's host name)")
    add("--metrics-interval", metavar="SECONDS", help="seconds between metrics reports")
    add("--heartbeat-interval", metavar="SECONDS", help="seconds between heartbeats")
    add("--state-dir", metavar="DIR", help="directory for unacknowledged results and ids")
    add("--config", metavar="FILE", help="TOML config file")
    add("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    add("--version", action="version", version=f"sysmanage-agent {__version__}")
    return parser


#: Settings as given (TOML values, or strings from the command line and the environment),
#: before :func:`agent.config.build_config` checks them.
Settings: TypeAlias = Mapping[str, object]


def from_command_line(argv: Sequence[str] | None) -> dict[str, object]:
    """Return the settings given on the command line (argparse exits on unknown options)."""
    namespace = build_parser().parse_args(argv)
    return {name: value for name, value in vars(namespace).items() if value is not None}


def from_environment(environ: Mapping[str, str]) -> dict[str, object]:
    """Return the settings given as ``SYSMANAGE_AGENT_*`` variables (empty ones are unset)."""
    values: dict[str, object] = {}
    for name in ENV_SETTINGS:
        value = environ.get(ENV_PREFIX + name.upper())
        if value:
            values[name] = value
    return values


def from_file(path: Path) -> dict[str, object]:
    """Read the TOML config file at ``path``; unknown keys are an error."""
    try:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(values) - FILE_SETTINGS)
    if unknown:
        raise ConfigError(f"config file {path} has unknown keys: {', '.join(unknown)}")
    return values
