"""
Chaos under load: two server processes on PostgreSQL and a private Redis, 500 client
sockets and 20 real agents (``python -m agent``), commands, alerts and metrics flowing
all the time; then one server process is SIGKILLed while commands are in flight and
started again, and Redis is SIGKILLed and started again, empty.  Clients resume by
themselves (:class:`Client`), agents reconnect by themselves.  After a bounded wait for
recovery, every client must hold every event it was owed, and every command the test
sent must have ended exactly once.

The oracle
----------

The reference must not be the thing under test, so it is built from what the test
itself did and saw, never from the server's history:

* **Ground truth of the test's own actions.**  The test knows every command it sent
  (each has a unique text, ``echo chaos-N``) and every alert it raised through REST
  (the 201 answer names it).  The agents' own records (each agent's ledger of the
  commands it ran, and its spool of results not yet acknowledged) say what really ran.

* **What the clients received.**  Every client records, per channel and in arrival
  order, each event's ``(epoch, offset)``, and every *loss notice* it was given: a
  ``subscribe`` answered ``recovered: false``, or a ``system`` status ``events_missed``.
  The union of the events all clients received is the reference of what was published
  (an event received by two clients must be the same event: same identity at the same
  offset).

A client's record of one channel is correct when:

1. no ``(epoch, offset)`` arrives twice — except events the client received live while
   its own re-subscribe (after ``events_missed``) was on its way, which the replay that
   follows sends again by design; those are counted as redeliveries;
2. within an epoch, offsets only grow; a new epoch starts only after a loss notice;
3. for every gap between two consecutive events (or between the position a
   subscription started from and its first event), without a loss notice received in
   between: a subscriber **without filters** must have no gap at all (every offset is
   for it); a subscriber with filters must miss no event of the reference that its
   filters match (the filters are evaluated by the test, independently of the server);
4. after its last event, it must miss no event of the reference that matches its
   filters and that any client had received more than ``TAIL_SLACK`` seconds before
   the clients were closed, unless a loss notice came after its last event.

Events that no client received at all are caught by rule 3 for filterless subscribers
(their offsets are missing), and by the ground truth when they were never numbered:
every alert the test raised and every command the database ended must have its event
(``raised``; the final status) in the reference, or every client that should have
received it must have been given a loss notice after the action was taken.

Commands:

* the database holds at most one execution per command sent, and none is left
  ``pending`` or ``running`` after the bounded drain (the sweep times out commands
  whose agent never answers; ``COMMAND_RESULT_GRACE_SECONDS`` is short here);
* a requester whose socket lived until the answer got exactly one answer: a
  ``response`` whose status and output are the database's, or ``COMMAND_FAILED`` for
  an execution the database recorded as failed;
* a requester whose socket died first (its server was killed) got no answer, and its
  resumed ``command_execution`` subscription delivered the final event exactly once
  (or it was given a loss notice); a command whose execution the database never
  recorded died with its server before the commit, and is counted;
* every command an agent's ledger says it ran ended ``completed`` in the database with
  the agent's output (a result is neither lost nor replaced) — unless the database
  recorded a ``timeout`` at a moment the agent's log shows it disconnected, which is the
  documented end of a command whose result cannot arrive within its timeout and
  ``COMMAND_RESULT_GRACE_SECONDS``; no execution has two final events, and every
  agent's spool of unacknowledged results is empty.

The summary printed at the end gives the events delivered, the resumes that recovered
and those that did not, the loss notices, the time each fault took to recover from, and
the CPU the agents, servers and clients used in the steady phase.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import os
import random
import re
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.integration import harness
from tests.integration.client import api, obtain_tokens
from tests.integration.harness import Deployment
from tests.integration.test_agent_e2e import AgentProcess
from tests.integration.test_ws_redis_restart import REDIS_SERVER, PrivateRedis

pytestmark = [pytest.mark.integration, pytest.mark.postgres_redis]

SUBSCRIBERS = 500
AGENTS = 20
#: Subscribers that also send commands (admin users, on both servers).
COMMANDERS = 4
#: Seconds between two commands of one commander.
COMMAND_EVERY = 0.8
#: A command's own timeout (the agent kills it after that) in seconds.
COMMAND_TIMEOUT = 5
#: Seconds between two alerts raised through REST.
ALERT_EVERY = 0.4
#: Seconds of load before the first fault, between faults, and after the last.
STEADY_SECONDS = 6.0
#: How long Redis stays down: longer than the node's publishing retries (about 6 s), so
#: that events and control messages of that time are dropped, not merely delayed.
REDIS_DOWN_SECONDS = 8.0
#: An event any client had this long before the clients closed is owed to every
#: subscriber it matches (delivery takes milliseconds; this is the slack for a busy host).
TAIL_SLACK = 3.0
#: Bounds of the waits for recovery and for the commands to end.
RECOVERY_TIMEOUT = 45.0
DRAIN_TIMEOUT = 40.0
SEED = int(os.environ.get("CHAOS_SEED", "0")) or random.randrange(1, 10**6)

SETTINGS = {
    "AGENT_HEARTBEAT_INTERVAL": "2",
    "AGENT_METRICS_INTERVAL": "2",
    "AGENT_RECHECK_SECONDS": "1",
    "COMMAND_RESULT_GRACE_SECONDS": "10",
    "MAINTENANCE_SWEEP_SECONDS": "2",
    "LAYER_REJOIN_SECONDS": "1",
    # hosts whose agent is away this long go offline (the killed process cannot say so)
    "HOST_OFFLINE_AFTER_SECONDS": "12",
    "WS_MAX_SOCKETS_PER_USER": "0",
}

LossMark = tuple[str, str, float]  # ("x", why, when)
EventMark = tuple[str, str, int, float]  # ("e" or "a", epoch, offset, when)
Key = tuple[str, int]  # (epoch, offset)

FINAL_STATUSES = {"completed", "failed", "timeout"}
COMMAND_TEXT = re.compile(r"echo chaos-(\d+)$")


# -- what the clients saw, together ---------------------------------------------------------


@dataclass(slots=True)
class Ref:
    """One event as the first client to receive it saw it."""

    ident: tuple[Any, ...]
    host_id: str | None
    severity: str | None
    first_seen: float
    data: dict[str, Any]


@dataclass
class Sent:
    """A command the test sent."""

    number: int
    client: Client
    generation: int
    sent_at: float
    wall: float
    replies: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Board:
    """Everything the clients saw, and what went wrong, shared by all of them."""

    reference: dict[str, dict[Key, Ref]] = field(default_factory=lambda: defaultdict(dict))
    problems: list[str] = field(default_factory=list)
    commands: dict[int, Sent] = field(default_factory=dict)
    #: execution ids seen running on command_execution, and those seen final
    running: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)
    counts: Counter[str] = field(default_factory=Counter)
    #: the phase of the run, and what was counted in each
    phase: str = "start"
    phases: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def count(self, what: str) -> None:
        self.counts[what] += 1
        self.phases[self.phase][what] += 1

    def problem(self, text: str) -> None:
        if len(self.problems) < 5000:
            self.problems.append(text)


def identity(channel: str, data: dict[str, Any]) -> tuple[Any, ...]:
    """What makes an event the event it is, whoever receives it (redaction and the
    ``metrics`` filter change other fields)."""
    if channel == "system_alerts":
        return (data["alert_id"], data["action"], data["severity"], data["status"])
    if channel == "command_execution":
        return (data["execution_id"], data["status"], data["final"], data["host_id"])
    if channel == "host_status":
        return (data["host_id"], data["status"], data["previous_status"])
    return (data["host_id"], data["timestamp"])


def matches(filters: dict[str, Any], ref: Ref) -> bool:
    """Whether a subscriber with ``filters`` is owed the event ``ref`` (the test's own
    reading of the filters of docs/websocket-protocol.md)."""
    host_id = filters.get("host_id")
    if host_id is not None and ref.host_id != host_id:
        return False
    severities = filters.get("severity")
    return severities is None or ref.severity in severities


# -- a client that resumes by itself ----------------------------------------------------------


class Client:
    """One client socket that reconnects and resumes by itself, and records everything.

    It reconnects with backoff (to its own server first, then the other), subscribes
    again to each channel with ``since`` set to the last position it saw, notes a
    ``recovered: false`` (and takes the snapshot that follows), and on an
    ``events_missed`` status subscribes again with ``since`` on the same socket.  It
    has at most one subscribe of a channel on its way: a re-subscribe asked for
    meanwhile is sent when the answer arrives, from the position reached by then.
    """

    def __init__(
        self,
        index: int,
        user: str,
        token: str,
        urls: list[str],
        subscriptions: dict[str, dict[str, Any]],
        board: Board,
    ) -> None:
        self.index = index
        self.user = user
        self.urls = urls
        self.token = token
        self.home = index % len(urls)
        self.subscriptions = subscriptions
        self.board = board
        self.rng = random.Random(SEED * 1000 + index)
        self.ws: ClientConnection | None = None
        self.generation = 0
        self.log: dict[str, list[LossMark | EventMark]] = {c: [] for c in subscriptions}
        self.seen: dict[str, set[Key]] = {c: set() for c in subscriptions}
        self.last: dict[str, dict[str, Any]] = {}
        #: channel -> id of the subscribe awaiting its answer
        self.awaiting: dict[str, str] = {}
        #: channels to subscribe to again once their answer arrives, or after a refusal
        self.again: set[str] = set()
        self.retrying: set[str] = set()
        #: channel -> events this socket received while a re-subscribe was on its way
        #: (the replay that answers it sends them again)
        self.window: dict[str, set[Key]] = {}
        self.ids = itertools.count(1)
        self.outstanding: dict[str, Sent] = {}
        #: execution id -> final events received for it (the requester's view)
        self.finals: Counter[str] = Counter()
        self.stopped = False
        self.connected_at = 0.0
        self.missed_at = 0.0  # the last events_missed
        self.connects = 0
        self.task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        """Connected, and every subscription answered."""
        return self.ws is not None and not self.awaiting and not self.again and not self.retrying

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.run())

    async def stop(self) -> None:
        self.stopped = True
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

    async def run(self) -> None:
        attempt = 0
        while not self.stopped:
            url = self.urls[(self.home + attempt) % len(self.urls)]
            query = urllib.parse.urlencode({"token": self.token})
            try:
                async with connect(
                    f"{url}?{query}",
                    open_timeout=10,
                    close_timeout=1,
                    max_size=None,
                    ping_interval=None,
                    compression=None,
                    proxy=None,
                ) as ws:
                    self.ws = ws
                    self.generation += 1
                    self.connects += 1
                    self.connected_at = time.monotonic()
                    self.window = {}
                    attempt = 0
                    await self._subscribe(list(self.subscriptions))
                    async for raw in ws:
                        await self._on(json.loads(raw))
            except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake):
                pass
            finally:
                self.ws = None
                self.awaiting.clear()
                self.again.clear()
                self.retrying.clear()
            attempt += 1
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt) * self.rng.uniform(0.5, 1.0))

    async def _send(self, message: dict[str, Any]) -> bool:
        ws = self.ws
        if ws is None:
            return False
        try:
            await ws.send(json.dumps(message))
        except ConnectionClosed:
            return False
        return True

    async def _subscribe(self, channels: list[str]) -> None:
        """Subscribe (again) to ``channels``, from the last position seen on each."""
        for channel in channels:
            if channel in self.awaiting:
                self.again.add(channel)
                continue
            self.again.discard(channel)
            message: dict[str, Any] = {
                "type": "subscribe",
                "channel": channel,
                "id": f"s{self.index}-{next(self.ids)}",
            }
            if self.subscriptions[channel]:
                message["filters"] = self.subscriptions[channel]
            if channel in self.last:
                message["since"] = self.last[channel]
                self.window.setdefault(channel, set())
            self.awaiting[channel] = message["id"]
            if not await self._send(message):
                return

    async def _on(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "event":
            self._event(message)
        elif kind == "response":
            if message["data"].get("action") == "subscribe":
                await self._subscribed(message)
            else:
                self._answered(message)
        elif kind == "status":
            data = message["data"]
            if message["channel"] == "system" and data.get("event") == "events_missed":
                now = time.monotonic()
                self.missed_at = now
                self.board.count("events_missed notices")
                for entries in self.log.values():
                    entries.append(("x", "events_missed", now))
                await self._subscribe(list(self.subscriptions))
            else:
                self.board.count(f"{message['channel']} snapshots")
        elif kind == "error":
            await self._error(message)

    def _event(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        key = (message["epoch"], message["offset"])
        board = self.board
        if channel not in self.seen:
            board.problem(f"client {self.index}: an event of unsubscribed {channel}")
            return
        window = self.window.get(channel)
        if key in self.seen[channel]:
            if window is not None and key in window:
                board.count("redelivered after a re-subscribe")
            else:
                board.problem(f"client {self.index}: {channel} {key} arrived twice")
            return
        if window is not None and channel in self.awaiting:
            window.add(key)
        now = time.monotonic()
        self.seen[channel].add(key)
        self.log[channel].append(("e", key[0], key[1], now))
        self.last[channel] = {"epoch": key[0], "offset": key[1]}
        board.count(f"{channel} delivered")
        data = message["data"]
        ident = identity(channel, data)
        known = board.reference[channel].get(key)
        if known is None:
            board.reference[channel][key] = Ref(
                ident, data.get("host_id"), data.get("severity"), now, data
            )
        elif known.ident != ident:
            board.problem(f"{channel} {key}: {known.ident} and {ident} at one offset")
        if channel == "command_execution":
            execution = data["execution_id"]
            if data["final"]:
                self.finals[execution] += 1
                board.finished.add(execution)
                board.running.discard(execution)
            elif data["status"] == "running" and execution not in board.finished:
                board.running.add(execution)

    async def _subscribed(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        data = message["data"]
        if self.awaiting.get(channel) != message.get("id"):
            self.board.problem(f"client {self.index}: an unexpected answer {message}")
            return
        del self.awaiting[channel]
        position = data.get("position")
        recovered = data.get("recovered")
        now = time.monotonic()
        if recovered is not None:
            self.board.count(f"resumed, recovered: {str(recovered).lower()}")
        if recovered is False:
            self.log[channel].append(("x", "recovered: false", now))
        if recovered is not True and position is not None:
            self.log[channel].append(("a", position["epoch"], position["offset"], now))
            self.last[channel] = position
        if channel in self.again:
            await self._subscribe([channel])

    def _answered(self, message: dict[str, Any]) -> None:
        sent = self.outstanding.pop(str(message.get("id")), None)
        if sent is None:
            self.board.problem(f"client {self.index}: an answer to nothing: {message}")
            return
        sent.replies.append(message)

    async def _error(self, message: dict[str, Any]) -> None:
        data = message["data"]
        request = str(message.get("id"))
        if request in self.outstanding:
            self._answered(message)
            return
        channel = data.get("requested_channel")
        if (
            data.get("code") == "SERVICE_UNAVAILABLE"
            and channel in self.subscriptions
            and self.awaiting.get(channel) == request
        ):
            # the history could not be read just then; the server dropped the
            # subscription: subscribe again shortly
            self.board.count("subscribe refused: history unreadable")
            del self.awaiting[channel]
            self.retrying.add(channel)
            asyncio.get_running_loop().call_later(
                0.5, lambda: asyncio.ensure_future(self._retry(channel, self.generation))
            )
            return
        self.board.problem(f"client {self.index}: error {data}")

    async def _retry(self, channel: str, generation: int) -> None:
        if generation == self.generation and channel in self.retrying:
            self.retrying.discard(channel)
            await self._subscribe([channel])

    async def command(self, number: int, host_id: str, pause: float) -> None:
        """Send ``echo chaos-<number>`` to ``host_id`` (after ``pause`` seconds of sleep)."""
        text = f"sleep {pause}; echo chaos-{number}"
        request = f"c{number}"
        sent = Sent(number, self, self.generation, time.monotonic(), time.time())
        self.outstanding[request] = sent
        ok = await self._send(
            {
                "type": "command",
                "channel": "command_execution",
                "id": request,
                "data": {"host_id": host_id, "command": text, "timeout": COMMAND_TIMEOUT},
            }
        )
        if ok:
            self.board.commands[number] = sent
        else:
            del self.outstanding[request]


# -- checking a client's record ------------------------------------------------------------


class Final:
    """A channel's reference events by epoch, in offset order."""

    def __init__(self, reference: dict[Key, Ref]) -> None:
        self.reference = reference
        self.epochs: dict[str, list[int]] = defaultdict(list)
        for epoch, offset in sorted(reference):
            self.epochs[epoch].append(offset)


def check_channel(
    client: Client, channel: str, reference: dict[Key, Ref], final: Final, cutoff: float
) -> list[str]:
    """Rules 2 to 4 of the module docstring for one client's channel."""
    filters = client.subscriptions[channel]
    filterless = not filters
    found: list[str] = []
    previous: Key | None = None
    told = False
    last_entry = 0.0
    for entry in client.log[channel]:
        last_entry = entry[-1]
        if entry[0] == "x":
            told = True
            continue
        _, epoch, offset, _ = entry  # type: ignore[misc]
        if entry[0] == "a":
            if previous is None or previous[0] != epoch or offset > previous[1]:
                previous = (epoch, offset)
            told = False
            continue
        if previous is not None and previous[0] != epoch:
            if not told:
                found.append(f"{channel}: epoch {previous[0]} -> {epoch} without a notice")
        elif previous is not None:
            if offset <= previous[1]:
                found.append(f"{channel}: {offset} after {previous[1]}")
            elif not told:
                owed = [
                    o
                    for o in range(previous[1] + 1, offset)
                    if filterless
                    or ((epoch, o) in reference and matches(filters, reference[(epoch, o)]))
                ]
                if owed:
                    found.append(f"{channel}: missed {owed[:10]} of epoch {epoch}")
        previous = (epoch, offset)
        told = False
    if told or previous is None:
        return found
    # The tail: what came after its last event.  In its epoch, every later event it
    # matches; in another epoch, any it matches that came after its last entry (it
    # should have moved there, after a notice).
    for epoch, offsets in final.epochs.items():
        if epoch == previous[0]:
            later = offsets[bisect.bisect_right(offsets, previous[1]) :]
        else:
            later = [o for o in offsets if final.reference[(epoch, o)].first_seen > last_entry]
        owed = [
            o
            for o in later
            if final.reference[(epoch, o)].first_seen < cutoff
            and matches(filters, final.reference[(epoch, o)])
        ]
        if owed:
            found.append(f"{channel}: never got {owed[:10]} of epoch {epoch} (tail)")
    return found


def describe(sent: Sent, row: dict[str, Any] | None) -> str:
    """A command and its execution, for a report."""
    when = datetime.fromtimestamp(sent.wall).strftime("%H:%M:%S.%f")[:-3]
    text = f"(sent {when} by client {sent.client.index}"
    if row is not None:
        text += (
            f"; execution {row['id']} on {row['hostname']}: {row['status']} "
            f"{row['error']!r}, created {row['created_at'][11:23]}, started "
            f"{(row['started_at'] or '')[11:23]}, finished {(row['finished_at'] or '')[11:23]}"
        )
    return text + ")"


def told_after(client: Client, channel: str, moment: float) -> bool:
    """Whether ``client`` was given a loss notice on ``channel`` after ``moment``."""
    return any(entry[0] == "x" and entry[-1] >= moment for entry in client.log[channel])


# -- processes --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by process ``pid``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_time(line: str) -> float:
    """The wall-clock time a line of an agent's log was written."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def away(agent: AgentProcess) -> list[tuple[float, float]]:
    """When the agent was disconnected (wall clock), by its log."""
    periods = []
    lost: float | None = None
    for line in agent.log.read_text(errors="replace").splitlines():
        if "Disconnected: " in line and lost is None:
            lost = log_time(line)
        elif "Connected to the server as" in line and lost is not None:
            periods.append((lost, log_time(line)))
            lost = None
    if lost is not None:
        periods.append((lost, float("inf")))
    return periods


def resident_mib(pid: int) -> float:
    """The resident memory of process ``pid``, in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def connected_agents(agents: list[AgentProcess], since: float) -> list[float]:
    """When each agent that connected after ``since`` (wall clock) first did, by its log."""
    found = []
    for agent in agents:
        for line in agent.log.read_text(errors="replace").splitlines():
            if "Connected to the server as" in line:
                when = log_time(line)
                if when >= since:
                    found.append(when)
                    break
    return found


async def wait_until(what: str, predicate: Any, timeout: float) -> float:
    """Poll ``predicate`` until true; return when it was (fail after ``timeout`` s)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        await asyncio.sleep(0.1)
    return time.monotonic()


def register_hosts(deployment: Deployment, count: int) -> dict[str, dict[str, str]]:
    """Enroll ``count`` hosts in one go; their ids and agent tokens by hostname."""
    out = harness.manage_shell(
        deployment.env,
        "import json\n"
        "from hosts import services\n"
        "out = {}\n"
        f"for i in range({count}):\n"
        "    host, token = services.host_register(hostname=f'chaos-{i:02d}')\n"
        "    out[host.hostname] = {'host_id': str(host.id), 'token': token}\n"
        "print('HOSTS_JSON: ' + json.dumps(out))\n",
    )
    line = next(x for x in out.splitlines() if x.startswith("HOSTS_JSON: "))
    return json.loads(line[len("HOSTS_JSON: ") :])


async def all_commands(base_url: str, token: str, **query: str) -> list[dict[str, Any]]:
    """Every command execution the REST API lists (``/api/commands/``), page by page."""
    found: list[dict[str, Any]] = []
    while True:
        params = urllib.parse.urlencode({**query, "limit": 200, "offset": len(found)})
        response = await api("GET", base_url, f"/api/commands/?{params}", token=token)
        assert response.status == 200, response
        found.extend(response.body["results"])
        if not response.body.get("next"):
            return found


def read_ledger(state_dir: Path) -> dict[str, str]:
    """The commands an agent accepted and their state there (``running``/``finished``)."""
    path = state_dir / "seen-ids.json"
    if not path.exists():
        return {}
    entries = json.loads(path.read_text())["entries"]
    return {ref: state for kind, ref, state in entries if kind == "command_result"}


def spooled(state_dir: Path) -> list[str]:
    """Results an agent holds that the server has not acknowledged."""
    return sorted(p.name for p in (state_dir / "results").glob("*.json"))


def subscriptions_for(index: int, hosts: list[str], rng: random.Random) -> dict[str, dict]:
    """A mix of channels and filters; every host gets metrics subscribers."""
    chosen: dict[str, dict[str, Any]] = {}
    if index < COMMANDERS or rng.random() < 0.5:
        chosen["command_execution"] = (
            {} if index < COMMANDERS or rng.random() < 0.6 else {"host_id": rng.choice(hosts)}
        )
    if rng.random() < 0.6:
        roll = rng.random()
        if roll < 0.5:
            chosen["system_alerts"] = {}
        elif roll < 0.75:
            chosen["system_alerts"] = {
                "severity": sorted(rng.sample(["info", "warning", "critical"], rng.randint(1, 2)))
            }
        else:
            chosen["system_alerts"] = {"host_id": rng.choice(hosts)}
    if rng.random() < 0.4:
        chosen["host_status"] = {} if rng.random() < 0.6 else {"host_id": rng.choice(hosts)}
    if index % 3 == 0 or not chosen:
        metrics: dict[str, Any] = {"host_id": hosts[index % len(hosts)]}
        if rng.random() < 0.5:
            metrics["metrics"] = ["cpu", "memory"]
        chosen["host_metrics"] = metrics
    return chosen


# -- the test ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chaos(
    launch_pg_redis: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PrivateRedis, Deployment]]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")
    redis = PrivateRedis(tmp_path_factory.mktemp("chaos-redis"))
    redis.start()
    try:
        with launch_pg_redis("chaos", REDIS_URL=redis.url, **SETTINGS) as deployment:
            yield redis, deployment
    finally:
        redis.kill()


async def test_clients_and_commands_come_through_a_killed_server_and_an_emptied_redis(
    chaos: tuple[PrivateRedis, Deployment], tmp_path: Path
) -> None:
    redis, cluster = chaos
    began = time.monotonic()
    rng = random.Random(SEED)
    print(f"\nchaos seed {SEED} (CHAOS_SEED={SEED} repeats this run's choices)")
    enrolled = await asyncio.to_thread(register_hosts, cluster, AGENTS)
    hosts = [enrolled[name]["host_id"] for name in sorted(enrolled)]
    agents = [
        AgentProcess(
            cluster.servers[i % 2].base_url,
            enrolled[name]["token"],
            tmp_path / f"{name}-state",
            tmp_path / f"{name}.log",
            metrics_interval=2,
            log_level="INFO",
        )
        for i, name in enumerate(sorted(enrolled))
    ]
    board = Board()
    clients: list[Client] = []
    stop_load = asyncio.Event()
    load: list[asyncio.Task[None]] = []
    try:
        for agent in agents:
            agent.start()
        done = await wait_until(
            "all agents connected",
            lambda: len(connected_agents(agents, 0)) == len(agents),
            30,
        )
        print(f"{len(agents)} agents connected in {done - began:.1f}s")

        tokens = {
            user: (
                await asyncio.to_thread(
                    obtain_tokens, cluster.server.base_url, user, cluster.password
                )
            )["access"]
            for user in ("admin", "viewer")
        }
        urls = [server.ws_url for server in cluster.servers]
        for index in range(SUBSCRIBERS):
            user = "viewer" if index >= COMMANDERS and index % 7 == 3 else "admin"
            clients.append(
                Client(index, user, tokens[user], urls, subscriptions_for(index, hosts, rng), board)
            )
        started = time.monotonic()
        for batch in range(0, len(clients), 50):
            for client in clients[batch : batch + 50]:
                client.start()
            await asyncio.sleep(0.2)
        done = await wait_until(
            "all clients subscribed", lambda: all(c.ready for c in clients), RECOVERY_TIMEOUT
        )
        print(f"{len(clients)} clients connected and subscribed in {done - started:.1f}s")
        for channel in ("system_alerts", "host_status", "command_execution"):
            wide = sum(1 for c in clients if c.subscriptions.get(channel) == {})
            narrow = sum(1 for c in clients if c.subscriptions.get(channel))
            print(f"  {channel}: {wide} without filters, {narrow} with filters")
        print(f"  host_metrics: {sum(1 for c in clients if 'host_metrics' in c.subscriptions)}")

        # -- load -----------------------------------------------------------------------
        numbers = itertools.count(1)
        alerts: list[tuple[int, str, dict[str, Any], float]] = []  # (n, id, body, sent at)
        alerts_in_doubt = 0

        async def commander(client: Client) -> None:
            while not stop_load.is_set():
                await asyncio.sleep(COMMAND_EVERY * client.rng.uniform(0.5, 1.5))
                if client.ready and not stop_load.is_set():
                    pause = client.rng.choice((0, 0.5, 1.5, 2.5))
                    await client.command(next(numbers), client.rng.choice(hosts), pause)

        async def raise_alerts() -> None:
            nonlocal alerts_in_doubt
            for n in itertools.count(1):
                if stop_load.is_set():
                    return
                body: dict[str, Any] = {
                    "severity": rng.choice(("info", "warning", "critical")),
                    "category": "chaos",
                    "title": f"chaos-alert-{n}",
                }
                host = rng.choice([*hosts[:5], None])
                if host is not None:
                    body["host"] = host
                for server in (cluster.servers[n % 2], cluster.servers[(n + 1) % 2]):
                    sent_at = time.monotonic()
                    try:
                        response = await api(
                            "POST",
                            server.base_url,
                            "/api/alerts/",
                            token=tokens["admin"],
                            json_body=body,
                            timeout=5,
                        )
                    except ConnectionRefusedError:
                        continue
                    except OSError as exc:
                        if isinstance(getattr(exc, "reason", None), ConnectionRefusedError):
                            continue
                        alerts_in_doubt += 1  # sent, answer lost: it may or may not exist
                        break
                    if response.status == 201:
                        alerts.append((n, response.body["id"], body, sent_at))
                    else:
                        board.problem(f"alert {n}: {response.status} {response.body}")
                    break
                await asyncio.sleep(ALERT_EVERY)

        board.phase = "steady"
        commanders = clients[:COMMANDERS]
        load = [asyncio.ensure_future(commander(c)) for c in commanders]
        load.append(asyncio.ensure_future(raise_alerts()))
        # A host status change every subscriber to every host is owed, whenever the sweep
        # of the seeded hosts happens to run: a host without an agent comes online (and
        # goes offline again at a later sweep).
        await asyncio.to_thread(
            harness.manage_shell,
            cluster.env,
            "from hosts import services\n"
            f"services.host_set_status(host_id={cluster.host_id('web-01')!r}, status='online')\n",
        )

        pids = {
            "agents": [a.proc.pid for a in agents if a.proc is not None],
            "servers": [s.process.pid for s in cluster.servers if s.process is not None],
        }
        cpu_before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        own_before = time.process_time()
        steady_began = time.monotonic()
        await asyncio.sleep(STEADY_SECONDS)
        steady = time.monotonic() - steady_began
        cpu = {
            k: (sum(cpu_seconds(p) for p in v) - cpu_before[k]) / steady for k, v in pids.items()
        }
        cpu["clients (the test process)"] = (time.process_time() - own_before) / steady
        memory = {k: sum(resident_mib(p) for p in v) for k, v in pids.items()}

        # -- fault 1: a server process killed while commands run ---------------------------
        await wait_until("commands running", lambda: len(board.running) >= 3, 15)
        victim_index = 0
        victim = cluster.servers[victim_index]
        in_flight = len(board.running)
        victims = [c for c in clients if c.ws is not None and c.home == victim_index]
        killed_at, killed_wall = time.monotonic(), time.time()
        board.phase = "server killed"
        victim.kill()
        await asyncio.sleep(1.0)
        restarted = harness.DaphneServer(
            f"{victim.name}-restarted",
            victim.env,
            victim.log_path.with_name(f"{victim.name}-restarted.log"),
            port=victim.port,
        ).start()
        cluster.servers[victim_index] = restarted
        await asyncio.to_thread(restarted.wait_ready)
        restarted_at = time.monotonic()
        clients_back = await wait_until(
            "clients of the killed server resumed",
            lambda: (
                all(c.connected_at > killed_at for c in victims) and all(c.ready for c in clients)
            ),
            RECOVERY_TIMEOUT,
        )
        cut_off = agents[victim_index :: len(cluster.servers)]
        await wait_until(
            "agents of the killed server reconnected",
            lambda: len(connected_agents(cut_off, killed_wall)) == len(cut_off),
            RECOVERY_TIMEOUT,
        )
        agents_back = max(connected_agents(cut_off, killed_wall)) - killed_wall
        server_recovery = {
            "at": datetime.fromtimestamp(killed_wall).strftime("%H:%M:%S.%f")[:-3],
            "commands running": in_flight,
            "clients cut off": len(victims),
            "serving again": f"{restarted_at - killed_at:.1f}s",
            "every client resumed": f"{clients_back - killed_at:.1f}s",
            "every agent reconnected": f"{agents_back:.1f}s",
        }
        await asyncio.sleep(STEADY_SECONDS)

        # -- fault 2: Redis killed and started again, empty ------------------------------
        redis_killed_at, redis_killed_wall = time.monotonic(), time.time()
        board.phase = "redis emptied"
        await asyncio.to_thread(redis.kill)
        await asyncio.sleep(REDIS_DOWN_SECONDS)
        redis.start()  # in this thread: its process lives as long as the thread
        redis_back_at = time.monotonic()
        told = await wait_until(
            "every client told events_missed and resubscribed",
            lambda: all(c.missed_at > redis_killed_at and c.ready for c in clients),
            RECOVERY_TIMEOUT,
        )
        redis_recovery = {
            "at": datetime.fromtimestamp(redis_killed_wall).strftime("%H:%M:%S.%f")[:-3],
            "down": f"{redis_back_at - redis_killed_at:.1f}s",
            "every client told and resumed": f"{told - redis_back_at:.1f}s after restart",
        }
        await asyncio.sleep(STEADY_SECONDS)

        # -- drain, then judge --------------------------------------------------------------
        board.phase = "drain"
        stop_load.set()
        await asyncio.gather(*load)
        drain_began = time.monotonic()
        admin = tokens["admin"]
        base = cluster.servers[1].base_url

        async def unfinished() -> list[dict[str, Any]]:
            return [
                *await all_commands(base, admin, status="pending"),
                *await all_commands(base, admin, status="running"),
            ]

        left: list[dict[str, Any]] = []
        while time.monotonic() - drain_began < DRAIN_TIMEOUT:
            left = await unfinished()
            answered = all(
                s.replies or s.generation != s.client.generation for s in board.commands.values()
            )
            spooling = any(spooled(a.state_dir) for a in agents)
            if not left and answered and not spooling:
                break
            await asyncio.sleep(0.5)
        drained = time.monotonic() - drain_began
        await wait_until("all clients ready", lambda: all(c.ready for c in clients), 15)
        await asyncio.sleep(TAIL_SLACK)
        closed_at = time.monotonic()
        for client in clients:
            client.stopped = True
        await asyncio.gather(*(c.stop() for c in clients))
        ledgers = {ref: state for a in agents for ref, state in read_ledger(a.state_dir).items()}
        absences = {a.log.stem: away(a) for a in agents}
        unacked = {a.state_dir.name: spooled(a.state_dir) for a in agents}
    finally:
        stop_load.set()
        for task in load:
            task.cancel()
        for client in clients:
            client.stopped = True
        await asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)
        for agent in agents:
            agent.stop()

    # -- the checks (module docstring) --------------------------------------------------------
    problems = list(board.problems)
    for phase in ("steady", "server killed"):  # Redis kept every history meanwhile
        for what in ("resumed, recovered: false", "events_missed notices"):
            if board.phases[phase][what]:
                problems.append(f"{phase}: {board.phases[phase][what]} {what}")
    cutoff = closed_at - TAIL_SLACK
    finals = {
        channel: Final(reference) for channel, reference in board.reference.items() if reference
    }
    for client in clients:
        for channel in client.subscriptions:
            if channel not in finals:
                problems.append(f"no client received any {channel} event")
                continue
            problems.extend(
                f"client {client.index} ({client.user}): {p}"
                for p in check_channel(
                    client, channel, board.reference[channel], finals[channel], cutoff
                )
            )

    # alerts raised: each has its event, or every subscriber it was owed to was told
    raised = {
        ref.data["alert_id"]: ref
        for ref in board.reference["system_alerts"].values()
        if ref.data["action"] == "raised"
    }
    for n, alert_id, body, sent_at in alerts:
        if alert_id in raised:
            continue
        probe = Ref((), body.get("host"), body["severity"], 0, {})
        untold = [
            c.index
            for c in clients
            if "system_alerts" in c.subscriptions
            and matches(c.subscriptions["system_alerts"], probe)
            and not told_after(c, "system_alerts", sent_at)
        ]
        if untold:
            problems.append(f"alert {n} ({alert_id}): no event, and {len(untold)} untold")

    # commands: the database, the requesters, the agents
    executions = await all_commands(base, admin)
    by_number: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for execution in executions:
        found = COMMAND_TEXT.search(execution["command"] or "")
        if found:
            by_number[int(found.group(1))].append(execution)
    final_events: dict[str, list[Key]] = defaultdict(list)
    for key, ref in board.reference["command_execution"].items():
        if ref.data["final"]:
            final_events[ref.data["execution_id"]].append(key)
    for execution_id, keys in final_events.items():
        if len(keys) > 1:
            problems.append(f"execution {execution_id} has {len(keys)} final events: {keys}")
    outcomes: Counter[str] = Counter()
    for number, sent in sorted(board.commands.items()):
        rows = by_number.get(number, [])
        expected = f"chaos-{number}\n"
        if len(rows) > 1:
            problems.append(f"command {number}: {len(rows)} executions {describe(sent, None)}")
            continue
        requester = sent.client
        lost_socket = sent.generation != requester.generation and not sent.replies
        if not rows:
            if sent.replies or not lost_socket:
                problems.append(
                    f"command {number}: no execution, answers {sent.replies} {describe(sent, None)}"
                )
            outcomes["never recorded (its server died first)"] += 1
            continue
        (row,) = rows
        outcomes[row["status"]] += 1
        if row["status"] not in FINAL_STATUSES:
            problems.append(f"command {number}: not final {describe(sent, row)}")
            continue
        if row["status"] == "completed" and row["stdout_preview"] != expected:
            problems.append(
                f"command {number}: output {row['stdout_preview']!r} {describe(sent, row)}"
            )
        if len(sent.replies) > 1:
            problems.append(f"command {number}: {len(sent.replies)} answers {describe(sent, row)}")
        if sent.replies:
            (reply,) = sent.replies
            if reply["type"] == "response":
                got = (reply["data"]["status"], reply["data"]["stdout"])
                want = (row["status"], expected if row["status"] == "completed" else got[1])
                if got != want or reply["data"]["execution_id"] != row["id"]:
                    problems.append(f"command {number}: answered {got} {describe(sent, row)}")
            elif (reply["data"]["code"], reply["data"].get("execution_id"), row["status"]) != (
                "COMMAND_FAILED",
                row["id"],
                "failed",
            ):
                problems.append(f"command {number}: answered {reply['data']} {describe(sent, row)}")
            else:
                outcomes["answered COMMAND_FAILED"] += 1
        elif lost_socket:
            outcomes["answer lost with the socket"] += 1
            seen = requester.finals.get(row["id"], 0)
            if seen != 1 and not told_after(requester, "command_execution", sent.sent_at):
                problems.append(
                    f"command {number}: its requester's socket died and it got {seen} "
                    f"final events on its resumed subscription {describe(sent, row)}"
                )
        else:
            problems.append(
                f"command {number}: no answer on a socket that stayed open {describe(sent, row)}"
            )
        if row["id"] not in final_events:
            probe = Ref((), row["host"], None, 0, {})
            untold = [
                c.index
                for c in clients
                if "command_execution" in c.subscriptions
                and matches(c.subscriptions["command_execution"], probe)
                and not told_after(c, "command_execution", sent.sent_at)
            ]
            if untold:
                problems.append(
                    f"command {number} ended with no final event, and {len(untold)} "
                    f"untold {describe(sent, row)}"
                )
        ran = ledgers.get(row["id"]) == "finished"
        if ran and (row["status"], row["stdout_preview"]) != ("completed", expected):
            # documented: no result within its timeout and the grace is a timeout
            ended = datetime.fromisoformat(row["finished_at"].replace("Z", "+00:00")).timestamp()
            if row["status"] == "timeout" and any(
                start <= ended <= end for start, end in absences[row["hostname"]]
            ):
                outcomes["timed out while its agent was away"] += 1
            else:
                problems.append(
                    f"command {number}: its agent ran it, the result was lost {describe(sent, row)}"
                )
    if left:
        problems.append(f"{len(left)} commands still pending or running: {left[:5]}")
    for name, files in unacked.items():
        if files:
            problems.append(f"agent {name}: {len(files)} results never acknowledged")
    for server in [victim, *cluster.servers]:
        if "Traceback (most recent call last)" in server.log():
            problems.append(f"server {server.name} logged a traceback")

    # -- summary ------------------------------------------------------------------------------
    delivered = sum(v for k, v in board.counts.items() if k.endswith(" delivered"))
    print(f"seed {SEED}; {len(clients)} clients, {len(agents)} agents")
    print(f"events delivered: {delivered}")
    for phase, counts in board.phases.items():
        print(f"  {phase}: {dict(sorted(counts.items()))}")
    print(
        "events published (reference): "
        + ", ".join(f"{c}: {len(r)}" for c, r in sorted(board.reference.items()))
    )
    print(f"reconnections of clients: {sum(c.connects for c in clients) - len(clients)}")
    print(f"commands sent: {len(board.commands)}; outcomes: {dict(outcomes)}")
    print(f"alerts raised: {len(alerts)} (answers lost: {alerts_in_doubt})")
    print(f"server killed: {server_recovery}")
    print(f"redis emptied: {redis_recovery}")
    print(f"drained in {drained:.1f}s; total {time.monotonic() - began:.0f}s")
    print("steady-phase CPU (cores): " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
    print("resident memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:60])
