"""What the scoped-access tests share: a small fleet in two host groups, grants, and
reading a communicator until it goes quiet."""

from __future__ import annotations

from hosts import services as host_services
from hosts.models import HostGroup, HostGroupGrant


class Fleet:
    """web-01 and web-02 in "web", db-01 in "db", lone-01 in no group."""

    def __init__(self) -> None:
        self.hosts = {
            name: host_services.host_create(hostname=name)
            for name in ("web-01", "web-02", "db-01", "lone-01")
        }
        self.web = host_services.host_group_create(
            name="web", host_ids=[self.id("web-01"), self.id("web-02")]
        )
        self.db = host_services.host_group_create(name="db", host_ids=[self.id("db-01")])

    def id(self, name: str) -> str:
        return str(self.hosts[name].pk)


def give(group: HostGroup, *, user=None, user_group=None, **flags) -> HostGroupGrant:
    """Grant ``group`` to a user or to a Django group, with ``flags``."""
    return host_services.host_group_grant_save(
        HostGroupGrant(host_group=group, user=user, group=user_group, **flags)
    )


async def quiet(comm, seconds: float = 0.3) -> list[dict]:
    """What arrives until nothing has for ``seconds`` (without ending the application,
    as a timed-out receive would)."""
    got = []
    while not await comm.receive_nothing(timeout=seconds):
        got.append(await comm.receive_json_from(timeout=1))
    return got
