"""Pending updates and reboots: both agents' reports in one shape, their storage, the
fleet figures, the host page and the REST endpoints."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from alerts import evaluation
from alerts import selectors as alert_selectors
from alerts.models import Alert, AlertRule, AlertStatus, RuleMetric
from hosts import patching, selectors, services
from hosts.models import HostPatchStatus
from sysmanage.protocol import ProtocolError
from tests.conftest import PASSWORD, grant

pytestmark = pytest.mark.django_db


@pytest.fixture
def host():
    return services.host_create(hostname="web-01")


def test_sysmanage_report_becomes_the_common_shape():
    report = patching.updates_from_sysmanage(
        {
            "available_updates": [
                {"package_name": "curl", "current_version": "1", "available_version": "2"},
                {"package_name": "openssl", "available_version": "3", "is_security_update": True},
                {"package_name": ""},
                "junk",
            ],
            "total_updates": 99,
        }
    )
    assert (report.count, report.security_count) == (2, 1)
    assert report.updates == [
        {"name": "openssl", "current": "", "available": "3", "security": True},
        {"name": "curl", "current": "1", "available": "2", "security": False},
    ]
    totals = patching.updates_from_sysmanage({"total_updates": 7, "security_updates": 2})
    assert (totals.count, totals.security_count, totals.updates) == (7, 2, [])
    assert patching.reboot_from_sysmanage({"reboot_required": "true"}) is True
    assert patching.reboot_from_sysmanage({"reboot_required": False}) is False
    assert patching.reboot_from_sysmanage({"anything": 1}) is None


def test_native_report_is_checked():
    data = {
        "updates": [{"name": "tzdata", "current": "a", "available": "b", "security": False}],
        "update_count": 1,
        "security_count": 0,
        "reboot_required": True,
    }
    report = patching.updates_from_native(data, None)
    assert report is not None
    assert (report.count, report.security_count, len(report.updates)) == (1, 0, 1)
    assert patching.reboot_from_native(data, None) is True
    assert patching.updates_from_native({"updates": None, "reboot_required": None}, 1) is None
    assert patching.reboot_from_native({}, 1) is None
    for bad in (
        {"updates": "x"},
        {"updates": [{"current": "1"}]},
        {"updates": [], "update_count": -1},
        {"updates": [], "security_count": True},
    ):
        with pytest.raises(ProtocolError):
            patching.updates_from_native(bad, 1)
    with pytest.raises(ProtocolError):
        patching.reboot_from_native({"reboot_required": "yes"}, 1)


def test_reboot_since_keeps_the_first_report_of_a_run(host):
    services.host_reboot_save(host_id=host.id, required=True)
    first = HostPatchStatus.objects.get(host=host).reboot_required_since
    assert first is not None
    services.host_reboot_save(host_id=host.id, required=True)
    assert HostPatchStatus.objects.get(host=host).reboot_required_since == first
    services.host_reboot_save(host_id=host.id, required=False)
    row = HostPatchStatus.objects.get(host=host)
    assert (row.reboot_required, row.reboot_required_since) == (False, None)


def test_fleet_figures_count_security_updates_and_reboots(host):
    other = services.host_create(hostname="web-02")
    services.host_create(hostname="web-03")  # never reported: counted in neither
    secure = patching.PatchUpdates(
        [{"name": "openssl", "current": "1", "available": "2", "security": True}], 1, 1
    )
    services.host_patch_updates_save(host_id=host.id, report=secure)
    services.host_patch_updates_save(host_id=other.id, report=patching.PatchUpdates([], 4, 0))
    services.host_reboot_save(host_id=other.id, required=True)
    figures = alert_selectors.fleet_stats()
    assert (figures["hosts_with_security_updates"], figures["hosts_needing_reboot"]) == (1, 1)


def test_a_check_asked_for_is_taken_once(host):
    assert not services.host_updates_check_take(host_id=host.id)
    services.host_updates_check_request(host=host, actor=None)
    assert services.host_updates_check_take(host_id=host.id)
    assert not services.host_updates_check_take(host_id=host.id)
    # asked again later: due again
    HostPatchStatus.objects.filter(host=host).update(
        check_sent_at=timezone.now() - timedelta(minutes=1)
    )
    services.host_updates_check_request(host=host, actor=None)
    assert services.host_updates_check_take(host_id=host.id)


def test_host_page_shows_updates_and_reboot(client, make_user, host):
    make_user("operator")
    assert client.login(username="operator", password=PASSWORD)
    content = client.get(f"/hosts/{host.id}/").content.decode()
    assert "Updates and reboot" in content
    assert 'id="check-updates"' not in content  # may not run commands
    services.host_patch_updates_save(
        host_id=host.id,
        report=patching.PatchUpdates(
            [{"name": "openssl", "current": "3.0.1", "available": "3.0.2", "security": True}],
            1,
            1,
        ),
    )
    services.host_reboot_save(host_id=host.id, required=True)
    content = client.get(f"/hosts/{host.id}/").content.decode()
    assert "openssl" in content
    assert "3.0.2" in content
    assert "Reboot required" in content


def test_check_updates_needs_the_right_to_run_commands(client, make_user, host):
    user = make_user("operator")
    assert client.login(username="operator", password=PASSWORD)
    url = f"/api/hosts/{host.id}/check-updates/"
    assert client.post(url).status_code == 403
    assert not HostPatchStatus.objects.filter(host=host).exists()
    grant(user, "sysmanage.run_command")
    assert client.post(url).status_code == 202
    assert HostPatchStatus.objects.get(host=host).check_requested_at is not None
    answer = client.get(f"/api/hosts/{host.id}/updates/").json()
    assert answer["host_id"] == str(host.id)
    assert answer["update_count"] is None
    assert selectors.host_patch_view(host.id)["reboot_required"] is None


def _reboot_waiting_since(host, hours: float) -> None:
    services.host_reboot_save(host_id=host.id, required=True)
    HostPatchStatus.objects.filter(host=host).update(
        reboot_required_since=timezone.now() - timedelta(hours=hours)
    )


def test_a_host_needing_a_reboot_too_long_gets_an_alert_resolved_after_the_reboot(host):
    rule = AlertRule.objects.get(metric=RuleMetric.REBOOT)  # the default rule: 24 h
    rule.critical_threshold = 72.0
    rule.save()
    fresh = services.host_create(hostname="web-02")
    _reboot_waiting_since(fresh, 1)
    _reboot_waiting_since(host, 30)
    evaluation.check_reboots()
    (alert,) = Alert.objects.filter(rule=rule, status=AlertStatus.OPEN)
    assert (alert.host_id, alert.severity, alert.category) == (host.id, "warning", "patching")
    assert alert.title == "Reboot pending: web-01"
    evaluation.check_reboots()  # nothing changed: still one alert
    assert Alert.objects.filter(rule=rule).count() == 1
    _reboot_waiting_since(host, 80)
    evaluation.check_reboots()
    alert.refresh_from_db()
    assert (alert.severity, alert.status) == ("critical", AlertStatus.OPEN)
    services.host_reboot_save(host_id=host.id, required=False)
    evaluation.check_reboots()
    alert.refresh_from_db()
    assert alert.status == AlertStatus.RESOLVED
    assert not Alert.objects.filter(rule=rule, status__in=Alert.ACTIVE_STATUSES).exists()


def test_a_disabled_reboot_rule_raises_nothing(host):
    AlertRule.objects.filter(metric=RuleMetric.REBOOT).update(enabled=False)
    _reboot_waiting_since(host, 1000)
    evaluation.check_reboots()
    assert not Alert.objects.exists()
