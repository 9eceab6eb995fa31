"""Requests handled wholly in the database threads (``sysmanage.dbthreads``): the token
refresh through the server's ASGI application, as Daphne hands it over."""

from __future__ import annotations

import json
import threading

import pytest
from channels.testing import HttpCommunicator

from sysmanage.asgi import application
from sysmanage.credentials import FingerprintedRefreshToken
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.metrics import HTTP_DURATION

pytestmark = pytest.mark.django_db(transaction=True)


async def post(path: str, body: dict) -> dict:
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"host", b"localhost"),
    ]
    comm = HttpCommunicator(application, "POST", path, body=data, headers=headers)
    return await comm.get_response(timeout=10)


def refreshes_observed() -> float:
    return sum(
        sample.value
        for metric in HTTP_DURATION.collect()
        for sample in metric.samples
        if sample.name.endswith("_count") and sample.labels.get("view") == "token_refresh"
    )


async def test_a_refresh_is_answered_from_a_database_thread_without_a_thread_of_its_own(
    make_user, monkeypatch
):
    """Django's handler starts (and joins) a thread per request for its signals and
    middleware; in a storm of refreshes that cost a tenth of the process's CPU."""
    user = await database_sync_to_async(make_user)("alice")
    token = str(await database_sync_to_async(FingerprintedRefreshToken.for_user)(user))
    warm = await post("/api/token/refresh/", {"refresh": "no"})  # the threads start
    assert warm["status"] == 401, warm
    started: list[str] = []
    start = threading.Thread.start

    def recorded(thread: threading.Thread) -> None:
        started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", recorded)
    counted = refreshes_observed()
    response = await post("/api/token/refresh/", {"refresh": token})
    assert response["status"] == 200, response
    assert set(json.loads(response["body"])) == {"access", "refresh"}
    assert [name for name in started if not name.startswith("database")] == []
    # the middleware ran: the security headers, and the duration under the view's name
    headers = {name.lower(): value for name, value in response["headers"]}
    assert headers[b"x-frame-options"] == b"DENY"
    assert b"content-security-policy" in headers
    assert refreshes_observed() == counted + 1


async def test_other_requests_are_handled_by_django_as_before():
    response = await post("/api/token/", {"username": "nobody", "password": "x"})
    assert response["status"] == 401
