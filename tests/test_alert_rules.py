"""Alert rules: evaluation, dedupe, sustained breaches, auto-resolve with a margin."""

from __future__ import annotations

import pytest
from django.utils import timezone

from alerts import evaluation
from alerts.models import Alert, AlertRule
from alerts.rules import RuleEngine, RuleSpec
from hosts import services as host_services
from sysmanage.dbthreads import database_sync_to_async
from tests.wsutil import open_socket, request, subscribe_with_status

DISK = RuleSpec(
    id="d",
    name="Disk",
    metric="disk_usage",
    category="disk_space",
    warning=85,
    critical=95,
    sustained=1,
    margin=3,
)
CPU = RuleSpec(
    id="c",
    name="CPU",
    metric="cpu_usage",
    category="cpu",
    warning=90,
    critical=98,
    sustained=3,
    margin=10,
)
LOAD = RuleSpec(
    id="l",
    name="Load",
    metric="load_per_cpu",
    category="load",
    warning=2,
    critical=4,
    sustained=1,
    margin=0.5,
)


def engine(*rules):
    e = RuleEngine()
    e.set_rules(list(rules))
    return e


def severities(verdicts):
    return [(v.key, v.severity) for v in verdicts]


def test_first_clear_report_resolves_stale_alerts_once():
    e = engine(DISK)
    assert severities(e.observe("h", "web", {"disk_usage": {"/": 10}}, 2)) == [("/", None)]
    assert e.observe("h", "web", {"disk_usage": {"/": 11}}, 2) == []


def test_disk_rule_per_mount_raises_escalates_and_dedupes():
    e = engine(DISK)
    first = e.observe("h", "web", {"disk_usage": {"/": 50, "/var": 86}}, 2)
    assert severities(first) == [("/", None), ("/var", "warning")]
    assert e.observe("h", "web", {"disk_usage": {"/": 50, "/var": 88}}, 2) == []  # no flood
    assert severities(e.observe("h", "web", {"disk_usage": {"/var": 96}}, 2)) == [
        ("/var", "critical")
    ]


def test_margin_prevents_flapping():
    e = engine(DISK)
    e.observe("h", "web", {"disk_usage": {"/": 86}}, 2)
    for value in (84.9, 85.5, 83.0, 84.0):  # hovering around 85: above 85 - 3
        assert e.observe("h", "web", {"disk_usage": {"/": value}}, 2) == [], value
    assert severities(e.observe("h", "web", {"disk_usage": {"/": 81.9}}, 2)) == [("/", None)]


def test_critical_lowers_to_warning_only_below_the_margin():
    e = engine(DISK)
    e.observe("h", "web", {"disk_usage": {"/": 97}}, 2)
    assert e.observe("h", "web", {"disk_usage": {"/": 93}}, 2) == []
    assert severities(e.observe("h", "web", {"disk_usage": {"/": 91}}, 2)) == [("/", "warning")]


def test_cpu_must_be_sustained():
    e = engine(CPU)
    e.observe("h", "web", {"cpu_usage": 10}, 2)
    assert e.observe("h", "web", {"cpu_usage": 99}, 2) == []
    assert e.observe("h", "web", {"cpu_usage": 99}, 2) == []
    assert severities(e.observe("h", "web", {"cpu_usage": 99}, 2)) == [("", "critical")]
    e2 = engine(CPU)
    e2.observe("h", "web", {"cpu_usage": 10}, 2)
    for value in (95, 50, 95, 95):  # the dip breaks the streak
        assert e2.observe("h", "web", {"cpu_usage": value}, 2) == []


def test_after_a_restart_an_undecided_value_keeps_the_stored_alert():
    e = engine(CPU)
    assert e.observe("h", "web", {"cpu_usage": 95}, 2) == []  # streak 1 of 3: no verdict


def test_load_is_relative_to_cpu_count():
    e = engine(LOAD)
    assert severities(e.observe("h", "web", {"load_average": [9.0, 1, 1]}, 4)) == [("", "warning")]
    assert e.observe("h2", "db", {"load_average": [9.0, 1, 1]}, None) == []


def test_removed_rules_forget_their_state():
    e = engine(DISK, CPU)
    e.observe("h", "web", {"disk_usage": {"/": 90}, "cpu_usage": 1}, 2)
    e.set_rules([CPU])
    assert e.observe("h", "web", {"disk_usage": {"/": 90}, "cpu_usage": 1}, 2) == []


@pytest.mark.django_db
def test_default_rules_exist():
    names = set(AlertRule.objects.values_list("name", flat=True))
    assert {"Disk usage", "Memory usage", "CPU usage", "Load per CPU", "Host offline"} <= names
    disk = AlertRule.objects.get(name="Disk usage")
    assert (disk.warning_threshold, disk.critical_threshold) == (85.0, 95.0)


@pytest.mark.django_db
def test_metrics_raise_one_alert_and_resolve_it(published, django_capture_on_commit_callbacks):
    evaluation.ENGINE.__init__()
    host = host_services.host_create(hostname="web-01", cpu_count=2)
    report = lambda pct: published.run(  # noqa: E731
        host_services.host_metrics_publish,
        host_id=str(host.id),
        hostname=host.hostname,
        metrics={"disk_usage": {"/var": pct}},
        cpu_count=host.cpu_count,
        at=timezone.now(),
    )
    report(86)
    report(87)
    alert = Alert.objects.get(host=host, rule_key="/var")
    assert (alert.severity, alert.status, alert.category) == ("warning", "open", "disk_space")
    assert alert.message == "Disk usage on /var is 86.0% (warning at 85%)"
    report(96)
    assert Alert.objects.filter(host=host).count() == 1
    assert Alert.objects.get(id=alert.id).severity == "critical"
    report(50)
    assert Alert.objects.get(id=alert.id).status == "resolved"
    actions = [e["data"]["action"] for e in published.events("alert.changed")]
    assert actions == ["raised", "updated", "resolved"]
    data = published.events("alert.changed")[0]["data"]
    assert (data["hostname"], data["severity"], data["category"]) == (
        "web-01",
        "warning",
        "disk_space",
    )


@pytest.mark.django_db
def test_host_offline_raises_critical_and_online_resolves(published):
    host = host_services.host_create(hostname="web-01")
    published.run(host_services.host_set_status, host_id=host.id, status="online")
    published.run(host_services.host_set_status, host_id=host.id, status="offline")
    alert = Alert.objects.get(host=host, category="availability")
    assert (alert.severity, alert.status, alert.title) == (
        "critical",
        "open",
        "Host offline: web-01",
    )
    published.run(host_services.host_set_status, host_id=host.id, status="online")
    alert.refresh_from_db()
    assert alert.status == "resolved"
    assert alert.resolved_by is None


@pytest.mark.django_db(transaction=True)
async def test_alert_commands_over_the_socket(make_user, token_for):
    from alerts import services as alert_services

    ops = await database_sync_to_async(make_user)("ops", perms=["alerts.change_alert"])
    # the staff flag alone is not the permission
    viewer = await database_sync_to_async(make_user)("viewer", staff=True)
    alert = await database_sync_to_async(alert_services.alert_raise)(
        severity="warning", category="x", title="Something"
    )
    comm = await open_socket("/ws", token=token_for(ops))
    _, status = await subscribe_with_status(comm, "system_alerts", {"severity": ["warning"]})
    assert [a["alert_id"] for a in status["data"]["alerts"]] == [str(alert.id)]
    await comm.send_json_to(
        {
            "type": "command",
            "channel": "system_alerts",
            "id": "a1",
            "data": {"action": "acknowledge", "alert_id": str(alert.id)},
        }
    )
    # The response and the event travel separately; either may come first.
    got = {}
    while len(got) < 2:
        message = await comm.receive_json_from(timeout=3)
        got[message["type"]] = message
    assert got["response"]["id"] == "a1"
    assert got["response"]["data"]["status"] == "acknowledged"
    assert got["event"]["data"]["action"] == "acknowledged"
    again = await request(
        comm,
        {
            "type": "command",
            "channel": "system_alerts",
            "id": "a2",
            "data": {"action": "acknowledge", "alert_id": str(alert.id)},
        },
    )
    assert again["data"]["code"] == "COMMAND_FAILED"
    await comm.disconnect()
    comm = await open_socket("/ws", token=token_for(viewer))
    denied = await request(
        comm,
        {
            "type": "command",
            "channel": "system_alerts",
            "id": "a3",
            "data": {"action": "resolve", "alert_id": str(alert.id)},
        },
    )
    assert denied["data"]["code"] == "PERMISSION_DENIED"
    await comm.disconnect()
    stored = await database_sync_to_async(Alert.objects.get)(id=alert.id)
    assert stored.status == "acknowledged"
    from activity.models import UserActivity

    assert await database_sync_to_async(
        UserActivity.objects.filter(action="alert_acknowledged", username="ops").exists
    )()


@pytest.mark.django_db
def test_after_a_restart_a_stale_alert_is_resolved_and_clear_hosts_cost_one_query(
    published, django_assert_num_queries
):
    from alerts import services as alert_services

    evaluation.reload_rules()
    rule = AlertRule.objects.get(name="Disk usage")
    stale_host = host_services.host_create(hostname="stale", cpu_count=2)
    clear_host = host_services.host_create(hostname="clear", cpu_count=2)
    alert_services.rule_alert_sync(
        host_id=stale_host.id,
        rule_id=rule.id,
        key="/",
        severity="warning",
        title="t",
        message="m",
        category="disk_space",
    )
    evaluation.ENGINE.__init__()  # a new process: nothing known about the database
    evaluation.reload_rules()
    with django_assert_num_queries(1):  # one lookup for all of the clear host's rules
        evaluation.on_metrics(
            {
                "host_id": str(clear_host.id),
                "hostname": "clear",
                "cpu_count": 2,
                "metrics": {"disk_usage": {"/": 10.0}, "memory_usage": 20.0},
            }
        )
    published.run(
        evaluation.on_metrics,
        {
            "host_id": str(stale_host.id),
            "hostname": "stale",
            "cpu_count": 2,
            "metrics": {"disk_usage": {"/": 10.0}},
        },
    )
    assert Alert.objects.get(host=stale_host).status == "resolved"


@pytest.mark.django_db
def test_resolving_with_nothing_active_writes_nothing(django_assert_num_queries):
    from alerts import services as alert_services
    from alerts.models import AlertRule
    from hosts import services as host_services

    host = host_services.host_create(hostname="quiet-01")
    rule = AlertRule.objects.first()
    with django_assert_num_queries(1):  # one read; no transaction, no lock
        assert (
            alert_services.rule_alert_sync(
                host_id=host.id,
                rule_id=rule.id,
                key="",
                severity=None,
                title="t",
                message="m",
                category=rule.category,
            )
            is None
        )


@pytest.mark.django_db
def test_a_deleted_hosts_rule_state_is_forgotten_on_the_next_reload(published):
    evaluation.ENGINE.__init__()
    evaluation.reload_rules()
    kept = host_services.host_create(hostname="kept", cpu_count=2)
    gone = host_services.host_create(hostname="gone", cpu_count=2)
    for host in (kept, gone):
        evaluation.on_metrics(
            {
                "host_id": str(host.id),
                "hostname": host.hostname,
                "cpu_count": 2,
                "metrics": {"cpu_usage": 99.0},  # a streak under way, not yet an alert
            }
        )
    assert evaluation.ENGINE.host_ids() == {str(kept.id), str(gone.id)}
    host_services.host_delete(host=gone)
    evaluation.reload_rules()
    assert evaluation.ENGINE.host_ids() == {str(kept.id)}
