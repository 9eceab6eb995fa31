"""The idle-socket memory bounds (``tests/test_idle_memory.py``), measured in a pytest
process of its own, so that nothing the suite's earlier modules left in this process
counts as kept per socket."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_idle_sockets_keep_little_in_a_process_of_their_own() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_idle_memory.py",
        ],
        cwd=ROOT,
        env={**os.environ, "SYSMANAGE_MEASURE_MEMORY": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, report
    assert "2 passed" in result.stdout, report  # both measured, none skipped
    assert "skipped" not in result.stdout, report
