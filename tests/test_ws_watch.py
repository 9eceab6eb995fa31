"""``scripts/ws_watch.py`` resuming streams: ``since`` on renewals, replayed events,
duplicates, recovered or not, ``events_missed``, and reconnecting after 4008 (against a
small protocol server on loopback that plays the server's side)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "ws_watch.py"
_SPEC = importlib.util.spec_from_file_location("ws_watch", _PATH)
assert _SPEC is not None
assert _SPEC.loader is not None
ws_watch = importlib.util.module_from_spec(_SPEC)
sys.modules["ws_watch"] = ws_watch
_SPEC.loader.exec_module(ws_watch)

EPOCH = "k3J9"


def event(channel: str, offset: int, epoch: str = EPOCH, **data: Any) -> dict[str, Any]:
    return {
        "type": "event",
        "channel": channel,
        "data": {"n": offset, **data},
        "timestamp": f"2026-11-25T22:00:{offset % 60:02d}.000Z",
        "offset": offset,
        "epoch": epoch,
    }


def response(request: dict[str, Any], at: str = "2026-11-25T22:01:00.000Z", **data: Any):
    return {
        "type": "response",
        "channel": request["channel"],
        "data": {
            "action": "subscribe",
            "status": "subscribed",
            "channel": request["channel"],
            **data,
        },
        "timestamp": at,
        "id": request["id"],
    }


def streams_of(*channels: str) -> Any:
    args = ws_watch.parse_args(["--token", "t", *(f"--channel={c}" for c in channels)])
    return ws_watch.Streams(ws_watch.subscriptions(args))


def confirmed(channels: tuple[str, ...], offset: int | None = 10) -> tuple[Any, list[dict]]:
    """Streams whose first subscriptions the server confirmed (at ``offset``)."""
    streams = streams_of(*channels)
    first = streams.subscribe_messages("reconnected")
    assert all("since" not in m for m in first)
    position = {} if offset is None else {"position": {"epoch": EPOCH, "offset": offset}}
    for message in first:
        streams.handle(response(message, **position))
    return streams, first


def shown_offsets(outcome: Any) -> list[Any]:
    return [m.get("offset", m["type"]) for m in outcome.show]


def test_renewals_resume_from_the_response_position_then_from_the_last_event():
    streams, _ = confirmed(("host_metrics", "system_alerts"))
    renewals = streams.subscribe_messages("reconnected")
    assert [m.get("since") for m in renewals] == [{"epoch": EPOCH, "offset": 10}] * 2
    streams.connection_lost()
    streams.handle(event("system_alerts", 14))
    renewals = streams.subscribe_messages("reconnected")
    assert renewals[1] == {
        "type": "subscribe",
        "channel": "system_alerts",
        "id": "sub-2",
        "since": {"epoch": EPOCH, "offset": 14},
    }


def test_duplicates_are_dropped_and_a_new_epoch_is_taken():
    streams, _ = confirmed(("command_execution",))
    seen = []
    for offset, epoch in (
        (11, EPOCH),
        (11, EPOCH),
        (9, EPOCH),
        (12, EPOCH),
        (3, "reset"),
        (3, "reset"),
    ):
        seen += shown_offsets(streams.handle(event("command_execution", offset, epoch)))
    assert seen == [11, 12, 3]
    assert streams.duplicates == 3
    assert streams.subscribe_messages("reconnected")[0]["since"] == {"epoch": "reset", "offset": 3}


def test_a_recovered_stream_is_said_and_its_replay_printed_once():
    streams, _ = confirmed(("package_operations",))
    streams.handle(event("package_operations", 12))
    streams.connection_lost()
    [renewal] = streams.subscribe_messages("reconnected")
    answer = streams.handle(
        response(renewal, recovered=True, position={"epoch": EPOCH, "offset": 15})
    )
    assert answer.notes == [
        f"package_operations: stream recovered from offset 12 (epoch {EPOCH}): "
        "the missed events follow"
    ]
    replayed = [streams.handle(event("package_operations", n)) for n in (12, 13, 14, 15)]
    assert [o for outcome in replayed for o in shown_offsets(outcome)] == [13, 14, 15]


@pytest.mark.parametrize(
    ("channel", "then"),
    [
        ("system_alerts", "the status snapshot follows"),
        ("host_metrics", "this channel has no snapshot"),
    ],
)
def test_a_stream_not_recovered_is_said_with_its_gap(channel, then):
    streams, _ = confirmed((channel,))
    streams.handle(event(channel, 12))
    streams.connection_lost()
    [renewal] = streams.subscribe_messages("reconnected")
    answer = streams.handle(
        response(renewal, recovered=False, position={"epoch": "new", "offset": 4})
    )
    assert answer.notes == [
        f"{channel}: stream not recovered: events between 2026-11-25T22:00:12.000Z and "
        f"2026-11-25T22:01:00.000Z are lost; {then}"
    ]
    assert shown_offsets(streams.handle(event(channel, 4, "new"))) == []  # not after the position
    assert shown_offsets(streams.handle(event(channel, 5, "new"))) == [5]


def test_events_missed_renews_every_stream_and_the_replay_replaces_held_back_events():
    streams, _ = confirmed(("system_alerts", "host_status"))
    streams.handle(event("system_alerts", 11))
    notice = {
        "type": "status",
        "channel": "system",
        "data": {"event": "events_missed", "since": "A", "until": "B"},
        "timestamp": "2026-11-25T22:02:00.000Z",
    }
    outcome = streams.handle(notice)
    assert outcome.show == [notice]
    assert outcome.notes == ["the server may have missed events (A to B); resuming every stream"]
    assert [(m["channel"], m["since"]) for m in outcome.send] == [
        ("system_alerts", {"epoch": EPOCH, "offset": 11}),
        ("host_status", {"epoch": EPOCH, "offset": 10}),
    ]
    # A live event before the server took the renewal waits; the replay brings it, in order.
    assert shown_offsets(streams.handle(event("system_alerts", 14))) == []
    streams.handle(response(outcome.send[0], recovered=True))
    printed = [streams.handle(event("system_alerts", n)) for n in (12, 13, 14)]
    assert [o for outcome in printed for o in shown_offsets(outcome)] == [12, 13, 14]
    # Another notice while host_status's renewal is unanswered renews only the others.
    assert [m["channel"] for m in streams.handle(notice).send] == ["system_alerts"]


def test_held_back_events_are_printed_when_nothing_replays_them():
    streams, _ = confirmed(("user_activity", "fleet_status"))
    renewals = streams.handle(
        {"type": "status", "channel": "system", "data": {"event": "events_missed"}}
    ).send
    streams.handle(event("user_activity", 12))
    streams.handle(event("fleet_status", 12))
    answer = streams.handle(response(renewals[0], recovered=False))
    assert shown_offsets(answer) == ["response", 12]
    refused = {
        "type": "error",
        "channel": "subscription",
        "data": {"code": "SUBSCRIPTION_FAILED", "message": "no"},
        "id": renewals[1]["id"],
    }
    assert shown_offsets(streams.handle(refused)) == ["error", 12]


def test_a_server_that_does_not_resume_gets_no_since_and_everything_is_printed():
    streams, _ = confirmed(("host_status",), offset=None)
    plain = {"type": "event", "channel": "host_status", "data": {"n": 1}}
    assert streams.handle(plain).show == [plain]
    assert streams.handle(plain).show == [plain]
    [renewal] = streams.subscribe_messages("reconnected")
    assert "since" not in renewal
    answer = streams.handle(response(renewal))
    assert answer.notes[0].startswith(
        "host_status: subscribed again; the server does not resume streams"
    )


@pytest.mark.parametrize(
    "position",
    [
        {"epoch": EPOCH, "offset": "12"},
        {"epoch": EPOCH, "offset": -1},
        {"epoch": EPOCH, "offset": True},
        {"epoch": "", "offset": 3},
        {"epoch": 7, "offset": 3},
        "12",
        None,
    ],
)
def test_malformed_positions_are_ignored(position):
    assert ws_watch.stream_position(position) is None
    streams, _ = confirmed(("fleet_status",), offset=None)
    streams.handle(response({"channel": "fleet_status", "id": "sub-1"}, position=position))
    assert "since" not in streams.subscribe_messages("reconnected")[0]


def test_reconnect_delays_grow_with_jitter_up_to_the_maximum():
    for attempt in range(12):
        ceiling = min(ws_watch.MAX_DELAY, ws_watch.FIRST_DELAY * 2**attempt)
        delays = [ws_watch.reconnect_delay(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, delays)
        assert len(set(delays)) > 1


async def test_close_4008_reconnects_and_resumes_printing_each_event_once(monkeypatch, capsys):
    """Against a loopback server playing the protocol: the first connection ends with
    4008 (too slow); the watcher reconnects, resumes from the last event, and prints the
    replay without the event it had already."""
    monkeypatch.setattr(ws_watch, "FIRST_DELAY", 0.05)
    subscribes: list[dict[str, Any]] = []

    async def server_side(ws: ServerConnection) -> None:
        request = json.loads(await ws.recv())
        subscribes.append(request)
        if len(subscribes) == 1:
            await ws.send(json.dumps(response(request, position={"epoch": EPOCH, "offset": 10})))
            for offset in (11, 12):
                await ws.send(json.dumps(event("system_alerts", offset)))
            await ws.close(4008, "client too slow")
        else:
            await ws.send(
                json.dumps(
                    response(request, recovered=True, position={"epoch": EPOCH, "offset": 14})
                )
            )
            for offset in (12, 13, 14):
                await ws.send(json.dumps(event("system_alerts", offset)))
            await ws.wait_closed()

    async with serve(server_side, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        args = ws_watch.parse_args(
            [
                *("--url", f"http://127.0.0.1:{port}", "--token", "t"),
                *("--channel", "system_alerts", "--count", "6"),
            ]
        )
        tokens = ws_watch.Tokens(args.url, None, None, "t", 5.0)
        assert await asyncio.wait_for(ws_watch.watch(args, tokens), 10) == 0

    assert [m.get("since") for m in subscribes] == [None, {"epoch": EPOCH, "offset": 12}]
    out, err = capsys.readouterr()
    printed = [json.loads(line) for line in out.splitlines()]
    assert [m.get("offset", m["type"]) for m in printed] == [
        "response",
        11,
        12,
        "response",
        13,
        14,
    ]
    assert "server closed the connection: 4008 client too slow" in err
    assert "system_alerts: stream recovered from offset 12" in err
