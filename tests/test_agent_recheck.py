"""The periodic re-check of a process's agents: revoked tokens closed, waiting work sent."""

from __future__ import annotations

import pytest

from hosts import maintenance, services
from hosts.models import CommandExecution, Host
from sysmanage.dbthreads import database_sync_to_async
from tests.test_agent_consumer import agent_socket, hello, next_of
from tests.wsutil import expect_close

pytestmark = pytest.mark.django_db(transaction=True)


async def test_the_recheck_closes_revoked_agents_and_hands_waiting_work_to_the_others():
    enrolled = [
        await database_sync_to_async(services.host_register)(hostname=name)
        for name in ("revoked", "busy", "idle")
    ]
    (revoked, revoked_token), (busy, busy_token), (_, idle_token) = enrolled
    sockets = [await agent_socket(token) for token in (revoked_token, busy_token, idle_token)]
    for comm in sockets:
        await hello(comm)
    # Changes made where no hub hears of them (another process without a shared layer).
    await database_sync_to_async(Host.objects.filter(id=revoked.id).update)(token_hash="")
    execution = await database_sync_to_async(CommandExecution.objects.create)(
        host=busy, command="true", timeout=5
    )

    await database_sync_to_async(maintenance.agent_recheck)()

    error = await next_of(sockets[0], "error")
    assert error["data"]["code"] == "AUTH_FAILED"
    assert await expect_close(sockets[0]) == 4001
    order = await next_of(sockets[1], "run_command")
    assert order["data"]["execution_id"] == str(execution.id)
    assert await sockets[2].receive_nothing(timeout=0.5)
    for comm in sockets[1:]:
        await comm.disconnect()
