"""Reads of many sockets made as one database call (``sysmanage.callbatch``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Collection

import pytest

from sysmanage import dbthreads
from sysmanage.callbatch import ReadBatch

pytestmark = pytest.mark.django_db(transaction=True)


class Reads:
    """A read that notes the keys of each call; the first call waits to be released."""

    def __init__(self) -> None:
        self.calls: list[set[str]] = []
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, keys: Collection[str]) -> dict[str, str]:
        self.calls.append(set(keys))
        self.started.set()
        self.release.wait(5)
        return {key: key.upper() for key in keys if key != "unknown"}


async def started(reads: Reads) -> None:
    await asyncio.get_running_loop().run_in_executor(None, reads.started.wait, 5)


async def test_the_sockets_that_ask_during_a_read_are_read_together_next():
    reads = Reads()
    batch: ReadBatch[str, str] = ReadBatch(reads, most=3)
    alone = asyncio.ensure_future(batch.get("a", lambda: True))
    await started(reads)  # one socket alone is read at once
    crowd = [asyncio.ensure_future(batch.get(key, lambda: True)) for key in "bcde"]
    unknown = asyncio.ensure_future(batch.get("unknown", lambda: True))
    await asyncio.sleep(0.05)
    assert reads.calls == [{"a"}]
    reads.release.set()
    assert await asyncio.gather(alone, *crowd, unknown) == ["A", "B", "C", "D", "E", None]
    assert reads.calls == [{"a"}, {"b", "c", "d"}, {"e", "unknown"}]  # at most 3 a read


async def test_a_socket_whose_peer_has_gone_is_not_read_for():
    reads = Reads()
    batch: ReadBatch[str, str] = ReadBatch(reads, most=10)
    first = asyncio.ensure_future(batch.get("a", lambda: True))
    await started(reads)
    skipped = dbthreads.skipped()
    gone = asyncio.ensure_future(batch.get("b", lambda: False))
    there = asyncio.ensure_future(batch.get("c", lambda: True))
    await asyncio.sleep(0.05)
    reads.release.set()
    assert await first == "A"
    with pytest.raises(dbthreads.PeerGone):
        await gone
    assert await there == "C"
    assert reads.calls == [{"a"}, {"c"}]
    assert dbthreads.skipped() == skipped + 1


async def test_a_failed_read_fails_every_socket_of_it():
    def broken(keys: Collection[str]) -> dict[str, str]:
        raise RuntimeError("no database")

    batch: ReadBatch[str, str] = ReadBatch(broken, most=10)
    answers = await asyncio.gather(
        *(batch.get(key, lambda: True) for key in "abc"), return_exceptions=True
    )
    assert [type(a) for a in answers] == [RuntimeError] * 3
