"""Helpers shared by the benchmarks (run as ``python bench/NAME.py``)."""

from __future__ import annotations

import contextlib
import resource
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
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
