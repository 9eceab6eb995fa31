"""Fleet runs: the batching and failure limit of the runner, the request's checks, the
permission refusal, the interruption of runs whose process stopped, the ``run_id``
filter and the coalesced progress."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from hosts import commands, fleetrunner, fleetruns
from hosts import services as host_services
from hosts.fleetrunner import FleetRunner, run_batches
from hosts.fleetruns import FleetRunSpec, failure_threshold, parse_fleet_run
from hosts.maintenance import sweep
from hosts.models import FleetRun, FleetRunHost, FleetRunState, Host, HostStatus
from sysmanage import permissions
from sysmanage.topics import TOPICS

# -- batching and the failure limit (no database) -------------------------------------


async def _batches(outcomes: dict[int, str], *, size: int, threshold: int | None):
    running, most, started = 0, 0, []

    async def run_one(item: int) -> str:
        nonlocal running, most
        running += 1
        most = max(most, running)
        started.append(item)
        await asyncio.sleep(0.01 * (item % 3))
        running -= 1
        return outcomes.get(item, "succeeded")

    stopped = await run_batches(
        list(range(12)), batch_size=size, threshold=threshold, run_one=run_one
    )
    return stopped, most, started


async def test_hosts_run_a_batch_at_a_time_and_all_of_them_without_a_limit():
    stopped, most, started = await _batches({1: "failed", 7: "failed"}, size=5, threshold=None)
    assert not stopped
    assert most == 5
    assert sorted(started) == list(range(12))
    # a batch starts only once the previous one has ended: starts come in batches
    assert [set(started[i : i + 5]) for i in (0, 5, 10)] == [
        set(range(5)),
        set(range(5, 10)),
        {10, 11},
    ]


async def test_no_batch_starts_once_the_failure_limit_is_reached():
    stopped, _, started = await _batches(
        {1: "failed", 3: "failed", 6: "failed"}, size=5, threshold=3
    )
    assert stopped
    assert sorted(started) == list(range(10))  # the third batch never started
    stopped, _, started = await _batches({1: "failed"}, size=5, threshold=2)
    assert not stopped
    # skipped hosts are no failures
    stopped, _, started = await _batches({0: "skipped", 1: "skipped"}, size=2, threshold=1)
    assert not stopped


def test_failure_threshold_as_a_count_or_a_percent():
    assert failure_threshold(20, None, False) is None
    assert failure_threshold(20, 3, False) == 3
    assert failure_threshold(20, 10, True) == 2
    assert failure_threshold(21, 10, True) == 3  # rounded up: 10% of 21 is 2.1
    assert failure_threshold(3, 1, True) == 1  # never 0: the first failure stops it


# -- the request --------------------------------------------------------------------

HOST = "6f1c2a4e-0000-4000-8000-000000000001"


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"command": "x"}, "'targets'"),
        ({"targets": {}, "command": "x"}, "names no group"),
        ({"targets": {"hosts": []}, "command": "x"}, "'targets' must be"),
        ({"targets": {"host_ids": ["nope"]}, "command": "x"}, "not a valid UUID"),
        ({"targets": {"groups": [""]}, "command": "x"}, "group names"),
        ({"targets": {"groups": ["web"]}, "command": " "}, "'command'"),
        ({"targets": {"groups": ["web"]}, "command": "x", "batch_size": 0}, "'batch_size'"),
        ({"targets": {"groups": ["web"]}, "command": "x", "timeout": 0}, "'timeout'"),
        ({"targets": {"groups": ["web"]}, "command": "x", "failure_limit": 0}, "failure_limit"),
        ({"targets": {"groups": ["web"]}, "command": "x", "failure_limit": "0%"}, "percent"),
        ({"targets": {"groups": ["web"]}, "command": "x", "failure_limit": "x%"}, "percent"),
        ({"targets": {"groups": ["web"]}, "command": "x", "offline": "later"}, "'offline'"),
    ],
)
def test_a_malformed_request_says_what_is_wrong(data, problem):
    with pytest.raises(ValueError, match=problem):
        parse_fleet_run(data)


def test_a_package_request_names_one_operation_and_one_package():
    spec = parse_fleet_run(
        {"targets": {"groups": ["web"]}, "operation": "install", "package": "nginx"}, "package"
    )
    assert (spec.kind, spec.command, spec.timeout) == ("package", "install nginx", 600)
    with pytest.raises(ValueError, match="'operation'"):
        parse_fleet_run({"targets": {"groups": ["web"]}, "operation": "purge"}, "package")
    with pytest.raises(ValueError, match="'package'"):
        parse_fleet_run(
            {"targets": {"groups": ["web"]}, "operation": "install", "package": "-y x"}, "package"
        )


def test_outcomes_of_commands_and_package_operations():
    from hosts.fleetrunner import command_outcome, package_outcome

    assert command_outcome({"status": "completed", "exit_code": 0}).status == "succeeded"
    assert command_outcome({"status": "completed", "exit_code": 2}).reason == "exit code 2"
    timed_out = command_outcome({"status": "timeout", "error": "No result from the agent"})
    assert (timed_out.status, timed_out.reason) == ("failed", "No result from the agent")
    assert package_outcome({"status": "completed"}, 60).status == "succeeded"
    assert package_outcome({"status": "failed", "message": "E: x"}, 60).reason == "E: x"
    slow = package_outcome({"status": "in_progress"}, 60)
    assert (slow.status, slow.reason) == ("failed", "not ended after 60 s (it goes on)")


def test_a_request_in_full():
    spec = parse_fleet_run(
        {
            "targets": {"groups": ["web", "web"], "host_ids": [HOST.upper()]},
            "command": "uptime",
            "timeout": 10,
            "batch_size": 3,
            "failure_limit": "25%",
        }
    )
    assert spec.groups == ("web",)
    assert spec.host_ids == (HOST,)
    assert (spec.timeout, spec.batch_size, spec.failure_limit, spec.percent) == (10, 3, 25, True)


# -- recording and refusing ---------------------------------------------------------


@pytest.fixture
def web(db):
    group = host_services.host_group_create(name="web")
    hosts = [host_services.host_create(hostname=f"web-{i}", groups=[group]) for i in range(5)]
    Host.objects.filter(pk__in=[h.pk for h in hosts]).update(status=HostStatus.ONLINE)
    return hosts


def test_a_run_records_every_targeted_host_queued_in_order(web, make_user):
    admin = make_user("root", superuser=True)
    extra = host_services.host_create(hostname="alone")
    spec = parse_fleet_run(
        {
            "targets": {"groups": ["WEB"], "host_ids": [str(extra.id), str(web[0].id)]},
            "command": "x",
        }
    )
    run = fleetruns.fleet_run_create(spec=spec, user=admin)
    assert run.state == FleetRunState.RUNNING
    rows = list(run.hosts.values_list("hostname", "status"))
    assert rows == [("alone", "queued")] + [(f"web-{i}", "queued") for i in range(5)]


def test_a_run_is_refused_naming_how_many_hosts_are_not_allowed(web, make_user, monkeypatch):
    user = make_user("op", perms=["sysmanage.run_command"])
    allowed = {str(h.id) for h in web[:3]}
    calls = []

    def hosts_allowed(asker: Any, right: str, host_ids: Any) -> set[str]:
        ids = {str(h) for h in host_ids}
        calls.append((asker.pk, right, ids))
        return ids & allowed

    monkeypatch.setattr(permissions, "hosts_allowed", hosts_allowed)
    spec = parse_fleet_run({"targets": {"groups": ["web"]}, "command": "x"})
    with pytest.raises(fleetruns.FleetRunRefused, match="2 of the 5 targeted hosts") as refused:
        fleetruns.fleet_run_create(spec=spec, user=user)
    assert (refused.value.refused, refused.value.total) == (2, 5)
    assert calls == [(user.pk, "run_command", {str(h.id) for h in web})]
    assert not FleetRun.objects.exists()


def test_a_filter_targets_the_hosts_matching_all_of_it(web, make_user):
    admin = make_user("root", superuser=True)
    host_services.host_create(hostname="db-1", fqdn="db-1.web.example", os_name="Debian")
    host_services.host_create(hostname="db-2", os_name="Debian")
    Host.objects.filter(hostname="web-3").update(os_name="debian")
    spec = parse_fleet_run({"targets": {"filter": {"search": "WEB", "os": "deb"}}, "command": "x"})
    assert spec.target == {"groups": [], "host_ids": [], "filter": {"search": "WEB", "os": "deb"}}
    run = fleetruns.fleet_run_create(spec=spec, user=admin)
    assert list(run.hosts.values_list("hostname", flat=True)) == ["db-1", "web-3"]
    spec = parse_fleet_run(
        {"targets": {"groups": ["web"], "filter": {"search": "db-2"}}, "command": "x"}
    )
    run = fleetruns.fleet_run_create(spec=spec, user=admin)
    assert run.hosts.count() == 6  # the group's five, and the one matching
    with pytest.raises(ValueError, match=r"'targets\.filter'"):
        parse_fleet_run({"targets": {"filter": {"status": "online"}}, "command": "x"})
    with pytest.raises(ValueError, match=r"'targets\.filter\.search'"):
        parse_fleet_run({"targets": {"filter": {"search": " "}}, "command": "x"})


def test_a_user_without_the_right_is_refused_every_host(web, make_user):
    spec = parse_fleet_run({"targets": {"groups": ["web"]}, "command": "x"})
    with pytest.raises(fleetruns.FleetRunRefused, match="5 of the 5"):
        fleetruns.fleet_run_create(spec=spec, user=make_user("nobody"))


def test_unknown_targets_are_refused(web, make_user):
    admin = make_user("root", superuser=True)
    with pytest.raises(ValueError, match="No host group named db"):
        fleetruns.fleet_run_create(
            spec=parse_fleet_run({"targets": {"groups": ["db"]}, "command": "x"}), user=admin
        )
    with pytest.raises(ValueError, match="name no host"):
        fleetruns.fleet_run_create(
            spec=parse_fleet_run({"targets": {"host_ids": [HOST]}, "command": "x"}), user=admin
        )


def test_a_run_whose_process_went_silent_is_marked_interrupted(web, make_user, settings):
    admin = make_user("root", superuser=True)
    spec = FleetRunSpec(command="x", groups=("web",), target={"groups": ["web"]})
    stale = fleetruns.fleet_run_create(spec=spec, user=admin)
    alive = fleetruns.fleet_run_create(spec=spec, user=admin)
    row = stale.hosts.first()
    fleetruns.fleet_run_host_ended(row_id=row.id, status="succeeded")
    old = timezone.now() - timedelta(seconds=settings.FLEET_RUN_STALE_SECONDS + 5)
    FleetRun.objects.filter(pk=stale.pk).update(heartbeat_at=old)
    report = sweep()
    assert report.fleet_runs_interrupted == [str(stale.id)]
    stale.refresh_from_db()
    assert stale.state == FleetRunState.INTERRUPTED
    assert stale.finished_at is not None
    assert (stale.succeeded, stale.skipped) == (1, 4)
    assert set(
        FleetRunHost.objects.filter(run=stale).exclude(pk=row.pk).values_list("reason", flat=True)
    ) == {"The server process running it stopped"}
    alive.refresh_from_db()
    assert alive.state == FleetRunState.RUNNING


def test_a_host_the_sweep_ended_is_neither_started_nor_recorded_again(web, make_user, settings):
    """A run taken for interrupted (its database was away longer than the stale delay)
    while its process lived on: what the runner then records does not undo the sweep."""
    admin = make_user("root", superuser=True)
    spec = FleetRunSpec(command="x", groups=("web",), target={"groups": ["web"]})
    run = fleetruns.fleet_run_create(spec=spec, user=admin)
    first, second = run.hosts.order_by("position")[:2]
    assert fleetruns.fleet_run_host_started(row_id=first.id)
    old = timezone.now() - timedelta(seconds=settings.FLEET_RUN_STALE_SECONDS + 5)
    FleetRun.objects.filter(pk=run.pk).update(heartbeat_at=old)
    assert sweep().fleet_runs_interrupted == [str(run.id)]
    fleetruns.fleet_run_host_ended(row_id=first.id, status="succeeded")
    assert not fleetruns.fleet_run_host_started(row_id=second.id)
    run.refresh_from_db()
    assert (run.state, run.succeeded, run.skipped) == (FleetRunState.INTERRUPTED, 0, 5)
    first.refresh_from_db()
    assert (first.status, first.reason) == ("skipped", "The server process running it stopped")


def test_a_user_with_the_most_runs_running_is_refused_another(web, make_user, settings):
    settings.FLEET_RUNS_MAX_RUNNING_PER_USER = 2
    admin, other = make_user("root", superuser=True), make_user("ops", superuser=True)
    spec = FleetRunSpec(command="x", groups=("web",), target={"groups": ["web"]})
    first = fleetruns.fleet_run_create(spec=spec, user=admin)
    fleetruns.fleet_run_create(spec=spec, user=admin)
    with pytest.raises(
        fleetruns.FleetRunLimitReached, match=r"the most fleet runs running at once \(2\)"
    ) as no:
        fleetruns.fleet_run_create(spec=spec, user=admin)
    assert no.value.limit == 2
    assert FleetRun.objects.filter(requested_by=admin).count() == 2  # nothing recorded
    fleetruns.fleet_run_create(spec=spec, user=other)  # counted per user
    fleetruns.fleet_run_finish(run_id=first.id, state=FleetRunState.SUCCEEDED)
    fleetruns.fleet_run_create(spec=spec, user=admin)  # one ended: room for one more
    settings.FLEET_RUNS_MAX_RUNNING_PER_USER = 0  # no limit
    fleetruns.fleet_run_create(spec=spec, user=admin)


# -- the run_id filter --------------------------------------------------------------


def test_the_run_id_filter_keeps_to_one_run():
    topic = TOPICS["command_execution"]
    filters = topic.clean_filters({"run_id": HOST.upper()}, None)
    assert filters == {"run_id": HOST}
    assert topic.matches(filters, {"run_id": HOST, "counts": {}})
    assert not topic.matches(filters, {"run_id": HOST.replace("1", "2"), "counts": {}})
    assert not topic.matches(filters, {"execution_id": "e", "host_id": HOST})
    assert topic.matches({}, {"run_id": HOST})
    assert topic.matches({"host_id": HOST}, {"execution_id": "e", "host_id": HOST})


# -- the runner, its command path replaced -------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_the_runner_coalesces_progress_and_ends_stopped(monkeypatch, settings):
    from asgiref.sync import sync_to_async

    settings.FLEET_RUN_PROGRESS_INTERVAL = 0.2
    published: list[Any] = []
    monkeypatch.setattr(fleetrunner, "publish_now", published.append)

    async def ran(*, host: Host, command: str, **kwargs: Any) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        code = 1 if host.hostname in command.split() else 0
        return {"execution_id": None, "status": "completed", "exit_code": code}

    monkeypatch.setattr(commands, "command_run_and_wait", ran)

    def setup() -> tuple[FleetRun, Any]:
        from django.contrib.auth import get_user_model

        admin = get_user_model().objects.create_user("root", is_superuser=True, is_staff=True)
        group = host_services.host_group_create(name="many")
        for i in range(30):
            host_services.host_create(hostname=f"h-{i:02d}", groups=[group])
        Host.objects.update(status=HostStatus.ONLINE)
        Host.objects.filter(hostname="h-00").update(status=HostStatus.OFFLINE)
        spec = parse_fleet_run(
            {
                "targets": {"groups": ["many"]},
                "command": "run h-12 h-14 h-21",
                "batch_size": 4,
                "failure_limit": "10%",
            }
        )
        return fleetruns.fleet_run_create(spec=spec, user=admin), admin

    run, admin = await sync_to_async(setup)()
    await FleetRunner(run, admin, None).run()
    final = published[-1]
    assert final.final
    assert final.state == "stopped"
    # 10% of 30 is 3 failures: h-21 is in the sixth batch (h-20..h-23), which ends it
    assert final.counts == {"queued": 0, "running": 0, "succeeded": 20, "failed": 3, "skipped": 7}
    assert len(published) < 30  # not one per host change
    results = [r for event in published for r in event.results]
    assert len(results) == 24  # every host that had its turn, each once
    started = [h["hostname"] for event in published for h in event.started]
    # every online host whose turn came started once (h-00 was offline: skipped unstarted)
    assert sorted(started) == [f"h-{i:02d}" for i in range(1, 24)]
    assert {"hostname": "h-00", "status": "skipped", "reason": "host offline"}.items() <= next(
        r for r in results if r["hostname"] == "h-00"
    ).items()
    stored = await sync_to_async(lambda: FleetRun.objects.get(pk=run.pk))()
    assert (stored.state, stored.succeeded, stored.failed, stored.skipped) == ("stopped", 20, 3, 7)


@pytest.mark.django_db(transaction=True)
async def test_a_package_run_goes_through_the_package_path(monkeypatch):
    from asgiref.sync import sync_to_async

    published: list[Any] = []
    monkeypatch.setattr(fleetrunner, "publish_now", published.append)
    asked: list[tuple[str, str, str, int]] = []

    async def installed(*, host: Host, operation: str, package: str, time_limit: int, **kw: Any):
        asked.append((host.hostname, operation, package, time_limit))
        if host.hostname == "p-1":
            raise commands.NotDelivered("Host not reachable: its agent did not take it", None)
        return {"execution_id": None, "status": "completed"}

    monkeypatch.setattr(commands, "package_operation_run_and_wait", installed)

    def setup() -> tuple[FleetRun, Any]:
        from django.contrib.auth import get_user_model

        admin = get_user_model().objects.create_user("root", is_superuser=True, is_staff=True)
        hosts = [host_services.host_create(hostname=f"p-{i}") for i in range(3)]
        Host.objects.update(status=HostStatus.ONLINE)
        spec = parse_fleet_run(
            {
                "targets": {"host_ids": [str(h.id) for h in hosts]},
                "operation": "remove",
                "package": "telnet",
                "timeout": 90,
            },
            "package",
        )
        return fleetruns.fleet_run_create(spec=spec, user=admin), admin

    run, admin = await sync_to_async(setup)()
    await FleetRunner(run, admin, None).run()
    assert sorted(asked) == [(f"p-{i}", "remove", "telnet", 90) for i in range(3)]
    final = published[-1]
    assert (final.kind, final.state, final.command) == ("package", "failed", "remove telnet")
    assert final.counts["succeeded"] == 2
    assert final.counts["failed"] == 1
    rows = await sync_to_async(
        lambda: {r.hostname: r for r in FleetRunHost.objects.filter(run=run)}
    )()
    assert rows["p-1"].reason == "Host not reachable: its agent did not take it"
    assert rows["p-1"].status == "failed"


@pytest.mark.django_db(transaction=True)
async def test_with_offline_wait_a_host_runs_when_it_returns_or_is_skipped(monkeypatch):
    from asgiref.sync import sync_to_async

    monkeypatch.setattr(fleetrunner, "OFFLINE_POLL_SECONDS", 0.05)
    published: list[Any] = []
    monkeypatch.setattr(fleetrunner, "publish_now", published.append)
    ran: list[str] = []

    async def run_it(*, host: Host, **kwargs: Any) -> dict[str, Any]:
        ran.append(host.hostname)
        return {"execution_id": None, "status": "completed", "exit_code": 0}

    monkeypatch.setattr(commands, "command_run_and_wait", run_it)

    def setup() -> tuple[FleetRun, Any]:
        from django.contrib.auth import get_user_model

        admin = get_user_model().objects.create_user("root", is_superuser=True, is_staff=True)
        hosts = [host_services.host_create(hostname=f"w-{i}") for i in range(3)]
        Host.objects.filter(hostname="w-0").update(status=HostStatus.ONLINE)
        spec = parse_fleet_run(
            {
                "targets": {"host_ids": [str(h.id) for h in hosts]},
                "command": "x",
                "offline": "wait",
                "offline_wait": 1,
            }
        )
        return fleetruns.fleet_run_create(spec=spec, user=admin), admin

    run, admin = await sync_to_async(setup)()
    runner = asyncio.ensure_future(FleetRunner(run, admin, None).run())
    await asyncio.sleep(0.3)
    assert ran == ["w-0"]  # the others wait, queued
    assert published[-1].counts["queued"] == 2
    await sync_to_async(
        lambda: Host.objects.filter(hostname="w-1").update(status=HostStatus.ONLINE)
    )()
    await asyncio.wait_for(runner, 5)
    assert ran == ["w-0", "w-1"]
    final = published[-1]
    assert final.state == "failed"
    assert final.counts == {"queued": 0, "running": 0, "succeeded": 2, "failed": 0, "skipped": 1}
    skipped = [r for e in published for r in e.results if r["status"] == "skipped"]
    assert [(r["hostname"], r["reason"]) for r in skipped] == [("w-2", "still offline after 1 s")]


@pytest.mark.django_db(transaction=True)
async def test_a_host_the_requester_lost_the_right_to_is_skipped_at_its_turn(monkeypatch):
    from asgiref.sync import sync_to_async

    monkeypatch.setattr(fleetrunner, "publish_now", lambda event: None)
    ran: list[str] = []
    refused: set[str] = set()

    async def run_it(*, host: Host, **kwargs: Any) -> dict[str, Any]:
        ran.append(host.hostname)
        refused.add(str(later.id))  # withdrawn while the first batch runs
        return {"execution_id": None, "status": "completed", "exit_code": 0}

    def hosts_allowed(asker: Any, right: str, host_ids: Any) -> set[str]:
        assert right == "run_command"
        return {str(h) for h in host_ids} - refused

    monkeypatch.setattr(commands, "command_run_and_wait", run_it)
    monkeypatch.setattr(permissions, "hosts_allowed", hosts_allowed)

    def setup() -> tuple[FleetRun, Any, Host]:
        from django.contrib.auth import get_user_model

        from tests.conftest import grant

        user = get_user_model().objects.create_user("op")
        grant(user, "hosts.view_all_hosts")
        hosts = [host_services.host_create(hostname=f"r-{i}") for i in range(2)]
        Host.objects.update(status=HostStatus.ONLINE)
        spec = parse_fleet_run(
            {"targets": {"host_ids": [str(h.id) for h in hosts]}, "command": "x", "batch_size": 1}
        )
        return fleetruns.fleet_run_create(spec=spec, user=user), user, hosts[1]

    run, user, later = await sync_to_async(setup)()
    await FleetRunner(run, user, None).run()
    assert ran == ["r-0"]
    row = await sync_to_async(lambda: FleetRunHost.objects.get(run=run, hostname="r-1"))()
    assert (row.status, row.reason) == ("skipped", fleetrunner.WITHDRAWN)
