"""prune_data and fleet_report on a real database."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from activity.models import UserActivity
from activity.services import activity_record
from alerts import services as alert_services
from alerts.models import Alert
from hosts import services as host_services
from hosts.models import CommandExecution, MetricSample, PackageOperation

pytestmark = pytest.mark.django_db


def run(*args):
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def age(model, field, days, **filters):
    model.objects.filter(**filters).update(**{field: timezone.now() - timedelta(days=days)})


def test_prune_removes_only_old_finished_data():
    host = host_services.host_create(hostname="web-01")
    old_done = host_services.command_create(host=host, command="a", timeout=5, user=None)
    host_services.command_finish(execution=old_done, status="completed", exit_code=0)
    old_running = host_services.command_create(host=host, command="b", timeout=5, user=None)
    new_done = host_services.command_create(host=host, command="c", timeout=5, user=None)
    host_services.command_finish(execution=new_done, status="completed", exit_code=0)
    age(CommandExecution, "created_at", 40, id__in=[old_done.id, old_running.id])
    op = host_services.package_operation_create(
        host=host, operation="install", package="x", user=None
    )
    host_services.package_operation_update(operation=op, status="completed", progress=100)
    age(PackageOperation, "created_at", 40)
    minute = timezone.now().replace(second=0, microsecond=0)
    host_services.metric_sample_save(
        host_id=host.id, minute=minute - timedelta(days=40), samples=1, averages={"cpu_usage": 1}
    )
    host_services.metric_sample_save(
        host_id=host.id, minute=minute, samples=1, averages={"cpu_usage": 1}
    )
    activity_record(action="login", username="someone")
    age(UserActivity, "timestamp", 40)
    activity_record(action="login", username="recent")
    resolved = alert_services.alert_raise(severity="info", category="x", title="old")
    alert_services.alert_resolve(alert_id=resolved.id, actor=None)
    still_open = alert_services.alert_raise(severity="info", category="x", title="open")
    age(Alert, "updated_at", 40)

    dry = run("prune_data", "--older-than", "30d", "--dry-run")
    assert "Would delete 1 command executions" in dry
    assert CommandExecution.objects.count() == 3

    out = run("prune_data", "--older-than", "30d")
    assert "Deleted 1 metric samples" in out
    assert "Deleted 1 activity records" in out
    assert "Deleted 1 command executions" in out
    assert "Deleted 1 package operations" in out
    assert "Deleted 1 resolved alerts" in out
    assert set(CommandExecution.objects.values_list("command", flat=True)) == {"b", "c"}
    assert MetricSample.objects.count() == 1
    assert list(UserActivity.objects.values_list("username", flat=True)) == ["recent"]
    assert list(Alert.objects.values_list("id", flat=True)) == [still_open.id]


@pytest.mark.parametrize("bad", ["30", "thirty days", "0d", "-3d", "5y"])
def test_prune_refuses_bad_ages(bad):
    with pytest.raises(CommandError, match="--older-than"):
        run("prune_data", "--older-than", bad)


def test_fleet_report_table_and_json():
    web = host_services.host_create(hostname="web-01", os_name="Debian", os_version="12")
    host_services.host_create(hostname="db-01")
    host_services.host_set_status(host_id=web.id, status="online")
    alert_services.alert_raise(severity="critical", category="disk", title="Disk", host=web)
    host_services.host_reboot_save(host_id=web.id, required=True)
    table = run("fleet_report")
    lines = table.splitlines()
    assert lines[0].split() == ["HOST", "STATUS", "LAST", "SEEN", "OS", "CRIT", "WARN", "INFO"]
    web_line = next(line for line in lines if line.startswith("web-01"))
    assert "online" in web_line
    assert "Debian 12" in web_line
    assert web_line.split()[-3:] == ["1", "0", "0"]
    # db-01 was never heard from: unknown, not offline
    assert "2 hosts: 1 online, 0 offline, 1 unknown (never heard from); 1 with open alerts" in table
    assert "0 with security updates, 1 needing a reboot" in table
    data = json.loads(run("fleet_report", "--json", "--status", "unknown"))
    assert [h["hostname"] for h in data["hosts"]] == ["db-01"]
    assert data["fleet"]["total_hosts"] == 2
    assert data["fleet"]["unknown_hosts"] == 1


def test_seed_demo_refuses_bad_arguments():
    for args in (["--hosts", "0"], ["--interval", "0"], ["--server", "ftp://x"]):
        with pytest.raises(CommandError):
            run("seed_demo", *args)


def test_prune_removes_old_login_counters_but_not_live_locks():
    from activity.models import LoginCounter

    now = timezone.now()
    LoginCounter.objects.create(
        scope="pair", key="old", failures=3, window_started=now - timedelta(days=40)
    )
    LoginCounter.objects.create(
        scope="pair",
        key="still-locked",
        failures=5,
        window_started=now - timedelta(days=40),
        blocked_until=now + timedelta(minutes=5),
    )
    LoginCounter.objects.create(scope="pair", key="recent", failures=1, window_started=now)
    assert "Deleted 1 login counters" in run("prune_data", "--older-than", "30d")
    assert set(LoginCounter.objects.values_list("key", flat=True)) == {"still-locked", "recent"}


@pytest.mark.django_db
def test_a_process_marks_no_host_offline_before_its_agents_had_time_to_return(
    monkeypatch, settings
):
    """After a restart the agents of the hosts the previous run served reconnect with
    their back-off: the process's own sweep leaves their hosts online for
    HOST_OFFLINE_AFTER_SECONDS from its first sweep, then marks the silent ones offline;
    the cron command does not wait."""
    import time

    from hosts import maintenance
    from hosts.models import Host, HostStatus

    settings.HOST_OFFLINE_AFTER_SECONDS = 30
    host = host_services.host_create(hostname="was-served")
    Host.objects.filter(pk=host.pk).update(
        status=HostStatus.ONLINE, last_seen=timezone.now() - timedelta(minutes=10)
    )
    monkeypatch.setattr(maintenance, "_first_sweep", None)
    assert maintenance.periodic_sweep().hosts_offline == []
    assert Host.objects.get(pk=host.pk).status == HostStatus.ONLINE
    monkeypatch.setattr(maintenance, "_first_sweep", time.monotonic() - 31)
    assert maintenance.periodic_sweep().hosts_offline == ["was-served"]

    Host.objects.filter(pk=host.pk).update(status=HostStatus.ONLINE)
    monkeypatch.setattr(maintenance, "_first_sweep", None)
    maintenance.periodic_sweep()  # a process just started: waits
    assert maintenance.sweep().hosts_offline == ["was-served"]  # what cron runs: at once
