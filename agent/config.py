"""The agent's settings: merged from all sources, validated, with defaults."""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from agent.sources import (
    ConfigError,
    Settings,
    from_command_line,
    from_environment,
    from_file,
)

DEFAULT_HEARTBEAT_INTERVAL = 15.0
DEFAULT_METRICS_INTERVAL = 30.0
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024
DEFAULT_MAX_CONCURRENT_COMMANDS = 8
DEFAULT_LOG_LEVEL = "INFO"
#: Seconds between looks at pending updates and the reboot flag (sent only on change).
DEFAULT_PATCH_INTERVAL = 900.0
DEFAULT_REBOOT_REQUIRED_FILE = Path("/var/run/reboot-required")
#: The program (and its arguments) that reboots the host, run without a shell.
DEFAULT_REBOOT_COMMAND = ("systemctl", "reboot")

MIN_INTERVAL, MAX_INTERVAL = 0.1, 86_400.0
MAX_OUTPUT_BYTES_LIMIT = 256 * 1024
MAX_CONCURRENT_LIMIT = 256
INTERVAL_SETTINGS = ("heartbeat_interval", "metrics_interval")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
AGENT_PATH = "/ws/agent"

__all__ = ["AgentConfig", "ConfigError", "load_config"]


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Validated settings.  ``repr`` leaves the token out so it cannot leak into logs."""

    server: str
    token: str = field(repr=False)
    hostname: str | None = None
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    metrics_interval: float = DEFAULT_METRICS_INTERVAL
    state_dir: Path = Path(".")
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    max_concurrent_commands: int = DEFAULT_MAX_CONCURRENT_COMMANDS
    log_level: str = DEFAULT_LOG_LEVEL
    patch_interval: float = DEFAULT_PATCH_INTERVAL
    #: The file whose presence says that the host needs a reboot.
    reboot_required_file: Path = DEFAULT_REBOOT_REQUIRED_FILE
    #: What a ``reboot`` operation runs (no shell): the agent reports that the reboot
    #: began when it exits with status 0, then leaves its connection and reconnects.
    reboot_command: tuple[str, ...] = DEFAULT_REBOOT_COMMAND
    #: The interval settings given explicitly; the server's ``welcome`` overrides the rest.
    explicit_intervals: frozenset[str] = frozenset()

    @property
    def websocket_url(self) -> str:
        """The agent endpoint of the server: ``ws(s)://HOST:PORT[/prefix]/ws/agent``."""
        return websocket_url(self.server)


def load_config(argv: Sequence[str] | None, environ: Mapping[str, str]) -> AgentConfig:
    """Merge the command line, environment and config file, then validate the result."""
    cli = from_command_line(argv)
    env = from_environment(environ)
    cli_path, env_path = cli.pop("config", None), env.pop("config", None)
    config_path = cli_path or env_path
    file_values = from_file(Path(str(config_path)).expanduser()) if config_path else {}
    return build_config({**file_values, **env, **cli}, environ)


def build_config(values: Settings, environ: Mapping[str, str]) -> AgentConfig:
    """Validate merged raw ``values`` into an :class:`AgentConfig`."""
    server = _required_text(values, "server", "server URL", "--server")
    websocket_url(server)
    return AgentConfig(
        server=server,
        token=_token(values),
        hostname=_optional_text(values, "hostname"),
        heartbeat_interval=_interval(values, "heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL),
        metrics_interval=_interval(values, "metrics_interval", DEFAULT_METRICS_INTERVAL),
        state_dir=_state_dir(values, environ),
        max_output_bytes=_bounded_int(
            values, "max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES, MAX_OUTPUT_BYTES_LIMIT
        ),
        max_concurrent_commands=_bounded_int(
            values, "max_concurrent_commands", DEFAULT_MAX_CONCURRENT_COMMANDS, MAX_CONCURRENT_LIMIT
        ),
        log_level=_log_level(values),
        patch_interval=_interval(values, "patch_interval", DEFAULT_PATCH_INTERVAL),
        reboot_required_file=_path(values, "reboot_required_file", DEFAULT_REBOOT_REQUIRED_FILE),
        reboot_command=_argv(values, "reboot_command", DEFAULT_REBOOT_COMMAND),
        explicit_intervals=frozenset(name for name in INTERVAL_SETTINGS if name in values),
    )


def websocket_url(server: str) -> str:
    """Turn the server base URL into its ``/ws/agent`` WebSocket URL, or raise ConfigError."""
    parts = urlsplit(server)
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ConfigError("server URL must start with http://, https://, ws:// or wss://")
    if not parts.hostname:
        raise ConfigError("server URL has no host name")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError("server URL must not contain credentials, a query or a fragment")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigError("server URL has an invalid port") from None
    path = parts.path.rstrip("/")
    if not path.endswith(AGENT_PATH):
        path += AGENT_PATH
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """``$XDG_STATE_HOME/sysmanage-agent``, or ``~/.local/state/sysmanage-agent``."""
    base = environ.get("XDG_STATE_HOME")
    root = Path(base) if base else Path(os.path.expanduser("~")) / ".local" / "state"
    return root / "sysmanage-agent"


def _required_text(values: Settings, name: str, what: str, option: str) -> str:
    """Return a required string setting or raise a ConfigError naming its sources."""
    value = values.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        env = "SYSMANAGE_AGENT_" + name.upper()
        raise ConfigError(f"no {what} given: use {option}, {env} or '{name}' in the config file")
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string")
    return value.strip()


def _token(values: Settings) -> str:
    """Return the token; messages about it never include its value."""
    token = _required_text(values, "token", "host token", "--token")
    if any(char.isspace() or not char.isprintable() for char in token):
        raise ConfigError("token must not contain spaces or control characters")
    return token


def _optional_text(values: Settings, name: str) -> str | None:
    """Return an optional non-empty string setting, or ``None``."""
    value = values.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a non-empty string")
    return value.strip()


def _number(name: str, value: object, kind: type[int] | type[float]) -> int | float:
    """Convert ``value`` (a TOML number or a string) to ``kind`` or raise ConfigError."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, not {value!r}")
    wrong = ConfigError(
        f"{name} must be {'an integer' if kind is int else 'a number'}, not {value!r}"
    )
    if not isinstance(value, int | float | str):
        raise wrong
    try:
        return kind(value)
    except ValueError:
        raise wrong from None


def _interval(values: Settings, name: str, default: float) -> float:
    """Return an interval in seconds within the allowed range."""
    if name not in values:
        return default
    seconds = float(_number(name, values[name], float))
    if not MIN_INTERVAL <= seconds <= MAX_INTERVAL:
        raise ConfigError(f"{name} must be between {MIN_INTERVAL} and {MAX_INTERVAL:g} seconds")
    return seconds


def _bounded_int(values: Settings, name: str, default: int, upper: int) -> int:
    """Return an integer setting between 1 and ``upper``."""
    if name not in values:
        return default
    number = _number(name, values[name], int)
    if not 1 <= number <= upper:
        raise ConfigError(f"{name} must be between 1 and {upper}")
    return int(number)


def _state_dir(values: Settings, environ: Mapping[str, str]) -> Path:
    """Return the state directory (absolute), given or default."""
    value = values.get("state_dir")
    if value is None:
        return default_state_dir(environ)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("state_dir must be a non-empty path")
    return Path(value).expanduser().absolute()


def _path(values: Settings, name: str, default: Path) -> Path:
    """Return a path setting (absolute), given or default."""
    value = values.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a non-empty path")
    return Path(value).expanduser().absolute()


def _argv(values: Settings, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """Return a program and its arguments: a list of strings, or one string split as a
    shell would split it (no shell runs it)."""
    value = values.get(name)
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = shlex.split(value)
        except ValueError as exc:
            raise ConfigError(f"{name} cannot be split into arguments: {exc}") from None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a command: a string or a list of strings")
    if not value[0].strip():
        raise ConfigError(f"{name} must name a program")
    return tuple(value)


def _log_level(values: Settings) -> str:
    """Return a valid logging level name."""
    level = str(values.get("log_level", DEFAULT_LOG_LEVEL)).upper()
    if level not in LOG_LEVELS or not isinstance(logging.getLevelName(level), int):
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
    return level
