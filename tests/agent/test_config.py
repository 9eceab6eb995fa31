"""Settings: command line > environment > config file > defaults, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_CONCURRENT_COMMANDS,
    DEFAULT_MAX_OUTPUT_BYTES,
    ConfigError,
    load_config,
    websocket_url,
)
from tests.agent.conftest import REPO_ROOT, StartAgent, agent_environment
from tests.agent.fake_server import TOKEN, FakeServer


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        'server = "http://file.example:8000"\ntoken = "file-token"\nhostname = "from-file"\n'
        'metrics_interval = 11\nheartbeat_interval = 12.5\nstate_dir = "/var/lib/from-file"\n'
        "max_output_bytes = 2048\nmax_concurrent_commands = 3\n"
    )
    return path


def test_config_file_values_are_used(config_file: Path) -> None:
    config = load_config(["--config", str(config_file)], {})
    assert config.server == "http://file.example:8000"
    assert config.token == "file-token"
    assert config.hostname == "from-file"
    assert (config.metrics_interval, config.heartbeat_interval) == (11.0, 12.5)
    assert config.state_dir == Path("/var/lib/from-file")
    assert (config.max_output_bytes, config.max_concurrent_commands) == (2048, 3)
    assert config.explicit_intervals == {"metrics_interval", "heartbeat_interval"}


def test_environment_beats_file_and_command_line_beats_both(config_file: Path) -> None:
    env = {
        "SYSMANAGE_AGENT_CONFIG": str(config_file),
        "SYSMANAGE_AGENT_HOSTNAME": "from-env",
        "SYSMANAGE_AGENT_TOKEN": "env-token",
        "SYSMANAGE_AGENT_METRICS_INTERVAL": "7",
    }
    config = load_config([], env)
    assert (config.hostname, config.token, config.metrics_interval) == ("from-env", "env-token", 7)
    assert config.server == "http://file.example:8000"

    config = load_config(
        ["--hostname", "from-cli", "--metrics-interval", "3", "--state-dir", "/srv/state"], env
    )
    assert (config.hostname, config.metrics_interval) == ("from-cli", 3.0)
    assert config.token == "env-token"
    assert config.state_dir == Path("/srv/state")


def test_command_line_config_path_beats_environment(config_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('server = "http://other:1"\ntoken = "t"\n')
    config = load_config(["--config", str(config_file)], {"SYSMANAGE_AGENT_CONFIG": str(other)})
    assert config.server == "http://file.example:8000"


def test_defaults(tmp_path: Path) -> None:
    config = load_config(
        ["--server", "http://s:1", "--token", "t"], {"XDG_STATE_HOME": str(tmp_path)}
    )
    assert config.heartbeat_interval == DEFAULT_HEARTBEAT_INTERVAL
    assert config.max_output_bytes == DEFAULT_MAX_OUTPUT_BYTES == 65536
    assert config.max_concurrent_commands == DEFAULT_MAX_CONCURRENT_COMMANDS == 8
    assert config.state_dir == tmp_path / "sysmanage-agent"
    assert config.explicit_intervals == frozenset()
    assert config.hostname is None
    assert config.log_level == "INFO"


def test_default_state_dir_without_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(["--server", "http://s:1", "--token", "t"], {})
    assert config.state_dir == tmp_path / ".local" / "state" / "sysmanage-agent"


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ("http://fleet:8000", "ws://fleet:8000/ws/agent"),
        ("https://fleet.example.com", "wss://fleet.example.com/ws/agent"),
        ("https://fleet.example.com/sysmanage/", "wss://fleet.example.com/sysmanage/ws/agent"),
        ("ws://fleet:8000/ws/agent", "ws://fleet:8000/ws/agent"),
    ],
)
def test_websocket_url(server: str, expected: str) -> None:
    assert websocket_url(server) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--token", "t"], "no server URL"),
        (["--server", "http://s:1"], "no host token"),
        (["--server", "fleet:8000", "--token", "t"], "server URL must start"),
        (["--server", "http://s:1?token=abc", "--token", "t"], "must not contain"),
        (["--server", "http://s:1", "--token", "t", "--metrics-interval", "soon"], "number"),
        (["--server", "http://s:1", "--token", "t", "--heartbeat-interval", "0"], "between"),
        (["--server", "http://s:1", "--token", "t", "--log-level", "LOUD"], "log_level"),
    ],
)
def test_bad_settings_are_explained(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(argv, {})


def test_bad_config_file_values(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    for content, message in [
        ('server = "http://s:1"\ntoken = "t"\ncolour = 1\n', "unknown keys"),
        ("server = \n", "not valid TOML"),
        ('server = "http://s:1"\ntoken = "t"\nmax_output_bytes = 0\n', "max_output_bytes"),
        (
            'server = "http://s:1"\ntoken = "t"\nmax_concurrent_commands = true\n',
            "max_concurrent_commands",
        ),
    ]:
        path.write_text(content)
        with pytest.raises(ConfigError, match=message):
            load_config(["--config", str(path)], {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["--config", str(tmp_path / "missing.toml")], {})


def test_token_never_appears_in_errors() -> None:
    secret = "s3cret token"
    with pytest.raises(ConfigError) as raised:
        load_config(["--server", "http://s:1", "--token", secret], {})
    assert secret not in str(raised.value)
    config = load_config(["--server", "http://s:1", "--token", "s3cret-token"], {})
    assert "s3cret-token" not in repr(config)


def test_missing_token_exits_with_a_clear_error() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "agent", "--server", "http://127.0.0.1:9"],
        cwd=REPO_ROOT,
        env=agent_environment(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert finished.returncode == 2
    assert "no host token given" in finished.stderr
    assert "SYSMANAGE_AGENT_TOKEN" in finished.stderr


async def test_precedence_end_to_end(
    fake_server: FakeServer,
    start_agent: StartAgent,
    tmp_path: Path,
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('server = "http://127.0.0.1:1"\ntoken = "wrong"\nhostname = "from-file"\n')
    env = {
        "SYSMANAGE_AGENT_SERVER": fake_server.url,
        "SYSMANAGE_AGENT_TOKEN": TOKEN,
        "SYSMANAGE_AGENT_HOSTNAME": "from-env",
    }
    await start_agent("--config", str(config), server=False, token=None, env=env)
    [hello] = await fake_server.wait_for("hello")
    assert hello.data["hostname"] == "from-env"

    await start_agent(
        "--config",
        str(config),
        "--hostname",
        "from-cli",
        server=False,
        token=None,
        env=env,
        state_dir=tmp_path / "second",
    )
    hellos = await fake_server.wait_for("hello", count=2)
    assert hellos[1].data["hostname"] == "from-cli"
