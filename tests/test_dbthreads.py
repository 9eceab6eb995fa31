"""The database threads' queue: calls that complete what a peer waits for go first."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sysmanage import dbthreads

pytestmark = pytest.mark.django_db(transaction=True)


async def test_calls_submitted_ahead_go_before_those_queued_earlier():
    assert dbthreads.thread_count() == 1  # the tests run on SQLite: one thread
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def hold() -> None:
        started.set()
        release.wait(5)

    def note(name: str) -> None:
        ran.append(name)

    held = asyncio.ensure_future(dbthreads.database_sync_to_async(hold)())
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
    calls = [
        asyncio.ensure_future(dbthreads.database_sync_to_async(note)("first queued")),
        asyncio.ensure_future(dbthreads.database_sync_to_async(note)("second queued")),
    ]
    await asyncio.sleep(0)  # both are queued
    calls.append(
        asyncio.ensure_future(
            dbthreads.database_sync_to_async_while(lambda: True, note, ahead=True)("ahead")
        )
    )
    await asyncio.sleep(0)
    assert dbthreads.queued() == 3
    release.set()
    await asyncio.gather(held, *calls)
    assert ran == ["ahead", "first queued", "second queued"]


async def test_a_call_of_a_socket_whose_peer_has_gone_is_not_made():
    ran: list[str] = []
    skipped = dbthreads.skipped()
    call = dbthreads.database_sync_to_async_while(lambda: False, ran.append)
    try:
        await call("never")
    except dbthreads.PeerGone:
        pass
    else:
        raise AssertionError("the call was made")
    assert ran == []
    assert dbthreads.skipped() == skipped + 1
