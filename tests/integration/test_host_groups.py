"""
Host groups end to end: hosts enrolled into groups on the command line (``register_host
--group``) and with a registration key that names groups (``create_registration_key
--group``), as a real server then shows them over REST, with the real agent program and
the fake SysManage agent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.compat.fake_sysmanage_agent import FakeSysManageAgent
from tests.integration import harness
from tests.integration.client import api, browser_login, http_request
from tests.integration.smagent import go_online, hostname, results, wait_host_status
from tests.integration.test_agent_e2e import AGENT_SETTINGS, AgentProcess, wait_status

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deployment(launch_sqlite: Any) -> Iterator[harness.Deployment]:
    """One server on SQLite with short agent intervals."""
    with launch_sqlite("host-groups", **AGENT_SETTINGS) as deployment:
        yield deployment


def manage(d: harness.Deployment, *args: str) -> tuple[dict[str, Any], str]:
    """``manage.py ARGS``: the JSON of its last line, and what it said on stderr."""
    result = harness.run_python(["manage.py", *args], d.env, what=args[0])
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


async def rest(d: harness.Deployment, method: str, path: str, user: str = "admin", **kw: Any):
    return await api(method, d.server.base_url, path, token=d.token(user), **kw)


def names(host: dict[str, Any]) -> set[str]:
    return {group["name"] for group in host["groups"]}


async def test_register_host_with_groups_and_its_agent_online(deployment, tmp_path: Path):
    d = deployment
    first, said = manage(d, "register_host", "grp-web-1", "--group", "web", "--group", "Prod")
    assert first["groups"] == ["Prod", "web"]
    assert "Created host group web." in said
    assert "Created host group Prod." in said
    # Names match without regard to case: the same groups, none created.
    second, said = manage(d, "register_host", "grp-web-2", "--group", "WEB")
    assert second["groups"] == ["web"]
    assert "Created host group" not in said

    agent = AgentProcess(
        d.server.base_url, first["token"], tmp_path / "state", tmp_path / "agent.log"
    ).start()
    try:
        await wait_status(d, first["host_id"], "online")
        shown = await rest(d, "GET", f"/api/hosts/{first['host_id']}/", user="viewer")
        assert shown.status == 200, shown
        assert shown.body["status"] == "online"
        assert names(shown.body) == {"web", "Prod"}
    finally:
        agent.stop()

    in_web = await rest(d, "GET", "/api/hosts/?group=Web", user="viewer")
    assert {h["hostname"] for h in results(in_web.body)} == {"grp-web-1", "grp-web-2"}
    groups = await rest(d, "GET", "/api/host-groups/", user="viewer")
    counts = {g["name"]: g["host_count"] for g in results(groups.body)}
    assert counts["web"] == 2
    assert counts["Prod"] == 1
    # Seeing groups is not changing them.
    refused = await rest(d, "POST", "/api/host-groups/", user="viewer", json_body={"name": "x"})
    assert refused.status == 403, refused
    assert "hosts.change_hostgroup" in refused.body["detail"]

    # The page shows the groups and filters by them, as the REST API.
    page = await asyncio.to_thread(page_as_admin, d, "/hosts/?group=prod")
    assert "grp-web-1" in page
    assert "grp-web-2" not in page
    assert 'href="/hosts/?group=Prod"' in page


def page_as_admin(d: harness.Deployment, path: str) -> str:
    """A dashboard page as the seeded administrator sees it (logged in as a browser)."""
    session = browser_login(d.server.base_url, "admin", d.password)
    page = http_request(
        "GET", d.server.base_url + path, opener=session.opener, headers={"Accept": "text/html"}
    )
    assert page.status == 200, page
    return str(page.body)


async def test_sysmanage_agent_with_a_grouped_key_joins_the_groups(deployment):
    d = deployment
    key, said = manage(d, "create_registration_key", "rollout", "--group", "edge", "--group", "web")
    assert key["groups"] == ["edge", "web"]
    assert "Created host group edge." in said

    agent = FakeSysManageAgent(d.server.base_url, hostname("grp"), registration_key=key["key"])
    status, body = await asyncio.to_thread(agent.register)
    assert status == 201, body
    assert body["approved"] is True, body
    try:
        await go_online(d, agent)
        shown = await wait_host_status(d, agent.host_id, "online")
        assert names(shown) == {"edge", "web"}
    finally:
        await agent.close()

    listed = await rest(d, "GET", "/api/registration-keys/")
    mine = [k for k in results(listed.body) if k["id"] == key["id"]]
    assert mine
    assert sorted(mine[0]["groups"]) == ["edge", "web"]
    in_edge = await rest(d, "GET", "/api/hosts/?group=edge")
    assert [h["hostname"] for h in results(in_edge.body)] == [agent.hostname]
