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


#: Frames in which a sampled thread waits rather than works; py-spy counts a thread in
#: ``epoll_wait`` as active, so its samples are dropped here.
IDLE_FRAMES = ("EpollSelector.select (", "select (selectors.py")


def summarise(raw: Path, top: int = 15, us_per_unit: float | None = None) -> str:
    """The ``top`` functions by own samples and by samples under them, in percent of the
    samples in which the process worked (waiting in ``epoll`` is left out), and, given
    ``us_per_unit`` (the process's CPU per unit of work, e.g. per message), in
    microseconds of that unit (py-spy's raw lines: ``frame;frame;...;frame count``)."""
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = stack.split(";")
        if frames[-1].startswith(IDLE_FRAMES):
            idle += samples
            continue
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            under[frame] += samples
    if not total:
        return "no samples\n"

    def row(frame: str, n: int) -> str:
        share = f"  {100 * n / total:5.1f}%"
        if us_per_unit is not None:
            share += f" {us_per_unit * n / total:6.1f} µs"
        return f"{share}  {frame}"

    unit = f"; the whole = {us_per_unit:.1f} µs per message" if us_per_unit is not None else ""
    lines = [f"{total} samples working, {idle} waiting in epoll (left out){unit}", "own time:"]
    lines += [row(frame, n) for frame, n in own.most_common(top)]
    lines.append("time under (inclusive):")
    lines += [row(frame, n) for frame, n in under.most_common(top * 3)]
    return "\n".join(lines) + "\n"
