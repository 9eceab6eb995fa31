"""The Content-Security-Policy header on every response."""

from __future__ import annotations

import pytest

from sysmanage.middleware import content_security_policy

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "path", ["/login/", "/admin/login/", "/healthz", "/api/hosts/", "/nowhere/"]
)
def test_every_response_has_the_policy(client, path):
    policy = client.get(path)["Content-Security-Policy"]
    assert policy.startswith("default-src 'self'; script-src 'self'; style-src 'self';")
    assert "connect-src 'self' ws://testserver;" in policy
    assert "frame-ancestors 'none'" in policy
    assert "object-src 'none'" in policy


def test_secure_requests_allow_their_wss_origin(client):
    policy = client.get("/login/", secure=True)["Content-Security-Policy"]
    assert "connect-src 'self' wss://testserver;" in policy


def test_a_host_not_allowed_still_gets_a_policy(rf):
    request = rf.get("/", HTTP_HOST="evil.example")
    assert "connect-src 'self';" in content_security_policy(request)
