"""
``scripts/ws_watch.py`` against a real server through a relay that cuts the connection
while alerts are raised: the watcher reconnects by itself and says what became of its
stream; with stream resume on the server, it prints every alert of the gap, each once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.integration import harness
from tests.integration.client import http_request
from tests.integration.relay import Relay

pytestmark = pytest.mark.integration

#: Bound of each wait on the watcher's output.
WAIT = 30.0


@pytest.fixture(scope="module")
def deployment(launch_sqlite: Any) -> Iterator[harness.Deployment]:
    with launch_sqlite("ws-watch-resume") as deployment:
        yield deployment


@dataclass
class Watcher:
    """``ws_watch.py`` running as a process: its JSON lines and its notes, as they come."""

    process: asyncio.subprocess.Process
    lines: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    async def read(self) -> None:
        async def collect(stream: asyncio.StreamReader, sink: Callable[[str], None]) -> None:
            while line := await stream.readline():
                sink(line.decode().rstrip("\n"))

        assert self.process.stdout is not None
        assert self.process.stderr is not None
        await asyncio.gather(
            collect(self.process.stdout, lambda text: self.lines.append(json.loads(text))),
            collect(self.process.stderr, self.notes.append),
        )

    async def until(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}\nnotes:\n"
                    + "\n".join(self.notes)
                    + "\nlines:\n"
                    + "\n".join(json.dumps(line) for line in self.lines[-20:])
                )
            await asyncio.sleep(0.05)

    def alert_events(self) -> list[tuple[str, str]]:
        """``(title, action)`` of every ``system_alerts`` event printed, in order."""
        return [
            (line["data"]["title"], line["data"]["action"])
            for line in self.lines
            if line.get("type") == "event" and line.get("channel") == "system_alerts"
        ]

    def connections(self) -> int:
        return sum(note.startswith("ws_watch: connected to") for note in self.notes)


@contextlib.asynccontextmanager
async def watching(deployment: harness.Deployment) -> AsyncIterator[tuple[Watcher, Relay]]:
    """``ws_watch.py --channel system_alerts`` through a relay to the server."""
    relay = Relay(deployment.server.port)
    port = await relay.start()
    process = await asyncio.create_subprocess_exec(
        harness.PYTHON,
        "scripts/ws_watch.py",
        *("--url", f"http://127.0.0.1:{port}", "--token", deployment.token("admin")),
        *("--channel", "system_alerts"),
        cwd=harness.REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    watcher = Watcher(process)
    reading = asyncio.ensure_future(watcher.read())
    try:
        await watcher.until(
            lambda: any(line.get("type") == "response" for line in watcher.lines),
            "the subscription",
        )
        yield watcher, relay
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await asyncio.wait_for(process.wait(), 10)
        await asyncio.wait_for(reading, 10)
        await relay.close()


async def raise_alert(deployment: harness.Deployment, title: str) -> str:
    response = await asyncio.to_thread(
        http_request,
        "POST",
        deployment.server.base_url + "/api/alerts/",
        token=deployment.token("admin"),
        json_body={"severity": "warning", "category": "resume-test", "title": title},
    )
    assert response.status == 201, response.body
    return str(response.body["id"])


async def acknowledge(deployment: harness.Deployment, alert_id: str) -> None:
    response = await asyncio.to_thread(
        http_request,
        "POST",
        f"{deployment.server.base_url}/api/alerts/{alert_id}/acknowledge/",
        token=deployment.token("admin"),
    )
    assert response.status == 200, response.body


async def cut_while_alerts_change(
    deployment: harness.Deployment, watcher: Watcher, relay: Relay, tag: str
) -> list[tuple[str, str]]:
    """An alert before the cut, three raised and one of them acknowledged while the
    watcher is cut off, one after it is back; return the events that ought to be printed."""
    await raise_alert(deployment, f"{tag} before")
    await watcher.until(lambda: (f"{tag} before", "raised") in watcher.alert_events(), "before")
    relay.refuse()
    relay.cut()
    await watcher.until(
        lambda: any("server closed the connection" in note for note in watcher.notes),
        "the watcher to see the drop",
    )
    during = [await raise_alert(deployment, f"{tag} during {n}") for n in range(3)]
    await acknowledge(deployment, during[1])
    relay.accept()
    await watcher.until(lambda: watcher.connections() == 2, "the watcher to reconnect")
    await watcher.until(
        lambda: (
            any(
                line.get("type") == "response" and line.get("channel") == "system_alerts"
                for line in watcher.lines[-10:]
            )
            or len(watcher.alert_events()) > 1
        ),
        "the renewed subscription",
    )
    await raise_alert(deployment, f"{tag} after")
    return [
        (f"{tag} before", "raised"),
        *((f"{tag} during {n}", "raised") for n in range(3)),
        (f"{tag} during 1", "acknowledged"),
        (f"{tag} after", "raised"),
    ]


async def test_ws_watch_reconnects_after_a_cut_and_says_what_became_of_its_stream(deployment):
    async with watching(deployment) as (watcher, relay):
        tag = secrets.token_hex(3)
        await cut_while_alerts_change(deployment, watcher, relay, tag)
        await watcher.until(lambda: (f"{tag} after", "raised") in watcher.alert_events(), "after")
        said = [note for note in watcher.notes if note.startswith("ws_watch: system_alerts: ")]
        assert len(said) == 1, watcher.notes
        assert any(
            words in said[0]
            for words in ("stream recovered", "stream not recovered", "does not resume streams")
        ), said


async def test_ws_watch_prints_every_event_of_the_gap_once_after_resuming(deployment):
    async with watching(deployment) as (watcher, relay):
        tag = secrets.token_hex(3)
        expected = await cut_while_alerts_change(deployment, watcher, relay, tag)
        await watcher.until(
            lambda: (
                (f"{tag} after", "raised") in watcher.alert_events()
                and len([e for e in watcher.alert_events() if e[0].startswith(tag)])
                >= len(expected)
            ),
            "every alert event of the test",
        )
        assert [e for e in watcher.alert_events() if e[0].startswith(tag)] == expected
        assert any("system_alerts: stream recovered from offset" in n for n in watcher.notes), (
            watcher.notes
        )
