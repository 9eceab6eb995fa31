"""Applying updates and rebooting: the right ``patch_reboot`` (the model permission
``hosts.patch_host`` on every host in sight, or a host group grant with
``can_patch_and_reboot``), apart from running commands and package operations."""

from __future__ import annotations

import pytest

from hosts import services as host_services
from hosts.models import HostGroupGrant
from sysmanage import permissions

pytestmark = pytest.mark.django_db


@pytest.fixture
def fleet():
    web = [host_services.host_create(hostname=f"web-0{i}") for i in (1, 2)]
    db = host_services.host_create(hostname="db-01")
    group = host_services.host_group_create(name="web", host_ids=[h.pk for h in web])
    return group, [str(h.pk) for h in web], str(db.pk)


def grant(group, user, **flags) -> HostGroupGrant:
    return host_services.host_group_grant_save(HostGroupGrant(host_group=group, user=user, **flags))


def test_the_grant_flag_gives_the_right_on_the_group_hosts_only(make_user, fleet):
    group, web, db = fleet
    patcher = make_user("patcher", every_host=False)
    grant(group, patcher, can_patch_and_reboot=True)
    assert permissions.hosts_allowed(patcher, "patch_reboot", [*web, db]) == set(web)
    assert permissions.may_on_host(patcher, "patch_reboot", web[0])
    assert not permissions.may_on_host(patcher, "patch_reboot", db)


def test_running_commands_does_not_give_the_right(make_user, fleet):
    group, web, _ = fleet
    ops = make_user("ops", every_host=False)
    grant(group, ops, can_run_commands=True, can_run_package_operations=True)
    assert not permissions.may_on_host(ops, "patch_reboot", web[0])
    runner = make_user("runner", perms=["sysmanage.run_command"])
    assert not permissions.may_on_host(runner, "patch_reboot", web[0])
    assert "hosts.patch_host" in permissions.denial("patch_reboot")


def test_the_model_permission_gives_it_on_every_host_in_sight(make_user, fleet):
    _, web, db = fleet
    holder = make_user("holder", perms=["hosts.patch_host"])
    assert permissions.hosts_allowed(holder, "patch_reboot", [*web, db]) == {*web, db}
    assert permissions.may_on_host(make_user("root", superuser=True), "patch_reboot", db)
