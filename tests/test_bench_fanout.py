"""The fan-out benchmark's parts: the lean client's framing, and one small end-to-end
run of the load generator against the bare server (agents on ``/ws/agent``,
subscribers on ``/ws`` filtered by host)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402
import wsraw  # noqa: E402


class Collecting(wsraw.RawSocket):
    """Keeps every message and what it would write."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.written: list[bytes] = []
        super().__init__("ws://127.0.0.1:1/ws")
        self.transport = self  # type: ignore[assignment]

    def on_message(self, buf: bytearray, start: int, end: int) -> None:
        self.messages.append(bytes(buf[start:end]))

    # the transport's part
    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False


def server_frame(payload: bytes, opcode: int = wsraw.OP_TEXT) -> bytes:
    """An unmasked server frame."""
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    return bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big") + payload


async def test_frames_split_anywhere_are_parsed_once_complete():
    """Messages arrive whole whatever the chunks; a ping is answered with a pong."""
    sock = Collecting()
    big = b"x" * 300
    stream = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
        + server_frame(b'{"a":1}')
        + server_frame(b"hi", wsraw.OP_PING)
        + server_frame(big)
    )
    for i in range(0, len(stream), 7):
        sock.data_received(stream[i : i + 7])
    assert sock.opened.done()
    assert sock.messages == [b'{"a":1}', big]
    assert sock.written[-1] == wsraw.frame(b"hi", wsraw.OP_PONG)


def test_client_frames_are_masked_with_a_zero_key():
    """A client frame sets the mask bit (RFC 6455 requires it) and carries the payload
    unchanged after four zero bytes."""
    assert wsraw.frame(b"abc") == b"\x81\x83\x00\x00\x00\x00abc"
    long = wsraw.frame(b"y" * 200)
    assert long[:4] == b"\x81\xfe\x00\xc8"
    assert long[8:] == b"y" * 200


def test_the_stamp_is_read_where_the_server_passes_it_on():
    """The sequence number and send time travel as the last two load averages."""
    metrics = loadgen.report_metrics(__import__("random").Random(1), 7, 1234.5)
    assert metrics["load_average"][1:] == [7.0, 1234500.0]
    raw = json.dumps({"type": "event", "data": {"metrics": metrics}}, separators=(",", ":"))
    assert loadgen.read_stamp(raw.encode()) == (7, 1234.5)


@pytest.mark.integration
def test_agents_reach_subscribers_of_their_host_on_the_bare_server(tmp_path):
    """Two hosts, six subscribers: each gets every event of its host and no other."""
    from _common import free_port

    port = free_port()
    hosts = [
        {"host_id": f"{i}" * 8 + "-0000-0000-0000-000000000000", "hostname": f"h{i}"}
        for i in (1, 2)
    ]
    hosts_file = tmp_path / "hosts.json"
    hosts_file.write_text(json.dumps([{**h, "token": h["host_id"]} for h in hosts]))
    server = subprocess.Popen([sys.executable, str(BENCH / "bare_server.py"), "--port", str(port)])
    try:
        time.sleep(0.5)
        common = [
            sys.executable,
            str(BENCH / "loadgen.py"),
            None,
            "--mode",
            "bare",
            "--url",
            f"ws://127.0.0.1:{port}",
            "--events",
            "40",
            "--hosts-file",
            str(hosts_file),
            "--drain-timeout",
            "1",
        ]
        subs = subprocess.Popen(
            [*common[:2], "subscribe", *common[3:], "--subscribers", "6"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert subs.stdout.readline().startswith("READY")
        agents = subprocess.run(
            [*common[:2], "agents", *common[3:], "--rate", "400"],
            input="GO {}\nREPORT {}\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        done = json.loads(agents.stdout.split("DONE ", 1)[1].split("\n", 1)[0])
        assert json.loads(agents.stdout.split("ERRORS ", 1)[1])["errors"] == 0
        out, _ = subs.communicate(f"PUBLISHED {json.dumps(done)}\n", timeout=30)
        result = json.loads(out.split("RESULT ", 1)[1])
        assert result["expected"] == 6 * 20
        assert result["received"] == 6 * 20
        assert result["lost"] == 0
        assert result["duplicates"] == 0
    finally:
        server.terminate()
        server.wait(10)
