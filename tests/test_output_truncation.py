"""Outputs cut by an agent or by the server: the stored record, its events and its REST
representation say so (``*_truncated``, and the whole size in ``*_bytes`` when known),
and the server logs one line naming the host, the command and the sizes."""

from __future__ import annotations

import logging

import pytest
from rest_framework.test import APIClient

from hosts import agent_protocol
from hosts import services as hosts
from hosts.agent_protocol import MAX_OUTPUT_CHARS
from hosts.models import CommandExecution, OperationStatus, PackageOperation
from sysmanage.topics import TOPICS

pytestmark = pytest.mark.django_db


def clean(**data):
    return agent_protocol.clean_command_result(
        {"execution_id": "x", "status": "completed", "exit_code": 0, **data}, None
    )


def test_output_over_the_servers_limit_is_cut_and_flagged_with_its_size():
    result = clean(stdout="é" * (MAX_OUTPUT_CHARS + 1), stderr="warn")
    assert len(result["stdout"]) == MAX_OUTPUT_CHARS
    assert (result["stdout_truncated"], result["stdout_bytes"]) == (True, 2 * MAX_OUTPUT_CHARS + 2)
    assert (result["stderr_truncated"], result["stderr_bytes"]) == (False, 4)


def test_output_the_agent_cut_keeps_the_size_it_reported_or_none():
    reported = clean(stdout="abc", stdout_truncated=True, stdout_bytes=10_000_000)
    assert (reported["stdout_truncated"], reported["stdout_bytes"]) == (True, 10_000_000)
    assert "stdout truncated by the agent" in reported["error"]  # as before
    unknown = clean(stdout="abc", stdout_truncated=True, stdout_bytes="lots")
    assert (unknown["stdout_truncated"], unknown["stdout_bytes"]) == (True, None)


def test_package_output_over_the_limit_is_cut_and_flagged():
    result = agent_protocol.clean_package_result(
        {"status": "completed", "output": "x" * (MAX_OUTPUT_CHARS + 5), "message": "ok"}, None
    )
    assert (len(result["output"]), result["output_truncated"]) == (MAX_OUTPUT_CHARS, True)
    assert result["output_bytes"] == MAX_OUTPUT_CHARS + 5


@pytest.fixture
def host():
    return hosts.host_create(hostname="web-01")


def test_a_cut_result_is_stored_published_and_logged_once(published, host, make_user, caplog):
    user = make_user("alice", perms=["sysmanage.run_command"])
    execution = hosts.command_create(host=host, command="cat big", timeout=5, user=user)
    result = clean(stdout="x" * (MAX_OUTPUT_CHARS + 100))
    with caplog.at_level(logging.INFO, logger="hosts.services"):
        published.run(
            hosts.command_record_result, execution_id=execution.id, host_id=host.id, result=result
        )
    stored = CommandExecution.objects.get(id=execution.id)
    assert (stored.stdout_truncated, stored.stdout_bytes) == (True, MAX_OUTPUT_CHARS + 100)
    assert (stored.stderr_truncated, stored.stderr_bytes) == (False, 0)
    event = published.events("command.updated")[-1]["data"]
    assert (event["stdout_truncated"], event["stdout_bytes"]) == (True, MAX_OUTPUT_CHARS + 100)
    lines = [r for r in caplog.records if r.name == "hosts.services"]
    assert len(lines) == 1, lines
    assert lines[0].levelno == logging.WARNING
    text = lines[0].getMessage()
    assert all(
        part in text
        for part in (str(execution.id), "web-01", str(MAX_OUTPUT_CHARS + 100), "server's limit")
    ), text
    # who may not see the output does not see its size either, only that it was cut
    rendered = TOPICS["command_execution"].render_for({}, event, False)
    assert (rendered["stdout_truncated"], rendered["stdout_bytes"]) == (True, None)


def test_an_output_the_agent_cut_is_noted_not_warned(published, host, caplog):
    execution = hosts.command_create(host=host, command="dmesg", timeout=5, user=None)
    result = clean(stdout="x" * 100, stdout_truncated=True, stdout_bytes=5000)
    with caplog.at_level(logging.INFO, logger="hosts.services"):
        published.run(
            hosts.command_record_result, execution_id=execution.id, host_id=host.id, result=result
        )
    (line,) = [r for r in caplog.records if r.name == "hosts.services"]
    assert line.levelno == logging.INFO
    assert "5000 bytes cut to 100 characters by the agent" in line.getMessage()


def test_a_whole_output_logs_nothing(published, host, caplog):
    execution = hosts.command_create(host=host, command="true", timeout=5, user=None)
    with caplog.at_level(logging.INFO, logger="hosts.services"):
        published.run(
            hosts.command_record_result,
            execution_id=execution.id,
            host_id=host.id,
            result=clean(stdout="fine"),
        )
    assert [r for r in caplog.records if r.name == "hosts.services"] == []


def test_package_operation_cut_output_is_stored_published_logged_and_served(
    published, host, make_user, caplog
):
    user = make_user("root", superuser=True)
    operation = hosts.package_operation_create(
        host=host, operation="install", package="nginx", user=user
    )
    outcome = agent_protocol.clean_package_result(
        {"status": "completed", "output": "y" * (MAX_OUTPUT_CHARS + 1), "message": "ok"}, None
    )
    with caplog.at_level(logging.INFO, logger="hosts.services"):
        published.run(
            hosts.package_operation_record_result,
            operation_id=operation.id,
            host_id=host.id,
            **outcome,
        )
    stored = PackageOperation.objects.get(id=operation.id)
    assert (stored.status, stored.output_truncated) == (OperationStatus.COMPLETED, True)
    assert stored.output_bytes == MAX_OUTPUT_CHARS + 1
    assert published.events("package_operation.updated")[-1]["data"]["output_truncated"] is True
    (line,) = [r for r in caplog.records if r.name == "hosts.services"]
    assert str(operation.id) in line.getMessage()
    assert "web-01" in line.getMessage()
    client = APIClient()
    client.force_authenticate(user)
    for path in (f"/api/package-operations/{operation.id}/", "/api/package-operations/"):
        body = client.get(path).json()
        item = body if "id" in body else body["results"][0]
        assert (item["output_truncated"], item["output_bytes"]) == (True, MAX_OUTPUT_CHARS + 1)
