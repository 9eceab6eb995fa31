"""
Applying updates on a SysManage agent, as the unchanged agent takes it: the server spells
out the pending updates with their package managers (the agent has no "every update"
form), and the operation ends with the agent's ``update_apply_result`` (which names no
command), not with its ``command_result`` saying it started.
"""

from __future__ import annotations

import pytest

from hosts import patchapply, patching
from hosts import services as host_services
from hosts.models import AgentKind, OperationStatus, PackageOperation
from hosts.smagent import deliveries, protocol

REPORT = {
    "available_updates": [
        {
            "package_name": "openssl",
            "current_version": "3.0.11-1",
            "available_version": "3.0.13-1",
            "package_manager": "apt",
            "is_security_update": True,
        },
        {
            "package_name": "curl",
            "current_version": "7.88.1-10",
            "available_version": "7.88.1-11",
            "package_manager": "apt",
            "is_security_update": False,
        },
        # reported without its manager: cannot be applied
        {"package_name": "zlib1g", "available_version": "1:1.3", "is_security_update": False},
    ]
}


def test_the_updates_a_request_selects():
    pending = patching.updates_from_sysmanage(REPORT).updates
    assert {u["name"]: u.get("manager") for u in pending} == {
        "openssl": "apt",
        "curl": "apt",
        "zlib1g": None,
    }
    chosen, missing = patchapply.updates_to_apply(patchapply.ALL_UPDATES, pending)
    assert ([u["name"] for u in chosen], missing) == (["openssl", "curl", "zlib1g"], [])
    chosen, _ = patchapply.updates_to_apply(patchapply.SECURITY_UPDATES, pending)
    assert [u["name"] for u in chosen] == ["openssl"]
    chosen, missing = patchapply.updates_to_apply("curl gone", pending)
    assert ([u["name"] for u in chosen], missing) == (["curl"], ["gone"])


def test_started_in_the_background_is_not_an_outcome():
    started = {"success": True, "result": {"result": "Updates started in background"}}
    assert protocol.apply_started(started)
    assert not protocol.apply_started({"success": False, "error": "No packages specified"})
    assert not protocol.apply_started({"success": True, "result": {"updated_packages": []}})


def test_an_apply_result_says_what_was_updated_and_what_failed():
    names, outcome = protocol.apply_result(
        {
            "updated_packages": [
                {"package_name": "curl", "old_version": "1", "new_version": "2"},
                "not an object",
            ],
            "failed_packages": [{"package_name": "openssl", "error": "E: held"}, {"x": 1}],
        }
    )
    assert names == {"curl", "openssl"}
    assert outcome["status"] == "failed"
    assert outcome["message"] == "1 of 2 updates failed: openssl"
    assert outcome["output"] == "curl: 1 -> 2\nopenssl: FAILED: E: held"
    names, outcome = protocol.apply_result({"updated_packages": None})
    assert (names, outcome["status"], outcome["message"]) == (
        set(),
        "completed",
        "Applied 0 updates",
    )


def _apply(host, target: str) -> PackageOperation:
    return host_services.package_operation_create(
        host=host, operation="upgrade", package=target, user=None
    )


@pytest.mark.django_db
def test_the_agent_gets_the_list_and_its_report_ends_the_operation():
    host = host_services.host_create(hostname="sm-1", agent_kind=AgentKind.SYSMANAGE)
    host_services.host_patch_updates_save(
        host_id=host.pk, report=patching.updates_from_sysmanage(REPORT)
    )
    first, second = _apply(host, "*"), _apply(host, "curl gone")
    sent = deliveries.take_due(host.pk)
    parameters = [out.message["data"]["parameters"] for out in sent]
    assert [p["packages"] for p in parameters] == [
        [
            {"package_name": "openssl", "package_manager": "apt"},
            {"package_name": "curl", "package_manager": "apt"},
        ],
        [{"package_name": "curl", "package_manager": "apt"}],
    ]
    second.refresh_from_db()
    assert second.message == "Sent to the agent: 1 update; not pending, left out: gone"
    first.refresh_from_db()
    assert "no package manager reported, left out: zlib1g" in first.message

    # "started" keeps it going; the report ends the oldest one naming its packages
    for out in sent:
        deliveries.record_result(
            host_id=host.pk,
            data={
                "command_id": out.message["message_id"],
                "success": True,
                "result": {"result": "Updates started in background"},
            },
        )
    first.refresh_from_db()
    assert (first.status, first.progress) == (OperationStatus.IN_PROGRESS, 50)
    report = {
        "updated_packages": [{"package_name": "curl", "old_version": "1", "new_version": "2"}]
    }
    assert deliveries.record_apply_result(host_id=host.pk, data=report)
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, first.message) == (OperationStatus.COMPLETED, "Applied 1 update")
    assert second.status == OperationStatus.IN_PROGRESS
    assert deliveries.record_apply_result(host_id=host.pk, data=report)
    second.refresh_from_db()
    assert second.status == OperationStatus.COMPLETED
    # a report repeated, or of updates nobody here asked for, ends nothing
    assert not deliveries.record_apply_result(host_id=host.pk, data=report)


@pytest.mark.django_db
def test_nothing_to_apply_ends_without_a_word_to_the_agent():
    host = host_services.host_create(hostname="sm-2", agent_kind=AgentKind.SYSMANAGE)
    host_services.host_patch_updates_save(
        host_id=host.pk, report=patching.updates_from_sysmanage({"available_updates": []})
    )
    idle, missing = _apply(host, "*"), _apply(host, "gone")
    assert deliveries.take_due(host.pk) == []
    idle.refresh_from_db()
    missing.refresh_from_db()
    assert idle.status == OperationStatus.COMPLETED
    assert idle.message.startswith("No pending updates to apply")
    assert (missing.status, missing.message) == (
        OperationStatus.FAILED,
        "Nothing to apply: not pending, left out: gone",
    )
