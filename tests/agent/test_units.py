"""Unit tests of the agent's building blocks (no network, no child agent)."""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import pytest

from agent.backoff import Backoff
from agent.errors import RequestError
from agent.ledger import FINISHED, RUNNING, IdLedger
from agent.logsetup import REDACTED, RedactingFormatter
from agent.metrics import is_real_mount
from agent.output import CappedOutput
from agent.packages.apt_status import AptProgress, LineSplitter
from agent.packages.managers import APT, DNF, detect_manager
from agent.packages.validation import resolve_target
from agent.processes import exit_code_of
from agent.protocol import envelope, fit_frame, frame_size
from agent.service import next_delay
from agent.session import SessionEnd
from agent.spool import ResultSpool


def test_backoff_full_jitter_doubles_to_the_cap_and_resets() -> None:
    backoff = Backoff(rng=random.Random(7))
    ceilings = []
    for _ in range(10):
        ceilings.append(backoff.ceiling())
        assert 0 <= backoff.next_delay() <= ceilings[-1]
    assert ceilings == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    assert backoff.maximum == 60
    backoff.reset()
    assert backoff.ceiling() == 1


def test_backoff_delays_are_spread() -> None:
    delays = set()
    for seed in range(20):
        backoff = Backoff(rng=random.Random(seed))
        for _ in range(5):
            delays.add(round(backoff.next_delay(), 3))
    assert len(delays) > 50


def test_apt_status_lines_become_monotonic_progress() -> None:
    tracker = AptProgress()
    lines = [
        "dlstatus:1:0.0000:Retrieving file 1 of 1",
        "dlstatus:1:100.0000:Retrieving file 1 of 1",
        "pmstatus:dpkg-exec:0.0000:Running dpkg",
        "pmstatus:foo:40.0000:Installing foo (amd64)",
        "pmerror:/var/cache/foo.deb:45.0000:trying to overwrite '/x', which is also in bar",
        "pmstatus:foo:80.0000:Installed foo (amd64)",
        "media-change: ignored",
        "pmstatus:foo:not-a-number:x",
    ]
    updates = [tracker.update(line) for line in lines]
    assert updates[:4] == [
        (0, "Retrieving file 1 of 1"),
        (50, "Retrieving file 1 of 1"),
        (50, "Running dpkg"),
        (70, "Installing foo (amd64)"),
    ]
    assert updates[4][0] == 70
    assert updates[4][1].startswith("error: /var/cache/foo.deb:")
    assert updates[5] == (90, "Installed foo (amd64)")
    assert updates[6:] == [None, None]


def test_apt_progress_without_downloads_uses_dpkg_percent() -> None:
    tracker = AptProgress()
    update = tracker.update("pmstatus:foo:33.3333:Removing foo (amd64)")
    assert update == (33, "Removing foo (amd64)")
    assert tracker.update("pmstatus:foo:66.6667:Removing foo") == (66, "Removing foo")


def test_line_splitter_handles_partial_and_oversized_lines() -> None:
    splitter = LineSplitter(limit=10)
    assert splitter.feed(b"pm:a") == []
    assert splitter.feed(b"b\ncd\n") == ["pm:ab", "cd"]
    assert splitter.feed(b"x" * 50) == []
    assert splitter.feed(b"x" * 5 + b"\nok\n") == ["ok"]
    assert splitter.feed(b"y" * 11 + b"\n") == []


def test_capped_output_keeps_the_first_bytes_and_decodes_safely() -> None:
    output = CappedOutput(6)
    output.feed("héllo".encode())
    output.feed(b" world")
    assert output.truncated
    assert len(output) == 6
    assert output.text() == "héllo"
    cut = CappedOutput(2)
    cut.feed("é!".encode())
    assert cut.text() == "é"
    partial = CappedOutput(1)
    partial.feed("é".encode())
    assert partial.text() == ""  # a character cut in half is dropped
    invalid = CappedOutput(10)
    invalid.feed(b"a\xffb")
    assert invalid.text() == "a\ufffdb"
    assert not invalid.truncated


def test_fit_frame_trims_the_longest_output() -> None:
    data = {
        "stdout": "\x01" * 200_000,
        "stderr": "e" * 10,
        "stdout_truncated": False,
        "stderr_truncated": False,
    }
    message = fit_frame(
        envelope("command_result", data),
        [("stdout", "stdout_truncated"), ("stderr", "stderr_truncated")],
        budget=300_000,
    )
    assert frame_size(message) <= 300_000
    assert message["data"]["stdout_truncated"] is True
    assert message["data"]["stderr"] == "e" * 10
    assert not message["data"]["stderr_truncated"]


def test_exit_codes_follow_the_shell_convention() -> None:
    assert exit_code_of(0) == 0
    assert exit_code_of(3) == 3
    assert exit_code_of(-9) == 137
    assert exit_code_of(None) is None


@pytest.mark.parametrize(
    "name",
    ["curl", "libc6:amd64", "python3.11", "g++", "nginx=1.22-1", "linux-image-6.1.0-13-amd64"],
)
def test_valid_package_names(name: str) -> None:
    assert resolve_target(APT, "install", name) == name


@pytest.mark.parametrize(
    "name",
    ["-y", "--purge", "a b", "a;b", "a&&b", "$(x)", "`x`", "a|b", "a>b", "a\nb", "../x", "~x", ""],
)
def test_invalid_package_names(name: str) -> None:
    with pytest.raises(RequestError):
        resolve_target(APT, "install", name)


def test_local_deb_needs_apt_install_and_an_existing_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deb = tmp_path / "x_1.0_all.deb"
    deb.write_bytes(b"!<arch>\n")
    assert resolve_target(APT, "install", str(deb)) == str(deb)
    monkeypatch.chdir(tmp_path)
    assert resolve_target(APT, "install", "x_1.0_all.deb") == str(deb)
    assert resolve_target(APT, "install", "./x_1.0_all.deb") == str(deb)
    for manager, operation, path, message in [
        (APT, "remove", str(deb), "only be installed"),
        (DNF, "install", str(deb), "cannot install local files"),
        (APT, "install", str(tmp_path / "missing.deb"), "does not exist"),
        (APT, "install", str(tmp_path / "a b.deb"), "whitespace"),
    ]:
        with pytest.raises(RequestError, match=message):
            resolve_target(manager, operation, path)


def test_apt_command_lines_use_no_shell_and_the_status_fd() -> None:
    assert APT.argv("install", "curl", 7)[:3] == ["apt-get", "-o", "APT::Status-Fd=7"]
    assert APT.argv("install", "curl")[-3:] == ["install", "-y", "curl"]
    assert APT.argv("remove", "curl")[-3:] == ["remove", "-y", "curl"]
    assert APT.argv("update", "curl")[-4:] == ["install", "--only-upgrade", "-y", "curl"]
    assert APT.env()["DEBIAN_FRONTEND"] == "noninteractive"


def test_package_manager_detection() -> None:
    assert detect_manager(lambda program: None) is None
    assert detect_manager(lambda program: f"/usr/bin/{program}") is APT
    assert detect_manager(lambda program: "/usr/bin/dnf" if program == "dnf" else None) is DNF


@pytest.mark.parametrize(
    ("device", "mountpoint", "fstype", "real"),
    [
        ("/dev/sda1", "/", "ext4", True),
        ("/dev/nvme0n1p1", "/boot/efi", "vfat", True),
        ("/dev/loop3", "/snap/core/1", "squashfs", False),
        ("/dev/loop0", "/mnt/image", "ext4", False),
        ("tmpfs", "/tmp", "tmpfs", False),
        ("overlay", "/var/lib/docker/overlay2/x/merged", "overlay", False),
        ("/dev/sdb1", "/run/media/usb", "ext4", False),
    ],
)
def test_real_mounts(device: str, mountpoint: str, fstype: str, real: bool) -> None:
    assert is_real_mount(device, mountpoint, fstype) is real


def test_spool_stores_atomically_and_lists_oldest_first(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path / "results")
    spool.store("command_result", "a", {"type": "command_result", "data": {"n": 1}})
    spool.store("package_result", "b", {"type": "package_result", "data": {"n": 2}})
    assert [m["data"]["n"] for m in spool.pending()] == [1, 2]
    assert not list((tmp_path / "results").glob(".*.tmp"))
    assert (tmp_path / "results").stat().st_mode & 0o777 == 0o700
    assert spool.get("command_result", "a")["data"] == {"n": 1}
    assert spool.discard("command_result", "a") is True
    assert spool.discard("command_result", "a") is False
    (tmp_path / "results" / "junk.json").write_text("{not json")
    assert [m["data"]["n"] for m in spool.pending()] == [2]


def test_ledger_is_bounded_persistent_and_keeps_running_ids(tmp_path: Path) -> None:
    path = tmp_path / "seen.json"
    ledger = IdLedger(path, limit=5)
    ledger.mark_running("command_result", "keep")
    for number in range(10):
        ledger.mark_running("command_result", str(number))
        ledger.mark_finished("command_result", str(number))
    assert len(ledger) == 5
    assert ledger.state("command_result", "keep") == RUNNING
    assert ledger.state("command_result", "9") == FINISHED
    assert ledger.state("command_result", "0") is None
    reloaded = IdLedger(path, limit=5)
    assert reloaded.running() == [("command_result", "keep")]
    assert reloaded.state("command_result", "9") == FINISHED
    assert json.loads(path.read_text())["version"] == 1


def test_log_lines_never_show_the_secret() -> None:
    formatter = RedactingFormatter(["tok-123"])
    try:
        raise ValueError("header Authorization: Bearer tok-123")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "sent %s", ("tok-123",), exc_info=sys.exc_info()
        )
    text = formatter.format(record)
    assert "tok-123" not in text
    assert text.count(REDACTED) >= 2


def test_spool_can_list_only_results_older_than_a_delay(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path / "results")
    spool.store("command_result", "old", {"type": "command_result", "data": {"n": 1}})
    spool.store("command_result", "new", {"type": "command_result", "data": {"n": 2}})
    hour_ago = time.time() - 3600
    os.utime(spool.path_for("command_result", "old"), (hour_ago, hour_ago))
    assert [m["data"]["n"] for m in spool.pending(older_than=300)] == [1]
    assert [m["data"]["n"] for m in spool.pending()] == [1, 2]


@pytest.mark.parametrize(
    ("end", "expected"),
    [
        (SessionEnd(4001, "auth"), 60.0),
        (SessionEnd(4009, "replaced", uptime=100, welcomed=True), 60.0),
        (SessionEnd(None, "HTTP 403", http_status=403), 60.0),
        (SessionEnd(None, "HTTP 401", http_status=401), 60.0),
    ],
)
def test_rejections_wait_the_maximum_delay(end: SessionEnd, expected: float) -> None:
    assert next_delay(end, Backoff(rng=random.Random(1))) == expected


def test_a_server_restart_is_followed_by_a_prompt_reconnect() -> None:
    backoff = Backoff(rng=random.Random(5))
    for _ in range(5):
        next_delay(SessionEnd(None, "refused"), backoff)
    delay = next_delay(SessionEnd(1012, "service restart", uptime=2.0, welcomed=True), backoff)
    assert delay <= 1.0
    assert backoff.ceiling() == 2


def test_backoff_grows_on_failures_and_resets_after_a_long_connection() -> None:
    backoff = Backoff(rng=random.Random(3))
    for _ in range(5):
        next_delay(SessionEnd(None, "refused"), backoff)
    assert backoff.ceiling() == 32
    next_delay(SessionEnd(1011, "error", uptime=29.0, welcomed=True), backoff)
    assert backoff.ceiling() == 60
    delay = next_delay(SessionEnd(1012, "restart", uptime=31.0, welcomed=True), backoff)
    assert delay <= 1.0
    assert backoff.ceiling() == 2
