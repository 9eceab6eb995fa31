"""Helpers shared by the benchmarks (run as ``python bench/NAME.py``)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_fd_limit() -> None:
    """Allow a few thousand sockets in this process and its children."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


@contextlib.contextmanager
def reference_worktree(ref: str) -> Iterator[tuple[Path, str]]:
    """Check the git revision ``ref`` out into a temporary worktree; yield its path and
    short commit id; remove it afterwards, also after a failure.  Benchmarks run the
    reference's server (and load generator) from there, to compare in the same run."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    revision = git("rev-parse", "--short", f"{ref}^{{commit}}")
    holder = Path(tempfile.mkdtemp(prefix="sysmanage-ref-"))
    tree = holder / "tree"
    git("worktree", "add", "--detach", "--quiet", str(tree), revision)
    try:
        yield tree, revision
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            git("worktree", "remove", "--force", str(tree))
        shutil.rmtree(holder, ignore_errors=True)
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            git("worktree", "prune")


class MachineWindow:
    """What the machine did over a benchmark's window, so every figure says what else was
    running: the load average at both ends, the whole machine's CPU, and the CPU of the
    busiest processes that are not this benchmark or its children (``own`` adds pids that
    belong to the run without being children, such as a server started elsewhere)."""

    def __init__(self, own: Iterable[int] = ()) -> None:
        import psutil

        self._psutil = psutil
        self.own = set(own)
        self.load_start = os.getloadavg()
        self.started = time.monotonic()
        self.busy_start = self._busy()
        self.others_start = self._others()

    def _busy(self) -> float:
        times = self._psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))

    def _ours(self) -> set[int]:
        me = self._psutil.Process()
        pids = {me.pid, *self.own}
        with contextlib.suppress(self._psutil.Error):
            pids.update(child.pid for child in me.children(recursive=True))
        for pid in list(self.own):
            with contextlib.suppress(self._psutil.Error):
                pids.update(c.pid for c in self._psutil.Process(pid).children(recursive=True))
        return pids

    def _others(self) -> dict[int, tuple[str, float]]:
        ours = self._ours()
        seen: dict[int, tuple[str, float]] = {}
        for proc in self._psutil.process_iter(["name", "cpu_times"]):
            if proc.pid in ours or proc.info["cpu_times"] is None:
                continue
            times = proc.info["cpu_times"]
            seen[proc.pid] = (proc.info["name"] or "?", times.user + times.system)
        return seen

    def report(self) -> str:
        """One line: load at both ends, machine CPU and other processes' CPU (% of one
        core) over the window, the three busiest others named."""
        span = max(time.monotonic() - self.started, 1e-6)
        machine = 100.0 * (self._busy() - self.busy_start) / span
        ours = self._ours()
        spent: dict[str, float] = {}
        for pid, (name, used) in self._others().items():
            if pid in ours:
                continue
            before = self.others_start.get(pid, (name, 0.0))[1]
            spent[name] = spent.get(name, 0.0) + max(0.0, used - before)
        others = 100.0 * sum(spent.values()) / span
        busiest = sorted(spent.items(), key=lambda item: -item[1])[:3]
        named = ", ".join(f"{name} {100.0 * used / span:.0f}%" for name, used in busiest if used)
        load_end = os.getloadavg()
        return (
            f"machine over {span:.0f} s: load {self.load_start[0]:.2f} -> {load_end[0]:.2f}, "
            f"CPU {machine:.0f}% of {100 * (os.cpu_count() or 1)}%, "
            f"other processes {others:.0f}%" + (f" ({named})" if named else "")
        )


@dataclasses.dataclass
class Target:
    """One of the issue's targets and the figure measured against it."""

    name: str
    value: float
    limit: float
    unit: str = ""
    #: ``"<="`` when the figure must not exceed the limit, ``">="`` when it must reach it
    op: str = "<="

    @property
    def met(self) -> bool:
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def line(self) -> str:
        verdict = "met" if self.met else "MISSED"
        want = f"{self.op} {self.limit:g}{self.unit}"
        return f"target {self.name}: {self.value:g}{self.unit} (want {want}) {verdict}"


def print_targets(targets: Iterable[Target]) -> bool:
    """Print one line per target; True when all are met."""
    ok = True
    for target in targets:
        print(target.line())
        ok = ok and target.met
    return ok
