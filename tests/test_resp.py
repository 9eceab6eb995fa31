"""The lean Redis connection that reads the channel streams: its RESP2 parsing, whole and
as the bytes arrive, and a real round trip."""

from __future__ import annotations

import pytest
import redis

from sysmanage import resp

REDIS_URL = "redis://127.0.0.1:6379/0"


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def entry(offset: int, fields: list[bytes]) -> bytes:
    return (
        b"*2\r\n"
        + bulk(b"%d-0" % offset)
        + b"*%d\r\n" % len(fields)
        + b"".join(bulk(f) for f in fields)
    )


def stored(offset: int, payload: bytes, host: bytes = b"h1", epoch: bytes = b"E1") -> bytes:
    """An entry as the publish script writes it (fields e, t, h, p)."""
    return entry(offset, [b"e", epoch, b"t", b"1700000000000", b"h", host, b"p", payload])


def xread_reply(streams: list[tuple[bytes, list[bytes]]]) -> bytes:
    parts = [b"*%d\r\n" % len(streams)]
    for key, entries in streams:
        parts.append(b"*2\r\n" + bulk(key) + b"*%d\r\n" % len(entries) + b"".join(entries))
    return b"".join(parts)


def test_parse_reads_every_kind_of_reply():
    assert resp.parse(b"+OK\r\n") == (b"OK", 5)
    assert resp.parse(b":42\r\n") == (42, 5)
    assert resp.parse(b"$-1\r\n") == (None, 5)
    assert resp.parse(b"*-1\r\n") == (None, 5)
    assert resp.parse(b"*2\r\n$3\r\nab\n\r\n$0\r\n\r\n")[0] == [b"ab\n", b""]
    with pytest.raises(resp.ReplyError, match="WRONGTYPE"):
        resp.parse(b"-WRONGTYPE nope\r\n")
    with pytest.raises(resp.Incomplete):
        resp.parse(b"*2\r\n$3\r\nabc\r\n$2\r\nx")


def test_a_streams_reply_is_the_same_however_its_bytes_arrive():
    payload = b'{"event": "e", "data": {"host_id": "h1", "text": "a\\r\\nb"}, "timestamp": "t"}'
    odd = entry(9, [b"e", b"E1", b"t", b"1", b"p", payload])  # no host: an older entry
    weird = stored(10, b"x\r\ny", host=b"h\r\n2")  # CR LF inside values: parsed by length
    raw = xread_reply(
        [(b"k1", [stored(7, payload), stored(8, b"{}", host=b""), odd, weird]), (b"k2", [])]
    )
    expected = [
        (
            b"k1",
            [
                (7, [b"e", b"E1", b"h", b"h1", b"p", payload]),
                (8, [b"e", b"E1", b"h", b"", b"p", b"{}"]),
                (9, [b"e", b"E1", b"t", b"1", b"p", payload]),
                (10, [b"e", b"E1", b"t", b"1700000000000", b"h", b"h\r\n2", b"p", b"x\r\ny"]),
            ],
        ),
        (b"k2", []),
    ]
    whole = resp.StreamsReply()
    assert whole.feed(raw)
    assert whole.value == expected
    for size in (1, 2, 3, 7, 64):
        reply = resp.StreamsReply()
        chunks = [raw[i : i + size] for i in range(0, len(raw), size)]
        assert [reply.feed(c) for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert reply.value == expected


def test_a_streams_reply_that_timed_out_is_none_and_an_error_raises():
    reply = resp.StreamsReply()
    assert reply.feed(b"*-1\r\n")
    assert reply.value is None
    with pytest.raises(resp.ReplyError):
        resp.StreamsReply().feed(b"-ERR wrong\r\n")


def test_connection_options_follow_the_url():
    assert resp.connection_options("redis://:pw@10.0.0.1:6380/3") == {
        "password": "pw",
        "host": "10.0.0.1",
        "port": 6380,
        "db": 3,
    }
    assert resp.connection_options("unix:///run/redis.sock?db=2") == {
        "path": "/run/redis.sock",
        "db": 2,
    }
    assert "ssl" in resp.connection_options("rediss://example.invalid:6379/0")


@pytest.fixture
def live_redis():
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    yield client
    client.close()


async def test_a_connection_talks_to_redis_and_reconnects_after_a_failure(live_redis):
    conn = resp.Connection("redis://127.0.0.1:6379/1")
    try:
        assert await conn.execute([b"PING"]) == b"PONG"
        # the URL's database was selected
        assert await conn.execute([b"CLIENT", b"INFO"]) is not None
        info = (await conn.execute([b"CLIENT", b"INFO"])).decode()
        assert " db=1 " in info
        with pytest.raises(resp.ReplyError):
            await conn.execute([b"NOSUCHCOMMAND"])
        assert await conn.execute([b"PING"]) == b"PONG"  # a fresh connection
        # a connection that died meanwhile (Redis restarted) is replaced, the command kept
        first = await conn.execute([b"CLIENT", b"ID"])
        live_redis.execute_command("CLIENT", "KILL", "ID", first)
        assert await conn.execute([b"PING"]) == b"PONG"
        assert await conn.execute([b"CLIENT", b"ID"]) != first
        reply = await conn.execute(
            [b"XREAD", b"BLOCK", b"10", b"STREAMS", b"no-such-stream", b"0-0"],
            0.01,
            resp.StreamsReply,
        )
        assert reply is None
    finally:
        await conn.close()
