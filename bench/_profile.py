"""Sampling a server process with py-spy and summarising the samples (benchmarks)."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

PY_SPY = Path(sys.executable).parent / "py-spy"


def start_py_spy(pid: int, output: Path, seconds: float, log: Path) -> subprocess.Popen[bytes]:
    """Record ``pid`` for ``seconds`` at 250 Hz into ``output`` (py-spy's raw format)
    without pausing it."""
    with log.open("ab") as handle:
        return subprocess.Popen(
            [
                str(PY_SPY),
                "record",
                "--pid",
                str(pid),
                "--rate",
                "250",
                "--duration",
                str(max(1, round(seconds))),
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(output),
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


def summarise(raw: Path, top: int = 15) -> str:
    """The ``top`` functions by own samples and by samples under them, in percent of all
    samples (py-spy's raw lines: ``frame;frame;...;frame count``)."""
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] += samples
        for frame in set(frames):
            under[frame] += samples
    if not total:
        return "no samples\n"
    lines = [f"{total} samples", "own time:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines.append("time under (inclusive):")
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in under.most_common(top * 3)]
    return "\n".join(lines) + "\n"
