"""Certificates found on hosts: the SysManage agent's report read and stored, the host
page and the REST endpoint, and the "cert_expiry" alert rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone
from rest_framework.test import APIClient

from alerts import evaluation
from alerts.models import Alert, AlertRule, AlertStatus, RuleMetric
from hosts import certificates, selectors, services
from hosts.models import HostCertificate
from hosts.smagent.session import AgentSession
from tests.conftest import PASSWORD
from tests.scopeutil import Fleet, give


def entry(path: str, *, days: float | None = 365, ca: bool = False, **extra) -> dict:
    """One certificate as the agent reports it, expiring ``days`` from now."""
    not_after = None
    if days is not None:
        not_after = (timezone.now() + timedelta(days=days)).isoformat(timespec="seconds")
    return {
        "file_path": path,
        "certificate_name": None,
        "subject": f"C = FR, O = Example, CN = {path.rsplit('/', 1)[-1]}",
        "issuer": "C = FR, O = Example, CN = Example CA",
        "not_before": "2024-01-01T00:00:00+00:00",
        "not_after": not_after,
        "serial_number": "CAE91B89F155030DA3E6416DC4E3A6E1",
        "fingerprint_sha256": None,
        "is_ca": ca,
        "key_usage": "CA" if ca else "Server",
        "collected_at": "2026-12-05T10:00:00+00:00",
        **extra,
    }


def report(*entries: dict) -> certificates.CertificateReport:
    parsed = certificates.certificates_from_sysmanage({"certificates": list(entries)})
    assert parsed is not None
    return parsed


# -- reading the report ---------------------------------------------------------------------


def test_every_file_is_kept_once_and_malformed_entries_are_skipped():
    parsed = certificates.certificates_from_sysmanage(
        {
            "certificates": [
                entry("/etc/ssl/certs/b.pem", ca=True),
                entry("/etc/ssl/certs/b.pem", ca=True),
                entry("/etc/nginx/ssl/site.crt", days=5),
                entry("/etc/nginx/ssl/site.crt", days=5),
                "junk",
                None,
                {"file_path": ""},
                {"file_path": 42},
                {"file_path": "/x" * 600},  # longer than a path is kept
            ]
        }
    )
    assert parsed is not None
    assert [c.file_path for c in parsed.certificates] == [
        "/etc/nginx/ssl/site.crt",  # not a CA certificate: first
        "/etc/ssl/certs/b.pem",
    ]
    assert (parsed.distinct, parsed.skipped, parsed.dropped) == (2, 5, 0)
    site = parsed.certificates[0]
    assert site.name == "site.crt"  # the subject's CN, the agent naming none
    assert site.not_after is not None
    assert site.not_after.tzinfo is not None
    assert site.is_ca is False
    assert site.key_usage == "Server"


def test_fields_of_the_wrong_type_or_null_are_read_as_absent():
    (cert,) = report(
        {
            "file_path": "/etc/ssl/certs/odd.pem",
            "certificate_name": None,
            "subject": ["not", "text"],
            "issuer": None,
            "not_before": "yesterday",
            "not_after": None,
            "serial_number": 12,
            "fingerprint_sha256": "AB" * 32,
            "is_ca": "true",
            "key_usage": {"x": 1},
        }
    ).certificates
    assert cert.name == "odd.pem"  # no name and no subject: the file's name
    assert (cert.subject, cert.issuer, cert.serial_number, cert.key_usage) == ("", "", "", "")
    assert (cert.not_before, cert.not_after) == (None, None)
    assert cert.fingerprint_sha256 == "ab" * 32
    assert cert.is_ca is True
    assert certificates.certificates_from_sysmanage({"certificates": None}) is None
    assert certificates.certificates_from_sysmanage({}) is None
    assert report().certificates == []


def test_times_without_a_zone_are_utc_and_names_come_from_the_subject():
    (cert,) = report(
        entry(
            "/a.pem",
            not_after="2030-01-02T03:04:05",
            subject='C = US, O = "Example, Inc.", CN = "www.example.com"',
        )
    ).certificates
    assert cert.not_after == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert cert.name == "www.example.com"
    assert certificates.common_name("/C=FR/O=X/CN=Legacy") == "Legacy"
    assert certificates.common_name("CN=rfc.example,O=X") == "rfc.example"
    assert certificates.common_name("C = FR, O = X") == ""
    (named,) = report(entry("/b.pem", certificate_name="Given name")).certificates
    assert named.name == "Given name"


def test_a_report_is_bounded_keeping_the_certificates_that_are_not_ca_first():
    entries = [entry(f"/etc/ssl/certs/ca-{i:04}.pem", ca=True) for i in range(30)]
    entries.insert(17, entry("/etc/nginx/ssl/site.crt"))
    parsed = certificates.certificates_from_sysmanage({"certificates": entries}, limit=10)
    assert parsed is not None
    assert len(parsed.certificates) == 10
    assert parsed.certificates[0].file_path == "/etc/nginx/ssl/site.crt"
    assert (parsed.distinct, parsed.dropped) == (31, 21)


def test_long_paths_get_a_bounded_alert_key():
    short = "/etc/ssl/certs/a.pem"
    assert certificates.alert_key(short) == short
    long_a, long_b = "/" + "a" * 400, "/" + "a" * 399 + "b"
    assert len(certificates.alert_key(long_a)) == certificates.KEY_LIMIT
    assert certificates.alert_key(long_a) != certificates.alert_key(long_b)


# -- storing and showing -------------------------------------------------------------------


@pytest.fixture
def host(db):
    return services.host_create(hostname="web-01")


def test_a_report_replaces_the_hosts_set_and_an_unchanged_one_is_not_rewritten(host, caplog):
    first = report(entry("/a.pem"), entry("/b.pem", ca=True))
    assert services.host_certificates_save(host_id=host.id, hostname="web-01", report=first)
    ids = set(HostCertificate.objects.values_list("id", flat=True))
    assert not services.host_certificates_save(host_id=host.id, hostname="web-01", report=first)
    assert set(HostCertificate.objects.values_list("id", flat=True)) == ids
    second = report(entry("/c.pem", days=3))
    assert services.host_certificates_save(host_id=host.id, hostname="web-01", report=second)
    assert list(HostCertificate.objects.values_list("file_path", flat=True)) == ["/c.pem"]
    many = certificates.certificates_from_sysmanage(
        {"certificates": [entry(f"/{i}.pem") for i in range(5)]}, limit=3
    )
    assert many is not None
    services.host_certificates_save(host_id=host.id, hostname="web-01", report=many)
    assert HostCertificate.objects.count() == 3
    assert "3 of 5 stored" in caplog.text


def test_the_view_counts_and_orders_soonest_expiry_first(host, settings):
    settings.HOST_CERTIFICATE_WARNING_DAYS = 30
    services.host_certificates_save(
        host_id=host.id,
        hostname="web-01",
        report=report(
            entry("/fine.pem", days=300),
            entry("/soon.pem", days=5),
            entry("/gone.pem", days=-2),
            entry("/none.pem", days=None),
            entry("/ca.pem", days=10, ca=True),
        ),
    )
    view = selectors.host_certificates_view(host.id)
    assert (view["total"], view["expiring"], view["expired"], view["ca_count"]) == (5, 2, 1, 1)
    assert [c["file_path"] for c in view["certificates"]] == [
        "/gone.pem",
        "/soon.pem",
        "/fine.pem",
        "/none.pem",
    ]
    gone, soon = view["certificates"][:2]
    assert (gone["expired"], gone["expiring"], gone["days_left"]) == (True, False, -2)
    assert (soon["expired"], soon["expiring"], soon["days_left"]) == (False, True, 4)
    assert [c["file_path"] for c in view["ca_certificates"]] == ["/ca.pem"]
    assert view["reported_at"] is not None


def test_the_host_page_and_the_api_show_the_certificates_of_hosts_in_sight(make_user):
    fleet = Fleet()
    for name in ("web-01", "db-01"):
        services.host_certificates_save(
            host_id=fleet.id(name),
            hostname=name,
            report=report(entry(f"/etc/nginx/ssl/{name}.crt", days=5), entry("/ca.pem", ca=True)),
        )
    user = make_user("webops", every_host=False)
    give(fleet.web, user=user)
    client = APIClient()
    assert client.login(username="webops", password=PASSWORD)
    answer = client.get(f"/api/hosts/{fleet.id('web-01')}/certificates/")
    assert answer.status_code == 200
    body = answer.json()
    assert body["host_id"] == fleet.id("web-01")
    assert [c["file_path"] for c in body["certificates"]] == ["/etc/nginx/ssl/web-01.crt"]
    assert body["certificates"][0]["expiring"] is True
    assert body["ca_count"] == 1
    assert client.get(f"/api/hosts/{fleet.id('db-01')}/certificates/").status_code == 404
    page = client.get(f"/hosts/{fleet.id('web-01')}/").content.decode()
    assert 'id="certificates"' in page
    assert "/etc/nginx/ssl/web-01.crt" in page
    assert "Expiring" in page
    assert "1 CA certificate" in page
    assert client.get(f"/hosts/{fleet.id('db-01')}/").status_code == 404
    empty = client.get(f"/hosts/{fleet.id('web-02')}/").content.decode()
    assert "No certificates reported" in empty


@pytest.mark.django_db(transaction=True)
async def test_the_sysmanage_session_stores_a_report_and_counts_the_host_as_seen():
    from sysmanage.dbthreads import database_sync_to_async

    host = await database_sync_to_async(services.host_create)(hostname="sm-01")
    session = AgentSession("sm-01", polled=False, candidates={str(host.id)})
    session.bind(host)
    data = {
        "hostname": "sm-01",
        "certificates": [entry("/a.pem"), entry("/a.pem"), entry("/b.pem", ca=True), 7],
        "collected_at": "2026-12-05T10:00:00+00:00",
    }
    touched = []
    session.seen = lambda: touched.append(True)  # type: ignore[method-assign]
    assert await session.HANDLERS["host_certificates_update"](session, data, "m1") == []
    assert touched == [True]
    paths = await database_sync_to_async(
        lambda: sorted(HostCertificate.objects.values_list("file_path", flat=True))
    )()
    assert paths == ["/a.pem", "/b.pem"]


# -- the alert rule --------------------------------------------------------------------------


def _store(host, *entries: dict) -> None:
    services.host_certificates_save(
        host_id=host.id, hostname=host.hostname, report=report(*entries)
    )


def _active(rule) -> list[Alert]:
    return list(Alert.objects.filter(rule=rule, status__in=Alert.ACTIVE_STATUSES))


def test_the_default_rule_raises_escalates_and_resolves_on_renewal(host):
    rule = AlertRule.objects.get(metric=RuleMetric.CERT_EXPIRY)
    assert (rule.name, rule.warning_threshold, rule.critical_threshold) == (
        "Certificate expiring",
        30.0,
        7.0,
    )
    _store(
        host,
        entry("/etc/nginx/ssl/site.crt", days=20.5),
        entry("/etc/nginx/ssl/fine.crt", days=200),
        entry("/etc/ssl/certs/old-ca.pem", days=-100, ca=True),  # the trust store: no alert
    )
    evaluation.check_certificates()
    (alert,) = _active(rule)
    assert (alert.host_id, alert.rule_key, alert.severity) == (
        host.id,
        "/etc/nginx/ssl/site.crt",
        "warning",
    )
    assert alert.category == "certificates"
    assert alert.title == "Certificate expiring: site.crt on web-01"
    # whole days, as the host page and the API count them
    assert alert.message.startswith("/etc/nginx/ssl/site.crt on web-01 expires in 20 days")
    evaluation.check_certificates()  # nothing changed: still one alert
    assert Alert.objects.filter(rule=rule).count() == 1
    _store(host, entry("/etc/nginx/ssl/site.crt", days=3))
    evaluation.check_certificates()
    alert.refresh_from_db()
    assert (alert.severity, alert.status) == ("critical", AlertStatus.OPEN)
    _store(host, entry("/etc/nginx/ssl/site.crt", days=365))  # renewed
    evaluation.check_certificates()
    alert.refresh_from_db()
    assert alert.status == AlertStatus.RESOLVED
    assert not _active(rule)


def test_each_certificate_has_its_own_alert_an_expired_one_critical_removed_ones_resolved(host):
    rule = AlertRule.objects.get(metric=RuleMetric.CERT_EXPIRY)
    other = services.host_create(hostname="web-02")
    _store(host, entry("/gone.pem", days=-1), entry("/soon.pem", days=5))
    _store(other, entry("/soon.pem", days=25))
    evaluation.check_certificates()
    found = {(a.host_id, a.rule_key): a for a in _active(rule)}
    assert {k: a.severity for k, a in found.items()} == {
        (host.id, "/gone.pem"): "critical",
        (host.id, "/soon.pem"): "critical",
        (other.id, "/soon.pem"): "warning",
    }
    assert found[(host.id, "/gone.pem")].title == "Certificate expired: gone.pem on web-01"
    _store(host, entry("/soon.pem", days=5))  # the expired file was removed
    evaluation.check_certificates()
    assert {(a.host_id, a.rule_key) for a in _active(rule)} == {
        (host.id, "/soon.pem"),
        (other.id, "/soon.pem"),
    }


def test_a_disabled_certificate_rule_raises_nothing(host):
    AlertRule.objects.filter(metric=RuleMetric.CERT_EXPIRY).update(enabled=False)
    _store(host, entry("/gone.pem", days=-1))
    evaluation.check_certificates()
    assert not Alert.objects.exists()


def test_rule_thresholds_follow_the_direction_of_the_metric(db):
    lower = AlertRule(name="certs", metric=RuleMetric.CERT_EXPIRY, category="certificates")
    lower.warning_threshold, lower.critical_threshold = 30, 7
    lower.full_clean()
    lower.warning_threshold, lower.critical_threshold = 7, 30
    with pytest.raises(ValidationError):
        lower.full_clean()
    higher = AlertRule(name="disk", metric=RuleMetric.DISK, category="disk")
    higher.warning_threshold, higher.critical_threshold = 80, 95
    higher.full_clean()
    higher.warning_threshold, higher.critical_threshold = 95, 80
    with pytest.raises(ValidationError):
        higher.full_clean()


def test_the_rule_admin_accepts_lower_is_worse_thresholds(client, make_user):
    make_user("root", superuser=True)
    assert client.login(username="root", password=PASSWORD)
    form = {
        "name": "Certificates soon",
        "metric": "cert_expiry",
        "category": "certificates",
        "enabled": "on",
        "warning_threshold": "14",
        "critical_threshold": "3",
        "sustained_samples": "1",
        "clear_margin": "0",
    }
    reply = client.post("/admin/alerts/alertrule/add/", form)
    assert reply.status_code == 302, reply.content.decode()[:2000]
    assert AlertRule.objects.get(name="Certificates soon").critical_threshold == 3
    reply = client.post(
        "/admin/alerts/alertrule/add/", {**form, "name": "Backwards", "critical_threshold": "20"}
    )
    assert reply.status_code == 200
    assert not AlertRule.objects.filter(name="Backwards").exists()
