"""The current state a subscriber of ``system_alerts``, ``command_execution`` or
``package_operations`` gets on subscribe: the providers (filters, redaction, bounds,
queries) and the ``status`` message through the consumer."""

from __future__ import annotations

import json

import pytest

from alerts import services as alert_services
from alerts.selectors import alert_snapshot
from hosts import services as host_services
from hosts.models import ExecutionStatus, OperationStatus
from hosts.selectors import command_snapshot, operation_snapshot
from sysmanage import permissions
from sysmanage.audit import Actor
from sysmanage.dbthreads import database_sync_to_async
from sysmanage.topics import NOBODY, TOPICS, Viewer, snapshot_provider
from tests.wsutil import next_event, open_socket, subscribe, subscribe_with_status

SECRET = "mysql -p'hunter2' -e 'select 1'"
PRIVATE = ("command", "stdout", "stderr", "error")


def filters(channel: str, **raw):
    """Filters as the consumer hands them to a provider: cleaned by the channel."""
    return TOPICS[channel].clean_filters(raw, None)


def viewer_of(user) -> Viewer:
    """The viewer a socket of ``user`` subscribes as: its id and rights from the database."""
    return Viewer(str(user.pk), permissions.socket_rights(permissions.fresh(user)))


def last_events(published, name: str, key: str) -> dict[str, dict]:
    """The payload of the last event ``name`` of each item (by ``key``)."""
    return {m["data"][key]: m["data"] for m in published.events(name)}


@pytest.fixture
def hosts(db):
    return (
        host_services.host_create(hostname="web-01"),
        host_services.host_create(hostname="db-01"),
    )


def test_the_state_channels_register_their_snapshots():
    assert snapshot_provider("system_alerts") is alert_snapshot
    assert snapshot_provider("command_execution") is command_snapshot
    assert snapshot_provider("package_operations") is operation_snapshot
    sending = {name for name, topic in TOPICS.items() if topic.sends_initial_state}
    assert sending == {
        "host_status",
        "fleet_status",
        "system_alerts",
        "command_execution",
        "package_operations",
    }
    assert all(snapshot_provider(name) is not None for name in sending)


# -- system_alerts ----------------------------------------------------------------------------


def raise_alerts(published, web, db):
    """Alerts in every state, on two hosts and none; returns them by name, oldest first."""
    admin = Actor(user=None, username="admin")

    def make(severity, host, title):
        return published.run(
            alert_services.alert_raise, severity=severity, category="disk", title=title, host=host
        )

    made = {
        "web_warning": make("warning", web, "web warning"),
        "web_critical": make("critical", web, "web critical"),
        "fleet_info": make("info", None, "fleet info"),
        "db_critical": make("critical", db, "db critical"),
        "web_resolved": make("critical", web, "web resolved"),
        "web_acknowledged": make("warning", web, "web acknowledged"),
    }
    published.run(alert_services.alert_resolve, alert_id=made["web_resolved"].id, actor=admin)
    published.run(
        alert_services.alert_acknowledge, alert_id=made["web_acknowledged"].id, actor=admin
    )
    return made


def test_alert_snapshot_lists_the_unresolved_alerts_newest_first_as_their_events(published, hosts):
    web, db = hosts
    made = raise_alerts(published, web, db)
    snapshot = alert_snapshot(filters("system_alerts"), NOBODY)
    names = ["web_acknowledged", "db_critical", "fleet_info", "web_critical", "web_warning"]
    assert [a["alert_id"] for a in snapshot["alerts"]] == [str(made[n].id) for n in names]
    assert (snapshot["count"], snapshot["truncated"]) == (5, False)
    # each item is the payload of the alert's last event: a client applies both alike
    events = last_events(published, "alert.changed", "alert_id")
    for item in snapshot["alerts"]:
        assert item == events[item["alert_id"]]
    acknowledged = snapshot["alerts"][0]
    assert (acknowledged["action"], acknowledged["status"]) == ("acknowledged", "acknowledged")
    assert {a["action"] for a in snapshot["alerts"][1:]} == {"raised"}
    assert snapshot["alerts"][2]["host_id"] is None


def test_alert_snapshot_honours_the_severity_and_host_filters(published, hosts):
    web, db = hosts
    made = raise_alerts(published, web, db)

    def listed(**raw):
        return [a["alert_id"] for a in alert_snapshot(filters("system_alerts", **raw))["alerts"]]

    assert listed(severity=["critical"]) == [
        str(made[n].id) for n in ("db_critical", "web_critical")
    ]
    assert listed(host_id=str(web.id), severity=["warning", "critical"]) == [
        str(made[n].id) for n in ("web_acknowledged", "web_critical", "web_warning")
    ]
    assert listed(host_id=str(db.id)) == [str(made["db_critical"].id)]  # not the host-less one
    assert listed(host_id=str(db.id), severity=["info", "warning"]) == []


def test_alert_snapshot_is_bounded_and_says_how_many_there_are(published, hosts, settings):
    settings.WS_SNAPSHOT_MAX_ITEMS = 3
    web, _ = hosts
    raised = [
        published.run(
            alert_services.alert_raise, severity="warning", category="x", title=f"a{i}", host=web
        )
        for i in range(5)
    ]
    snapshot = alert_snapshot(filters("system_alerts"), NOBODY)
    assert [a["title"] for a in snapshot["alerts"]] == ["a4", "a3", "a2"]
    assert (snapshot["count"], snapshot["truncated"]) == (5, True)
    for alert in raised[2:]:
        published.run(alert_services.alert_resolve, alert_id=alert.id, actor=None)
    exactly = alert_snapshot(filters("system_alerts"), NOBODY)
    assert [a["title"] for a in exactly["alerts"]] == ["a1", "a0"]
    assert (exactly["count"], exactly["truncated"]) == (2, False)


def test_alert_snapshot_stops_where_its_bytes_run_out(published, hosts, settings):
    settings.WS_SNAPSHOT_MAX_BYTES = 4096
    web, _ = hosts

    def alert(title, message=""):
        return published.run(
            alert_services.alert_raise,
            severity="info",
            category="x",
            title=title,
            message=message,
            host=web,
        )

    alert("oldest")
    alert("huge", "x" * 5000)  # larger than the whole budget: never listed
    for i in range(3):
        alert(f"small {i}", "y" * 1500)
    snapshot = alert_snapshot(filters("system_alerts"), NOBODY)
    # newest first: two fit in 4096 bytes, the third would not; nothing after it is read
    assert [a["title"] for a in snapshot["alerts"]] == ["small 2", "small 1"]
    assert (snapshot["count"], snapshot["truncated"]) == (5, True)
    assert len(json.dumps(snapshot["alerts"], separators=(",", ":"))) <= 4096
    settings.WS_SNAPSHOT_MAX_BYTES = 6000
    snapshot = alert_snapshot(filters("system_alerts"), NOBODY)
    assert [a["title"] for a in snapshot["alerts"]] == ["small 2", "small 1", "small 0"]
    assert (snapshot["count"], snapshot["truncated"]) == (5, True)


def test_alert_snapshot_of_a_quiet_fleet_is_empty(hosts):
    assert alert_snapshot(filters("system_alerts"), NOBODY) == {
        "alerts": [],
        "count": 0,
        "truncated": False,
    }


# -- command_execution ------------------------------------------------------------------------


@pytest.fixture
def people(make_user):
    return {
        "alice": make_user("alice", perms=["sysmanage.run_command"]),
        "bob": make_user("bob"),
        "auditor": make_user("auditor", perms=["hosts.view_command_output"]),
        "root": make_user("root", superuser=True),
    }


def run_commands(published, people, web, db):
    """alice's command running on web, bob's pending on db, and two that ended."""
    alice, bob = people["alice"], people["bob"]
    running = published.run(
        host_services.command_create, host=web, command=SECRET, timeout=30, user=alice
    )
    published.run(host_services.command_mark_running, execution_id=running.id, host_id=web.id)
    pending = published.run(
        host_services.command_create, host=db, command="uptime", timeout=30, user=bob
    )
    for status in (ExecutionStatus.COMPLETED, ExecutionStatus.TIMEOUT):
        ended = published.run(
            host_services.command_create, host=web, command="true", timeout=5, user=alice
        )
        published.run(host_services.command_finish, execution=ended, status=status, exit_code=0)
    return running, pending


def test_command_snapshot_lists_active_commands_redacted_as_their_events(published, hosts, people):
    web, db = hosts
    running, pending = run_commands(published, people, web, db)
    events = last_events(published, "command.updated", "execution_id")
    topic = TOPICS["command_execution"]
    everyone = filters("command_execution")
    sees = {
        # viewer: (sees alice's command, sees bob's command)
        "alice": (True, False),
        "bob": (False, True),
        "auditor": (True, True),
        "root": (True, True),
    }
    for name, (sees_alice, sees_bob) in sees.items():
        viewer = viewer_of(people[name])
        snapshot = command_snapshot(everyone, viewer)
        assert (snapshot["count"], snapshot["truncated"]) == (2, False)
        newest, oldest = snapshot["commands"]
        assert (newest["execution_id"], oldest["execution_id"]) == (
            str(pending.id),
            str(running.id),
        )
        assert (newest["status"], oldest["status"]) == ("pending", "running")
        for item, visible in ((oldest, sees_alice), (newest, sees_bob)):
            # exactly what the live event delivers to this viewer
            assert item == topic.present(everyone, viewer, events[item["execution_id"]])
            assert "requested_by_id" not in item
            assert item["redacted"] is (not visible), name
            assert item["final"] is False
            if visible:
                assert item["command"] in (SECRET, "uptime")
            else:
                assert all(item[field] is None for field in PRIVATE), item
        assert (oldest["requested_by"], oldest["hostname"]) == ("alice", "web-01")
        assert ("hunter2" in str(snapshot)) is sees_alice
    nobody = command_snapshot(everyone, NOBODY)
    assert all(item["redacted"] for item in nobody["commands"])


def test_command_snapshot_honours_the_host_filter(published, hosts, people):
    web, db = hosts
    running, pending = run_commands(published, people, web, db)
    on_web = command_snapshot(filters("command_execution", host_id=str(web.id)), NOBODY)
    assert [c["execution_id"] for c in on_web["commands"]] == [str(running.id)]
    on_db = command_snapshot(filters("command_execution", host_id=str(db.id)), NOBODY)
    assert [c["execution_id"] for c in on_db["commands"]] == [str(pending.id)]


def test_command_snapshot_is_bounded(published, hosts, people, settings):
    settings.WS_SNAPSHOT_MAX_ITEMS = 2
    web, _ = hosts
    made = [
        published.run(
            host_services.command_create,
            host=web,
            command=f"echo {i}",
            timeout=30,
            user=people["alice"],
        )
        for i in range(3)
    ]
    snapshot = command_snapshot(filters("command_execution"), viewer_of(people["alice"]))
    assert [c["command"] for c in snapshot["commands"]] == ["echo 2", "echo 1"]
    assert (snapshot["count"], snapshot["truncated"]) == (3, True)
    published.run(host_services.command_finish, execution=made[0], status=ExecutionStatus.FAILED)
    snapshot = command_snapshot(filters("command_execution"), viewer_of(people["alice"]))
    assert (len(snapshot["commands"]), snapshot["count"], snapshot["truncated"]) == (2, 2, False)


def test_command_snapshot_of_an_idle_fleet_is_empty(hosts):
    assert command_snapshot(filters("command_execution"), NOBODY) == {
        "commands": [],
        "count": 0,
        "truncated": False,
    }


# -- package_operations -----------------------------------------------------------------------


def start_operations(published, user, web, db):
    """On web: one operation pending, one in progress, one completed; one on db."""

    def create(host, package):
        return published.run(
            host_services.package_operation_create,
            host=host,
            operation="install",
            package=package,
            user=user,
        )

    pending = create(web, "nginx")
    progressing = create(web, "postgresql")
    published.run(
        host_services.package_operation_record_progress,
        operation_id=progressing.id,
        host_id=web.id,
        progress=40,
        message="Unpacking postgresql",
    )
    done = create(web, "curl")
    published.run(
        host_services.package_operation_record_result,
        operation_id=done.id,
        host_id=web.id,
        status=OperationStatus.COMPLETED,
        message="Installed curl",
        output="db_password=hunter2",
    )
    create(db, "redis")
    return pending, progressing


def test_operation_snapshot_lists_the_host_s_unfinished_operations_as_their_events(
    published, hosts, people
):
    web, db = hosts
    pending, progressing = start_operations(published, people["alice"], web, db)
    snapshot = operation_snapshot(filters("package_operations", host_id=str(web.id)), NOBODY)
    assert [o["execution_id"] for o in snapshot["operations"]] == [
        str(progressing.id),
        str(pending.id),
    ]
    assert (snapshot["count"], snapshot["truncated"]) == (2, False)
    events = last_events(published, "package_operation.updated", "execution_id")
    for item in snapshot["operations"]:
        assert item == events[item["execution_id"]]  # no output: the events carry none
    first = snapshot["operations"][0]
    assert (first["status"], first["progress"], first["message"]) == (
        "in_progress",
        40,
        "Unpacking postgresql",
    )
    assert snapshot["operations"][1]["status"] == "pending"
    on_db = operation_snapshot(filters("package_operations", host_id=str(db.id)), NOBODY)
    assert [o["package"] for o in on_db["operations"]] == ["redis"]


def test_operation_snapshot_is_bounded_and_empty_when_idle(published, hosts, people, settings):
    web, db = hosts
    assert operation_snapshot(filters("package_operations", host_id=str(web.id)), NOBODY) == {
        "operations": [],
        "count": 0,
        "truncated": False,
    }
    settings.WS_SNAPSHOT_MAX_ITEMS = 1
    start_operations(published, people["alice"], web, db)
    snapshot = operation_snapshot(filters("package_operations", host_id=str(web.id)), NOBODY)
    assert [o["package"] for o in snapshot["operations"]] == ["postgresql"]
    assert (snapshot["count"], snapshot["truncated"]) == (2, True)


# -- queries ----------------------------------------------------------------------------------


def fill(published, hosts, people, rows: int) -> None:
    """``rows`` active alerts, commands and package operations, spread over both hosts
    and several requesters."""
    requesters = [people["alice"], people["bob"], people["auditor"]]
    for i in range(rows):
        host, user = hosts[i % 2], requesters[i % 3]
        published.run(
            alert_services.alert_raise, severity="critical", category="x", title=f"{i}", host=host
        )
        published.run(
            host_services.command_create, host=host, command=f"echo {i}", timeout=30, user=user
        )
        published.run(
            host_services.package_operation_create,
            host=hosts[0],
            operation="install",
            package=f"p{i}",
            user=user,
        )


@pytest.mark.parametrize("rows", [2, 30])
def test_each_snapshot_is_one_query_however_many_rows_it_lists(
    published, hosts, people, rows, django_assert_num_queries
):
    fill(published, hosts, people, rows)
    viewer = viewer_of(people["bob"])
    web = str(hosts[0].id)
    with django_assert_num_queries(1):
        assert alert_snapshot(filters("system_alerts"), viewer)["count"] == rows
    with django_assert_num_queries(1):
        assert command_snapshot(filters("command_execution"), viewer)["count"] == rows
    with django_assert_num_queries(1):
        assert (
            operation_snapshot(filters("package_operations", host_id=web), viewer)["count"] == rows
        )


def test_a_truncated_snapshot_costs_one_count_query_more(
    published, hosts, people, settings, django_assert_num_queries
):
    fill(published, hosts, people, 12)
    settings.WS_SNAPSHOT_MAX_ITEMS = 5
    viewer = viewer_of(people["bob"])
    for provider, channel, raw in (
        (alert_snapshot, "system_alerts", {}),
        (command_snapshot, "command_execution", {}),
        (operation_snapshot, "package_operations", {"host_id": str(hosts[0].id)}),
    ):
        with django_assert_num_queries(2):
            snapshot = provider(filters(channel, **raw), viewer)
        assert (snapshot["count"], snapshot["truncated"]) == (12, True)


# -- through the socket -----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_each_subscriber_s_snapshot_is_the_running_command_as_its_events_show_it(
    make_user, token_for
):
    users = {
        "alice": await database_sync_to_async(make_user)("alice"),
        "bob": await database_sync_to_async(make_user)("bob"),
        "auditor": await database_sync_to_async(make_user)(
            "auditor", perms=["hosts.view_command_output"]
        ),
    }
    host = await database_sync_to_async(host_services.host_create)(hostname="web-01")
    sockets = {}
    for name, user in users.items():
        sockets[name] = comm = await open_socket("/ws", token=token_for(user))
        _, status = await subscribe_with_status(comm, "command_execution", id_="before")
        assert status["data"] == {"commands": [], "count": 0, "truncated": False}

    def start():
        execution = host_services.command_create(
            host=host, command=SECRET, timeout=30, user=users["alice"]
        )
        host_services.command_mark_running(execution_id=execution.id, host_id=host.id)

    await database_sync_to_async(start)()
    for name, comm in sockets.items():
        await next_event(comm, "command_execution")  # pending
        running = await next_event(comm, "command_execution")
        assert running["data"]["status"] == "running"
        # a subscriber arriving now (here: the same socket, subscribing again) is told
        # the same as the events told those who were there
        _, status = await subscribe_with_status(
            comm, "command_execution", {"host_id": str(host.id)}, id_="after"
        )
        assert status["data"] == {"commands": [running["data"]], "count": 1, "truncated": False}
        assert status["data"]["commands"][0]["redacted"] is (name == "bob")
        assert ("hunter2" in str(status)) is (name != "bob")
        await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_right_lost_without_a_signal_redacts_the_next_snapshot(make_user, token_for):
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    alice = await database_sync_to_async(make_user)("alice")
    auditor = await database_sync_to_async(make_user)(
        "auditor", perms=["hosts.view_command_output"]
    )
    host = await database_sync_to_async(host_services.host_create)(hostname="web-01")
    await database_sync_to_async(host_services.command_create)(
        host=host, command=SECRET, timeout=30, user=alice
    )
    comm = await open_socket("/ws", token=token_for(auditor))
    _, status = await subscribe_with_status(comm, "command_execution")
    assert status["data"]["commands"][0]["command"] == SECRET
    through = get_user_model().user_permissions.through
    await database_sync_to_async(
        through.objects.filter(
            user_id=auditor.pk,
            permission__in=Permission.objects.filter(codename="view_command_output"),
        ).delete
    )()  # no signal, no recheck yet: subscribing reads the rights afresh
    _, status = await subscribe_with_status(comm, "command_execution", id_="again")
    [item] = status["data"]["commands"]
    assert (item["command"], item["redacted"]) == (None, True)
    await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_alert_and_operation_snapshots_follow_the_response(make_user, token_for):
    viewer = await database_sync_to_async(make_user)("viewer")
    host = await database_sync_to_async(host_services.host_create)(hostname="web-01")
    alert = await database_sync_to_async(alert_services.alert_raise)(
        severity="critical", category="disk", title="Disk full", host=host
    )
    operation = await database_sync_to_async(host_services.package_operation_create)(
        host=host, operation="install", package="nginx", user=None
    )
    comm = await open_socket("/ws", token=token_for(viewer))
    reply, status = await subscribe_with_status(
        comm, "system_alerts", {"severity": ["critical"], "host_id": str(host.id)}, id_="al"
    )
    assert reply["data"]["filters"] == {"severity": ["critical"], "host_id": str(host.id)}
    [item] = status["data"]["alerts"]
    assert (item["alert_id"], item["action"], item["status"], item["hostname"]) == (
        str(alert.id),
        "raised",
        "open",
        "web-01",
    )
    _, status = await subscribe_with_status(
        comm, "package_operations", {"host_id": str(host.id)}, id_="ops"
    )
    [item] = status["data"]["operations"]
    assert (item["execution_id"], item["status"], item["progress"], item["final"]) == (
        str(operation.id),
        "pending",
        0,
        False,
    )
    # the subscriptions are live too
    await database_sync_to_async(alert_services.alert_resolve)(alert_id=alert.id, actor=None)
    event = await next_event(comm, "system_alerts")
    assert (event["data"]["alert_id"], event["data"]["status"]) == (str(alert.id), "resolved")
    await subscribe(comm, "system_alerts", id_="al2")
    status = await comm.receive_json_from(timeout=3)
    assert status["data"] == {"alerts": [], "count": 0, "truncated": False}
    await comm.disconnect()
