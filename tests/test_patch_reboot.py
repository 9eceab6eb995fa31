"""Applying updates and rebooting: the right ``patch_reboot`` (the model permission
``hosts.patch_host`` on every host in sight, or a host group grant with
``can_patch_and_reboot``), apart from running commands and package operations."""

from __future__ import annotations

import json
import uuid

import pytest
from django.test import Client
from rest_framework.test import APIClient

from hosts import fleetruns, patchapply
from hosts import services as host_services
from hosts.commands import parse_package_operation
from hosts.models import (
    PACKAGE_CHANGES,
    FleetRunKind,
    Host,
    HostGroupGrant,
    HostPatchStatus,
    HostStatus,
    OperationStatus,
    PackageOperation,
)
from sysmanage import permissions
from sysmanage.protocol import ProtocolError, parse_client_message


@pytest.fixture
def fleet(db):
    web = [host_services.host_create(hostname=f"web-0{i}") for i in (1, 2)]
    db = host_services.host_create(hostname="db-01")
    group = host_services.host_group_create(name="web", host_ids=[h.pk for h in web])
    return group, [str(h.pk) for h in web], str(db.pk)


def grant(group, user, **flags) -> HostGroupGrant:
    return host_services.host_group_grant_save(HostGroupGrant(host_group=group, user=user, **flags))


@pytest.mark.django_db
def test_the_grant_flag_gives_the_right_on_the_group_hosts_only(make_user, fleet):
    group, web, db = fleet
    patcher = make_user("patcher", every_host=False)
    grant(group, patcher, can_patch_and_reboot=True)
    assert permissions.hosts_allowed(patcher, "patch_reboot", [*web, db]) == set(web)
    assert permissions.may_on_host(patcher, "patch_reboot", web[0])
    assert not permissions.may_on_host(patcher, "patch_reboot", db)


@pytest.mark.django_db
def test_running_commands_does_not_give_the_right(make_user, fleet):
    group, web, _ = fleet
    ops = make_user("ops", every_host=False)
    grant(group, ops, can_run_commands=True, can_run_package_operations=True)
    assert not permissions.may_on_host(ops, "patch_reboot", web[0])
    runner = make_user("runner", perms=["sysmanage.run_command"])
    assert not permissions.may_on_host(runner, "patch_reboot", web[0])
    assert "hosts.patch_host" in permissions.denial("patch_reboot")


@pytest.mark.django_db
def test_the_model_permission_gives_it_on_every_host_in_sight(make_user, fleet):
    _, web, db = fleet
    holder = make_user("holder", perms=["hosts.patch_host"])
    assert permissions.hosts_allowed(holder, "patch_reboot", [*web, db]) == {*web, db}
    assert permissions.may_on_host(make_user("root", superuser=True), "patch_reboot", db)


# -- what a request to apply updates may say -------------------------------------------


@pytest.mark.parametrize(
    ("body", "target"),
    [
        ({}, "*"),
        ({"which": "all"}, "*"),
        ({"which": "security", "packages": []}, "*security"),
        ({"which": "packages", "packages": ["curl", "libssl3", "curl"]}, "curl libssl3"),
    ],
)
def test_requests_to_apply_updates(body, target):
    assert patchapply.parse_updates_request(body).target == target


@pytest.mark.parametrize(
    "body",
    [
        {"which": "everything"},
        {"which": "packages"},
        {"which": "packages", "packages": []},
        {"which": "packages", "packages": "curl"},
        {"which": "packages", "packages": ["-y"]},
        {"which": "packages", "packages": ["a b"]},
        {"which": "packages", "packages": ["*"]},
        {"which": "packages", "packages": [f"package-{i:03}" for i in range(40)]},
        {"which": "all", "packages": ["curl"]},
    ],
)
def test_requests_that_cannot_be_carried_out(body):
    with pytest.raises(patchapply.PatchRequestError):
        patchapply.parse_updates_request(body)


def test_package_operation_requests_cannot_apply_updates_or_reboot():
    """The ``package_operations`` command and package fleet runs need only the right to
    run package operations: they may not name the kinds that need ``patch_reboot``."""
    assert set(patchapply.PATCH_KINDS).isdisjoint(PACKAGE_CHANGES)
    message = parse_client_message(
        json.dumps(
            {
                "type": "command",
                "channel": "package_operations",
                "id": "1",
                "data": {"host_id": str(uuid.uuid4()), "operation": "reboot", "package": "x"},
            }
        )
    )
    with pytest.raises(ProtocolError, match="'operation' must be one of install, remove, update"):
        parse_package_operation(message)


# -- REST ---------------------------------------------------------------------------------


def rest(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.mark.django_db(transaction=True)
def test_rest_refuses_without_the_right_and_hides_hosts_out_of_sight(make_user, fleet):
    group, web, db = fleet
    Host.objects.filter(id__in=[*web, db]).update(status=HostStatus.ONLINE)
    ops = make_user("ops", every_host=False)
    grant(group, ops, can_run_commands=True, can_run_package_operations=True)
    for path in ("apply-updates", "reboot"):
        assert rest(ops).post(f"/api/hosts/{web[0]}/{path}/", {}, format="json").status_code == 403
        assert rest(ops).post(f"/api/hosts/{db}/{path}/", {}, format="json").status_code == 404
    assert not PackageOperation.objects.exists()

    patcher = make_user("patcher", every_host=False)
    grant(group, patcher, can_patch_and_reboot=True)
    answer = rest(patcher).post(f"/api/hosts/{web[0]}/reboot/", {}, format="json")
    assert answer.status_code == 202, answer.content
    assert (answer.json()["operation"], answer.json()["status"]) == ("reboot", "pending")
    bad = rest(patcher).post(f"/api/hosts/{web[1]}/apply-updates/", {"which": "x"}, format="json")
    assert bad.status_code == 400
    Host.objects.filter(id=web[1]).update(status=HostStatus.OFFLINE)
    offline = rest(patcher).post(f"/api/hosts/{web[1]}/apply-updates/", {}, format="json")
    assert offline.status_code == 409


# -- the wait for a rebooted host --------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("result_first", [True, False])
def test_a_reboot_ends_when_the_host_is_back_whichever_comes_first(make_user, fleet, result_first):
    _, web, _ = fleet
    host = Host.objects.get(id=web[0])
    operation = patchapply.host_reboot(host=host, user=None)
    PackageOperation.objects.filter(id=operation.id).update(status=OperationStatus.IN_PROGRESS)

    def result() -> None:
        host_services.package_operation_record_result(
            operation_id=operation.id,
            host_id=host.id,
            status="completed",
            message="The reboot began",
            output="",
        )

    def hello() -> None:
        host_services.host_agent_hello(host_id=host.id, session="s2", facts={})

    first, second = (result, hello) if result_first else (hello, result)
    first()
    operation.refresh_from_db()
    assert operation.status == OperationStatus.IN_PROGRESS
    second()
    operation.refresh_from_db()
    assert operation.status == OperationStatus.COMPLETED
    assert operation.message.startswith("Rebooted: the host is back online after")
    assert HostPatchStatus.objects.get(host=host).check_requested_at is not None


@pytest.mark.django_db(transaction=True)
def test_a_host_that_does_not_come_back_fails_the_reboot(fleet):
    _, web, _ = fleet
    host = Host.objects.get(id=web[0])
    operation = patchapply.host_reboot(host=host, user=None)
    PackageOperation.objects.filter(id=operation.id).update(status=OperationStatus.IN_PROGRESS)
    host_services.package_operation_record_result(
        operation_id=operation.id, host_id=host.id, status="completed", message="", output=""
    )
    # the stall sweep leaves a reboot waiting for its host alone; its own bound ends it
    assert host_services.package_operations_expire_overdue(silent_for=0) == 0
    assert host_services.reboots_expire_overdue(within=60) == 0
    assert host_services.reboots_expire_overdue(within=0) == 1
    operation.refresh_from_db()
    assert operation.status == OperationStatus.FAILED
    assert operation.message == "The host did not come back within 0s of the reboot"


# -- fleet runs of kind patch and reboot ---------------------------------------------------

TARGETS = {"targets": {"groups": ["web"]}}


def test_fleet_runs_that_apply_updates_or_reboot():
    patch = fleetruns.parse_fleet_run({**TARGETS, "which": "security"}, FleetRunKind.PATCH)
    assert (patch.command, patch.operation, patch.package) == (
        "apply security updates",
        "upgrade",
        "*security",
    )
    assert patch.timeout == 1800
    named = {**TARGETS, "which": "packages", "packages": ["curl"], "batch_size": 2}
    assert fleetruns.parse_fleet_run(named, FleetRunKind.PATCH).package == "curl"
    reboot = fleetruns.parse_fleet_run({**TARGETS, "timeout": 120}, FleetRunKind.REBOOT)
    assert (reboot.command, reboot.operation, reboot.package) == ("reboot", "reboot", "")
    assert reboot.timeout == 120
    with pytest.raises(ValueError, match="'which' must be one of"):
        fleetruns.parse_fleet_run({**TARGETS, "which": "most"}, FleetRunKind.PATCH)
    # a package run cannot be turned into either
    with pytest.raises(ValueError, match="'operation' must be one of install, remove, update"):
        fleetruns.parse_fleet_run({**TARGETS, "operation": "reboot", "package": "x"}, "package")


@pytest.mark.django_db(transaction=True)
def test_fleet_runs_that_reboot_need_the_right_on_every_host(make_user, fleet):
    group, _, _ = fleet
    ops = make_user("ops", every_host=False)
    grant(group, ops, can_run_commands=True, can_run_package_operations=True)
    spec = fleetruns.parse_fleet_run(TARGETS, FleetRunKind.REBOOT)
    with pytest.raises(fleetruns.FleetRunRefused, match="apply updates and reboot on 2 of the 2"):
        fleetruns.fleet_run_create(spec=spec, user=ops)
    patcher = make_user("patcher", every_host=False)
    grant(group, patcher, can_patch_and_reboot=True)
    run = fleetruns.fleet_run_create(spec=spec, user=patcher)
    assert (run.kind, run.total, run.operation) == ("reboot", 2, "reboot")


# -- the host page -------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_host_page_offers_updates_and_reboot_to_holders_of_the_right(make_user, fleet):
    group, web, _ = fleet
    ops = make_user("ops", perms=["sysmanage.run_command"])
    patcher = make_user("patcher", every_host=False)
    grant(group, patcher, can_patch_and_reboot=True)
    pages = {}
    for user in (ops, patcher):
        client = Client()
        client.force_login(user)
        page = client.get(f"/hosts/{web[0]}/")
        assert page.status_code == 200
        pages[user.username] = page.content.decode()
    assert 'id="check-updates"' in pages["ops"]
    assert 'id="apply-updates"' not in pages["ops"]
    assert 'id="reboot-host"' not in pages["ops"]
    assert 'id="apply-updates"' in pages["patcher"]
    assert 'id="reboot-host"' in pages["patcher"]
    assert '<option value="security">security updates only</option>' in pages["patcher"]
