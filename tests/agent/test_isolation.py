"""The agent is a separate program: no Django, no server packages."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.agent.conftest import REPO_ROOT, agent_environment

SERVER_PACKAGES = {
    "django",
    "channels",
    "daphne",
    "rest_framework",
    "sysmanage",
    "hosts",
    "alerts",
    "activity",
}
ALLOWED_THIRD_PARTY = {"websockets", "psutil"}


def test_agent_sources_import_only_stdlib_websockets_and_psutil() -> None:
    for path in (REPO_ROOT / "agent").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            for root in roots:
                assert (
                    root == "agent"
                    or root in ALLOWED_THIRD_PARTY
                    or root in sys.stdlib_module_names
                ), f"{path}: imports {root}"


def test_importing_every_agent_module_loads_no_server_code() -> None:
    script = (
        "import importlib, pkgutil, sys, agent\n"
        "for info in pkgutil.walk_packages(agent.__path__, 'agent.'):\n"
        "    importlib.import_module(info.name)\n"
        "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=agent_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = set(finished.stdout.split())
    assert "agent" in loaded
    assert "websockets" in loaded
    assert not loaded & SERVER_PACKAGES
