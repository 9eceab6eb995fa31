"""Enrollment and maintenance management commands, and the hosts sweep."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from hosts import selectors, services
from hosts.maintenance import sweep
from hosts.metrics import MetricsError, MinuteAggregator, clean_metrics
from hosts.models import CommandExecution, Host, PackageOperation
from hosts.tokens import token_digest

pytestmark = pytest.mark.django_db


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_register_host_prints_json_last_and_stores_only_a_digest():
    out, _err = run("register_host", "web-01")
    payload = json.loads(out.strip().splitlines()[-1])
    host = Host.objects.get(id=payload["host_id"])
    assert host.hostname == "web-01"
    assert host.token_hash == token_digest(payload["token"])
    assert payload["token"] not in host.token_hash
    assert selectors.host_for_token(payload["token"]) == host


def test_register_host_never_puts_the_token_on_a_command_line():
    out, err = run("register_host", "web-01")
    token = json.loads(out.strip().splitlines()[-1])["token"]
    assert f"--token {token}" not in err
    assert f"export SYSMANAGE_AGENT_TOKEN='{token}'" in err


def test_register_host_refuses_an_enrolled_host_unless_told_to_reissue(published):
    first = json.loads(run("register_host", "web-01")[0].splitlines()[-1])["token"]
    with pytest.raises(CommandError, match=r"already enrolled.*rotate_host_token web-01"):
        run("register_host", "WEB-01")
    assert selectors.host_for_token(first).hostname == "web-01"  # still works
    again = json.loads(
        published.run(run, "register_host", "web-01", "--reissue")[0].splitlines()[-1]
    )
    assert selectors.host_for_token(first) is None
    assert selectors.host_for_token(again["token"]).hostname == "web-01"
    # the agent running with the old token is cut off, as by rotate_host_token
    assert [m for m in published.messages if m.get("action") == "close_agent"]


def test_register_host_refuses_bad_names():
    with pytest.raises(CommandError):
        run("register_host", "bad name!")


def test_rotate_invalidates_the_old_token():
    old = json.loads(run("register_host", "web-01")[0].splitlines()[-1])["token"]
    new = json.loads(run("rotate_host_token", "web-01")[0].splitlines()[-1])["token"]
    assert new != old
    assert selectors.host_for_token(old) is None
    assert selectors.host_for_token(new).hostname == "web-01"


def test_revoke_host(published):
    token = json.loads(run("register_host", "web-01")[0].splitlines()[-1])["token"]
    host = Host.objects.get(hostname="web-01")
    published.run(run, "revoke_host", str(host.id))
    assert selectors.host_for_token(token) is None
    controls = [m for m in published.messages if m.get("action") == "close_agent"]
    assert controls
    assert controls[0]["fields"]["host_id"] == str(host.id)


@pytest.mark.parametrize("command", ["rotate_host_token", "revoke_host"])
def test_unknown_host_is_an_error(command):
    with pytest.raises(CommandError, match="No host"):
        run(command, "ghost")


def test_sweep_marks_silent_hosts_offline_and_times_out_commands(published, settings):
    settings.COMMAND_RESULT_GRACE_SECONDS = 0
    quiet = services.host_create(hostname="quiet")
    lively = services.host_create(hostname="lively")
    for host in (quiet, lively):
        services.host_set_status(host_id=host.id, status="online")
    Host.objects.filter(id=quiet.id).update(last_seen=timezone.now() - timedelta(minutes=5))
    execution = services.command_create(host=lively, command="sleep 1", timeout=1, user=None)
    CommandExecution.objects.filter(id=execution.id).update(
        created_at=timezone.now() - timedelta(seconds=5)
    )
    operation = services.package_operation_create(
        host=lively, operation="install", package="x", user=None
    )
    PackageOperation.objects.filter(id=operation.id).update(
        updated_at=timezone.now() - timedelta(hours=2)
    )
    report = published.run(sweep, offline_after=90)
    assert report.hosts_offline == ["quiet"]
    assert report.commands_timed_out == 1
    assert report.operations_failed == 1
    assert Host.objects.get(id=lively.id).status == "online"
    assert CommandExecution.objects.get(id=execution.id).status == "timeout"
    assert PackageOperation.objects.get(id=operation.id).status == "failed"
    changes = published.events("host.status_changed")
    assert [(e["data"]["hostname"], e["data"]["previous_status"]) for e in changes] == [
        ("quiet", "online")
    ]


def test_mark_offline_hosts_command():
    host = services.host_create(hostname="quiet")
    services.host_set_status(host_id=host.id, status="online")
    Host.objects.filter(id=host.id).update(last_seen=timezone.now() - timedelta(minutes=5))
    out, _ = run("mark_offline_hosts", "--after", "60")
    assert "Hosts marked offline: 1 (quiet)" in out
    with pytest.raises(CommandError):
        run("mark_offline_hosts", "--after", "-1")


def test_minute_aggregator_averages_and_rolls_over():
    aggregator = MinuteAggregator()
    t0 = timezone.now().replace(second=1, microsecond=0)
    assert aggregator.add(t0, {"cpu_usage": 10.0, "disk_usage": {"/": 1.0}}) is None
    assert aggregator.add(t0 + timedelta(seconds=30), {"cpu_usage": 20.0}) is None
    minute, count, averages = aggregator.add(t0 + timedelta(seconds=60), {"cpu_usage": 50.0})
    assert (minute, count) == (t0.replace(second=0), 2)
    assert averages == {"cpu_usage": 15.0, "disk_usage": {"/": 1.0}}
    assert aggregator.flush()[2] == {"cpu_usage": 50.0}
    assert aggregator.flush() is None


def test_metric_samples_merge_within_a_minute():
    host = services.host_create(hostname="m")
    minute = timezone.now().replace(second=0, microsecond=0)
    services.metric_sample_save(
        host_id=host.id, minute=minute, samples=2, averages={"cpu_usage": 10.0}
    )
    services.metric_sample_save(
        host_id=host.id,
        minute=minute,
        samples=2,
        averages={"cpu_usage": 30.0, "load_average": [1, 2, 3]},
    )
    (row,) = selectors.metric_history(str(host.id), since=minute)
    assert (row["samples"], row["cpu_usage"], row["load_average"]) == (4, 20.0, [1, 2, 3])


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {},
        {"cpu_usage": -1},
        {"cpu_usage": "high"},
        {"memory_usage": float("nan")},
        {"disk_usage": {"/": 101}},
        {"load_average": [1, 2]},
        {"load_average": [1, 2, -3]},
    ],
)
def test_malformed_metrics_are_refused(bad):
    with pytest.raises(MetricsError):
        clean_metrics(bad)


async def test_a_request_waits_for_the_news_of_its_own_command_only():
    from hosts import commands
    from hosts.events import AgentTook, CommandFinished

    taken = commands.wait_for(commands.Awaited("taken", "c1"))
    finished = commands.wait_for(commands.Awaited("finished", "c1"))
    commands.on_command_finished(None, CommandFinished(execution_id="c2"))
    commands.on_agent_took(None, AgentTook(ref="c1", host_id="h"))
    assert taken.done()
    assert not finished.done()
    commands.on_command_finished(None, CommandFinished(execution_id="c1"))
    assert finished.done()
    assert commands._WAITERS == {}
