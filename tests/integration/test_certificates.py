"""
Certificates, end to end: the fake SysManage agent reports the certificate files it
found (each twice, as the real agent does) when it connects; a real server stores them
once each, lists them over REST and on the host page, and raises an alert for each
server certificate about to expire (not for the CA certificates of the trust store).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.compat.fake_sysmanage_agent import FakeSysManageAgent
from tests.integration import harness
from tests.integration.smagent import WAIT, admin, online_agent
from tests.integration.test_agent_e2e import AGENT_SETTINGS
from tests.integration.test_patching import host_page

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deployment(launch_sqlite: Any) -> Iterator[harness.Deployment]:
    """A server that checks certificates for the alert rules every second."""
    with launch_sqlite("certificates", **AGENT_SETTINGS, ALERT_CERT_CHECK_SECONDS="1") as d:
        yield d


async def certificate_alerts(d: harness.Deployment, host_id: str, status: str) -> list[Any]:
    reply = await admin(d, "GET", f"/api/alerts/?host={host_id}&status={status}")
    assert reply.status == 200, reply
    body = reply.body["results"] if isinstance(reply.body, dict) else reply.body
    return [a for a in body if a["category"] == "certificates"]


async def wait_alerts(d: harness.Deployment, host_id: str, status: str, count: int) -> list[Any]:
    deadline = time.monotonic() + WAIT
    found: list[Any] = []
    while time.monotonic() < deadline:
        found = await certificate_alerts(d, host_id, status)
        if len(found) == count:
            return found
        await asyncio.sleep(0.2)
    raise AssertionError(f"{count} {status} certificate alert(s) expected: {found}")


async def wait_certificates(d: harness.Deployment, host_id: str, total: int) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    last = None
    while time.monotonic() < deadline:
        last = await admin(d, "GET", f"/api/hosts/{host_id}/certificates/")
        assert last.status == 200, last
        if last.body["total"] == total:
            return last.body
        await asyncio.sleep(0.1)
    raise AssertionError(f"{total} certificates expected: {last}")


async def test_certificates_reported_on_connect_are_stored_listed_and_alerted(deployment):
    d = deployment
    certs = FakeSysManageAgent.sample_certificates()
    async with online_agent(d, "certs", certificates=certs) as agent:
        assert len(agent.certificates_report()["certificates"]) == 8  # each file twice
        body = await wait_certificates(d, agent.host_id, 4)
        assert (body["expiring"], body["expired"], body["ca_count"]) == (1, 1, 1)
        assert [c["file_path"] for c in body["certificates"]] == [
            "/etc/apache2/ssl/certs/old.example.test.crt",
            "/etc/nginx/ssl/shop.example.test.crt",
            "/etc/pki/tls/certs/api.example.test.crt",
        ]
        expired, soon, fine = body["certificates"]
        assert (expired["expired"], soon["expiring"], fine["expiring"]) == (True, True, False)
        assert soon["name"] == "shop.example.test"
        assert soon["days_left"] == 4  # whole days left of 5 minus the moments since
        assert [c["file_path"] for c in body["ca_certificates"]] == [
            "/etc/ssl/certs/Example_Root_CA.pem"
        ]

        # The default rule: critical within 7 days, critical once expired; the CA and
        # the certificate good for a year raise nothing.
        alerts = await wait_alerts(d, agent.host_id, "open", 2)
        by_title = {a["title"]: a["severity"] for a in alerts}
        assert by_title == {
            f"Certificate expiring: shop.example.test on {agent.hostname}": "critical",
            f"Certificate expired: old.example.test on {agent.hostname}": "critical",
        }

        page = host_page(d, agent.host_id)
        assert 'id="certificates"' in page
        assert "/etc/nginx/ssl/shop.example.test.crt" in page
        assert "Expired" in page
        assert "1 CA certificate" in page

        # Both renewed: the next report resolves their alerts.
        agent.certificates = [
            FakeSysManageAgent.certificate(c["file_path"], 400, ca=c["is_ca"]) for c in certs
        ]
        ack = await agent.send_acked("host_certificates_update", agent.certificates_report())
        assert ack["data"]["status"] == "received"
        await wait_alerts(d, agent.host_id, "resolved", 2)
        assert await certificate_alerts(d, agent.host_id, "open") == []
        body = await wait_certificates(d, agent.host_id, 4)
        assert (body["expiring"], body["expired"]) == (0, 0)
