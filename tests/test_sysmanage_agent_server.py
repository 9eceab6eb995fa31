"""The SysManage agent's server side below the network: message checks and translation,
enrollment policy, connection tokens, the command queue, and the socket consumer."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from channels.testing import WebsocketCommunicator
from django.db import IntegrityError
from django.utils import timezone

from hosts import services
from hosts.agent_protocol import MAX_OUTPUT_CHARS
from hosts.models import (
    AgentDelivery,
    AgentKind,
    AgentRegistration,
    CommandExecution,
    DeliveryState,
    ExecutionStatus,
    Host,
    HostStatus,
    OperationStatus,
    PackageOperation,
    RegistrationStatus,
)
from hosts.smagent import deliveries, enrollment, protocol, tokens
from hosts.smagent.enrollment import EnrollmentRefused, RegistrationRequest
from hosts.smagent.protocol import AgentProtocolError
from sysmanage.asgi import application
from sysmanage.dbthreads import database_sync_to_async
from tests.wsutil import expect_close

# -- helpers ---------------------------------------------------------------------------------


def registration(hostname="web-01", key=None) -> RegistrationRequest:
    return RegistrationRequest(
        hostname=hostname,
        fqdn=f"{hostname}.example.com",
        ip_addresses=["192.0.2.7"],
        agent_version="1.0",
        key=key,
        details={},
    )


def submit(hostname="web-01", key=None, address="192.0.2.7"):
    return enrollment.registration_submit(
        request=registration(hostname, key), remote_address=address
    )


def approved_host(hostname="web-01"):
    """An approved SysManage-agent host and its host token."""
    outcome = submit(hostname)
    enrollment.registration_approve(registration_id=outcome.body["id"])
    return Host.objects.get(id=outcome.body["id"]), outcome.body["host_token"]


def now_iso():
    return datetime.now(UTC).isoformat()


def message(type_, data=None, **extra):
    body = {"message_type": type_, "message_id": str(uuid.uuid4()), "timestamp": now_iso(), **extra}
    if data is not None:
        body["data"] = data
    return body


# -- messages ----------------------------------------------------------------------------------


def test_envelopes_are_checked():
    good = message("heartbeat", {"agent_status": "healthy"})
    assert protocol.check_envelope(good) == ("heartbeat", good["message_id"], good["data"])
    for broken, why in [
        ({**good, "message_id": "short-id"}, "message_id"),
        ({**good, "message_id": "x" * 19 + "!"}, "message_id"),
        ({**good, "message_type": 7}, "message_type"),
        (
            {**good, "timestamp": (datetime.now(UTC) - timedelta(minutes=31)).isoformat()},
            "30 minutes",
        ),
        ({**good, "timestamp": "yesterday"}, "ISO-8601"),
        ({**good, "data": [1]}, "'data'"),
    ]:
        with pytest.raises(AgentProtocolError) as caught:
            protocol.check_envelope(broken)
        assert caught.value.error_type == "invalid_message"
        assert why in caught.value.message


def test_polled_messages_need_no_timestamp_and_flat_messages_keep_their_fields():
    polled = {"message_type": "heartbeat", "message_id": str(uuid.uuid4()), "data": {}}
    assert protocol.check_envelope(polled, polled=True)[0] == "heartbeat"
    with pytest.raises(AgentProtocolError):
        protocol.check_envelope(polled)
    flat = message("script_execution_result", execution_id="e1", exit_code=0)
    assert protocol.check_envelope(flat)[2] == {"execution_id": "e1", "exit_code": 0}


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"text"', "[" * 100000])
def test_frames_must_be_json_objects(text):
    with pytest.raises(AgentProtocolError) as caught:
        protocol.decode(text)
    assert caught.value.to_message()["error_type"] == "invalid_message"


def test_shell_results_are_read_from_the_doubly_nested_result():
    data = {
        "command_id": "c",
        "command_type": "execute_shell",
        "success": True,
        "result": {"result": {"stdout": "hi\n", "stderr": "", "exit_code": 0}},
        "error": None,
        "exit_code": 0,
    }
    assert protocol.shell_result(data, 0.15) == {
        "status": "completed",
        "exit_code": 0,
        "stdout": "hi\n",
        "stderr": "",
        "execution_time": 0.15,
        "error": "",
        "stdout_truncated": False,
        "stderr_truncated": False,
        "stdout_bytes": 3,
        "stderr_bytes": 0,
    }
    failed = {
        **data,
        "success": False,
        "exit_code": 3,
        "result": {"result": {"stdout": "", "stderr": "no\n", "exit_code": 3}},
    }
    assert protocol.shell_result(failed, 1)["status"] == "failed"
    assert protocol.shell_result(failed, 1)["exit_code"] == 3
    timed_out = {
        "success": False,
        "exit_code": -1,
        "error": "Command timed out after 5 seconds",
        "result": {"stdout": "", "stderr": "Command timed out", "exit_code": -1},
    }
    assert protocol.shell_result(timed_out, 5)["status"] == "timeout"
    nul = {**data, "result": {"result": {"stdout": "a\x00b", "stderr": "", "exit_code": 0}}}
    assert "\x00" not in protocol.shell_result(nul, 0)["stdout"]


def test_shell_output_over_the_limit_is_cut_and_flagged_with_its_size():
    big = "é" * (MAX_OUTPUT_CHARS + 10)
    data = {"success": True, "exit_code": 0, "result": {"result": {"stdout": big, "stderr": "e"}}}
    outcome = protocol.shell_result(data, 1.0)
    assert len(outcome["stdout"]) == MAX_OUTPUT_CHARS
    assert (outcome["stdout_truncated"], outcome["stdout_bytes"]) == (True, len(big) * 2)
    assert (outcome["stderr_truncated"], outcome["stderr_bytes"]) == (False, 1)


def test_package_results():
    ok = {
        "success": True,
        "result": {
            "request_id": "r",
            "successful_packages": ["x"],
            "failed_packages": [],
            "installation_log": "done",
        },
    }
    assert protocol.package_result(ok) == {
        "status": "completed",
        "message": "",
        "output": "done",
        "output_truncated": False,
        "output_bytes": 4,
    }
    bad = {
        "success": False,
        "error": "apt failed",
        "result": {"failed_packages": [{"package": "x"}], "uninstall_log": ["a", "b"]},
    }
    failed = protocol.package_result(bad)
    assert (failed["status"], failed["message"], failed["output"]) == (
        "failed",
        "apt failed",
        "a\nb",
    )
    huge = {**ok, "result": {"installation_log": "x" * (MAX_OUTPUT_CHARS + 1)}}
    cut = protocol.package_result(huge)
    assert (len(cut["output"]), cut["output_truncated"]) == (MAX_OUTPUT_CHARS, True)
    assert cut["output_bytes"] == MAX_OUTPUT_CHARS + 1


def test_samples_become_host_metrics():
    prefix = protocol.METRIC_PREFIX
    samples = [
        {"metric_id": prefix + "cpu_usage", "value": 12.5, "status": "ok"},
        {"metric_id": prefix + "memory_usage", "value": 140, "status": "ok"},
        {"metric_id": prefix + "disk:/", "value": 40.0, "status": "ok"},
        {
            "metric_id": prefix + "disk:/var",
            "value": None,
            "status": "error",
            "error_detail": "boom",
        },
        {"metric_id": prefix + "load_1", "value": 0.5, "status": "ok"},
        {"metric_id": prefix + "load_5", "value": 0.25, "status": "ok"},
        {"metric_id": "someone-else", "value": 3, "status": "ok"},
    ]
    assert protocol.metrics_from_samples(samples) == {
        "cpu_usage": 12.5,
        "memory_usage": 100.0,
        "disk_usage": {"/": 40.0},
    }
    samples.append({"metric_id": prefix + "load_15", "value": 0.125, "status": "ok"})
    assert protocol.metrics_from_samples(samples)["load_average"] == [0.5, 0.25, 0.12]
    assert protocol.metrics_from_samples([{"metric_id": "x", "value": 1, "status": "ok"}]) is None
    with pytest.raises(AgentProtocolError):
        protocol.metrics_from_samples({"not": "a list"})


def test_the_metric_scripts_measure_this_machine():
    mounts = protocol.mounts_from_hardware(
        {
            "storage_devices": [
                {"mount_point": "/"},
                {"mount_point": "/proc"},
                {"mount_point": ""},
                {"mount_point": "/"},
                {"name": "no mount"},
            ]
        }
    )
    assert mounts == ["/"]
    definitions = protocol.metric_definitions(mounts, 60)
    assert {d["id"][len(protocol.METRIC_PREFIX) :] for d in definitions} == {
        "cpu_usage",
        "memory_usage",
        "load_1",
        "load_5",
        "load_15",
        "disk:/",
    }
    samples = []
    for definition in definitions:
        assert definition["interpreter"] == "python3"
        assert definition["cadence_seconds"] == 60
        run = subprocess.run(
            [sys.executable, "-c", definition["script"]],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        samples.append(
            {"metric_id": definition["id"], "value": float(run.stdout.split()[-1]), "status": "ok"}
        )
    metrics = protocol.metrics_from_samples(samples)
    assert set(metrics) == {"cpu_usage", "memory_usage", "disk_usage", "load_average"}
    assert 0 < metrics["memory_usage"] < 100
    assert 0 < metrics["disk_usage"]["/"] <= 100


def test_a_mount_point_cannot_inject_code_into_the_disk_script():
    evil = "/x'); import os; os.system('touch /tmp/pwned'); ('"
    script = protocol.metric_definitions([evil], 60)[-1]["script"]
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert run.returncode != 0
    assert "FileNotFoundError" in run.stderr


def test_facts_from_system_info_and_hardware():
    facts = protocol.facts_from_system_info(
        {
            "fqdn": "web-01.example.com",
            "platform": "Linux",
            "platform_release": "Debian GNU/Linux 12",
            "platform_version": "6.1.0-28",
            "machine_architecture": "x86_64",
            "ipv4": "192.0.2.7",
            "ipv6": "fe80::1%eth0",
            "os_info": {"distribution": "Debian GNU/Linux", "distribution_version": "12"},
            "agent_version": "1.4.0",
        }
    )
    assert facts == {
        "fqdn": "web-01.example.com",
        "os_name": "Debian GNU/Linux",
        "os_version": "12",
        "kernel": "6.1.0-28",
        "architecture": "x86_64",
        "agent_version": "1.4.0",
        "ip_addresses": ["192.0.2.7", "fe80::1"],
    }
    assert protocol.facts_from_hardware(
        {"cpu_cores": 4, "cpu_threads": 8, "memory_total_mb": 2048}
    ) == {"cpu_count": 8, "memory_total": 2048 * 2**20}
    assert protocol.facts_from_hardware({"cpu_threads": True, "memory_total_mb": "x"}) == {}


def test_stored_reports_hold_no_nul_characters():
    nested: dict = {"a\x00": ["b\x00", {"c": "d\x00e"}], "n": 1.5, "t": None}
    assert protocol.storable(nested) == {
        "a\ufffd": ["b\ufffd", {"c": "d\ufffde"}],
        "n": 1.5,
        "t": None,
    }
    deep: list = []
    for _ in range(40):
        deep = [deep]
    assert "null" in json.dumps(protocol.storable(deep))


def test_frames_to_the_agent_stay_under_one_mebibyte():
    small = protocol.command_message("d" * 36, "execute_shell", {"command": "x"}, 30)
    assert json.loads(protocol.encode(small))["queue_message_id"] == "d" * 36
    with pytest.raises(ValueError, match="exceeds the agent's 1 MiB limit"):
        protocol.encode(
            protocol.command_message("d", "execute_shell", {"command": "x" * 1024 * 1024}, 30)
        )


def test_poll_replies_nest_everything_but_type_and_id_in_data():
    command = protocol.command_message("q" * 36, "execute_shell", {"command": "id"}, 30)
    polled = protocol.for_polling(command)
    merged = {
        "message_type": polled["message_type"],
        "message_id": polled["message_id"],
        **polled["data"],
    }  # what the agent does with a polled message
    assert merged["queue_message_id"] == "q" * 36
    assert merged["data"]["parameters"] == {"command": "id"}


# -- enrollment --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_new_agent_waits_for_approval_and_keeps_its_identity():
    first = submit()
    assert first.status == 201
    assert first.body["approved"] is False
    assert not Host.objects.exists()
    assert submit().status == 409  # the agent keeps the id and token it got
    with pytest.raises(EnrollmentRefused) as caught:
        enrollment.connection_token_issue("web-01")
    assert caught.value.status == 403
    host = enrollment.registration_approve(registration_id=first.body["id"])
    assert str(host.id) == first.body["id"]
    assert host.agent_kind == AgentKind.SYSMANAGE
    assert enrollment.host_token_matches(host, first.body["host_token"])
    assert enrollment.connection_token_name(enrollment.connection_token_issue("web-01")) == "web-01"
    with pytest.raises(EnrollmentRefused):
        enrollment.registration_approve(registration_id=first.body["id"])


@pytest.mark.django_db
def test_rejected_registrations_are_refused_until_deleted():
    record = submit().body
    enrollment.registration_reject(registration_id=record["id"])
    with pytest.raises(EnrollmentRefused) as caught:
        submit()
    assert caught.value.status == 403
    with pytest.raises(EnrollmentRefused):
        enrollment.connection_token_issue("web-01")
    AgentRegistration.objects.all().delete()
    assert submit().status == 201


@pytest.mark.django_db
def test_registration_keys_approve_at_once_within_their_limits():
    key, secret = enrollment.key_create(name="rollout", max_uses=2)
    assert KeyLike(secret)
    assert key.key_hash != secret
    outcome = submit("web-01", secret)
    assert outcome.status == 201
    assert outcome.body["approved"] is True
    assert Host.objects.get(id=outcome.body["id"]).hostname == "web-01"
    assert submit("web-02", secret).status == 201
    with pytest.raises(EnrollmentRefused, match="used up"):
        submit("web-03", secret)
    with pytest.raises(EnrollmentRefused, match="Unknown"):
        submit("web-03", "smrk_nonsense")
    revoked, revoked_secret = enrollment.key_create(name="old")
    enrollment.key_revoke(key_id=revoked.id)
    with pytest.raises(EnrollmentRefused, match="revoked"):
        submit("web-03", revoked_secret)
    _, expired = enrollment.key_create(
        name="past", expires_at=timezone.now() - timedelta(seconds=1)
    )
    with pytest.raises(EnrollmentRefused, match="expired"):
        submit("web-03", expired)
    assert not Host.objects.filter(hostname="web-03").exists()


def KeyLike(secret: str) -> bool:  # noqa: N802 - reads as a predicate in the test
    return secret.startswith(enrollment.KEY_PREFIX) and len(secret) > 30


@pytest.mark.django_db
def test_a_key_approves_a_waiting_registration_but_never_reenrolls_a_known_host():
    waiting = submit().body
    key, secret = enrollment.key_create(name="k", max_uses=2)
    outcome = submit("web-01", secret)
    assert outcome.status == 201
    assert outcome.body["id"] == waiting["id"]
    host = Host.objects.get(id=waiting["id"])
    assert enrollment.host_token_matches(host, outcome.body["host_token"])
    assert not enrollment.host_token_matches(host, waiting["host_token"])
    # The agent registers on every start with the key in its configuration: nothing
    # changes and the key is not used up (nor checked: revoking it stops no agent).
    for _ in range(3):
        assert submit("web-01", secret).status == 409
    enrollment.key_revoke(key_id=key.id)
    assert submit("web-01", secret).status == 409
    key.refresh_from_db()
    assert key.uses == 1
    assert enrollment.host_token_matches(Host.objects.get(id=host.id), outcome.body["host_token"])


@pytest.mark.django_db
def test_an_agent_that_lost_its_identity_registers_again_once_allowed_and_approved():
    host, old_token = approved_host()
    assert submit().status == 409
    enrollment.allow_reregistration(host_id=host.id)
    again = submit(address="192.0.2.99")
    # The first registration in the window waits for staff; it hands over nothing.
    assert again.status == 201
    assert again.body["approved"] is False
    assert again.body["id"] == str(host.id)
    host.refresh_from_db()
    assert enrollment.host_token_matches(host, old_token)
    assert not enrollment.host_token_matches(host, again.body["host_token"])
    assert (
        enrollment.prove(name="web-01", host_id=host.id, host_token=again.body["host_token"])
        is enrollment.Proof.AWAITING_APPROVAL
    )
    assert submit().status == 409  # the window closed with the first registration
    record = AgentRegistration.objects.get(for_host=host, status=RegistrationStatus.PENDING)
    assert record.remote_address == "192.0.2.99"
    assert enrollment.registration_approve(registration_id=record.id) == host
    host.refresh_from_db()
    assert enrollment.host_token_matches(host, again.body["host_token"])
    assert not enrollment.host_token_matches(host, old_token)
    assert (
        enrollment.prove(name="web-01", host_id=host.id, host_token=old_token)
        is enrollment.Proof.REFUSED
    )
    assert submit().status == 409
    enrollment.allow_reregistration(host_id=host.id)
    Host.objects.filter(id=host.id).update(
        reregistration_allowed_until=timezone.now() - timedelta(seconds=1)
    )
    assert submit().status == 409  # not after the window
    native = services.host_register(hostname="native-01")[0]
    with pytest.raises(EnrollmentRefused):
        enrollment.allow_reregistration(host_id=native.id)


@pytest.mark.django_db
def test_a_rejected_reregistration_leaves_the_host_as_it_was():
    host, old_token = approved_host()
    enrollment.allow_reregistration(host_id=host.id)
    intruder = submit(address="198.51.100.9").body
    record = AgentRegistration.objects.get(for_host=host, status=RegistrationStatus.PENDING)
    enrollment.registration_reject(registration_id=record.id)
    host.refresh_from_db()
    assert enrollment.host_token_matches(host, old_token)
    assert (
        enrollment.prove(name="web-01", host_id=host.id, host_token=intruder["host_token"])
        is enrollment.Proof.REFUSED
    )
    assert submit().status == 409


@pytest.mark.django_db
def test_hostnames_of_native_agents_cannot_be_taken(settings):
    services.host_register(hostname="web-01")
    settings.SYSMANAGE_AGENT_AUTO_APPROVE = True
    with pytest.raises(EnrollmentRefused) as caught:
        submit("web-01")
    assert caught.value.status == 409
    settings.SYSMANAGE_AGENT_AUTO_APPROVE = False
    with pytest.raises(ValueError, match="is managed by a SysManage agent"):
        services.host_rotate_token(host_id=approved_host("web-02")[0].id)


@pytest.mark.django_db
def test_auto_approval_and_the_limits_on_waiting_registrations(settings):
    settings.SYSMANAGE_AGENT_AUTO_APPROVE = True
    assert submit("auto-1").body["approved"] is True
    settings.SYSMANAGE_AGENT_AUTO_APPROVE = False
    settings.SYSMANAGE_AGENT_MAX_PENDING = 2
    submit("wait-1", address="192.0.2.1")
    submit("wait-2", address="192.0.2.2")
    with pytest.raises(EnrollmentRefused) as caught:
        submit("wait-3", address="198.51.100.3")
    assert caught.value.status == 429
    _, secret = enrollment.key_create(name="rollout")
    assert submit("keyed-1", secret, address="198.51.100.3").body["approved"] is True
    settings.SYSMANAGE_AGENT_MAX_PENDING = 100
    settings.SYSMANAGE_AGENT_PENDING_PER_ADDRESS = 2
    submit("wait-3", address="192.0.2.1")
    with pytest.raises(EnrollmentRefused, match="this address"):
        submit("wait-4", address="192.0.2.1")
    settings.SYSMANAGE_AGENT_PENDING_PER_NETWORK = 3
    with pytest.raises(EnrollmentRefused, match=r"192\.0\.2\.0/24"):
        submit("wait-5", address="192.0.2.5")
    assert submit("wait-5", address="203.0.113.5").status == 201
    assert submit("keyed-2", secret, address="192.0.2.1").body["approved"] is True


@pytest.mark.django_db
def test_waiting_registrations_expire(settings):
    old = submit("old-1").body
    AgentRegistration.objects.filter(id=old["id"]).update(
        created_at=timezone.now() - timedelta(days=8)
    )
    fresh = submit("new-1").body
    assert enrollment.registrations_expire() == 1
    assert AgentRegistration.objects.get(id=old["id"]).status == RegistrationStatus.EXPIRED
    assert AgentRegistration.objects.get(id=fresh["id"]).status == RegistrationStatus.PENDING
    assert submit("old-1").status == 201  # it may ask again


@pytest.mark.django_db
def test_host_names_compare_without_regard_to_case():
    record = submit("xss-host").body
    enrollment.registration_reject(registration_id=record["id"])
    for variant in ("XSS-HOST", "Xss-Host"):
        with pytest.raises(EnrollmentRefused) as caught:
            submit(variant)
        assert caught.value.status == 403
    _host, _ = approved_host("web-01")
    assert submit("WEB-01").status == 409
    native, _ = services.host_register(hostname="mail-01")
    assert services.host_register(hostname="MAIL-01")[0].id == native.id  # re-enrolled
    with pytest.raises(IntegrityError):
        Host.objects.create(hostname="Web-01")


@pytest.mark.django_db
def test_connection_tokens_are_opaque_short_lived_and_grant_nothing_alone(settings):
    host, host_token = approved_host()
    token = enrollment.connection_token_issue("web-01")
    # Opaque: no part of it decodes to the host's id or name.
    for part in [*token.split("."), token]:
        padded = part + "=" * (-len(part) % 4)
        decoded = base64.urlsafe_b64decode(padded.encode()) if part else b""
        assert str(host.id).encode() not in decoded
        assert b"web-01" not in decoded
    assert enrollment.connection_token_name(token) == "web-01"
    assert enrollment.connection_token_name(token[:-2] + "xx") is None
    assert enrollment.connection_token_name("") is None
    assert enrollment.connection_token_name(tokens.issue("nobody")) is None
    settings.SYSMANAGE_AGENT_TOKEN_SECONDS = -1
    assert enrollment.connection_token_name(token) is None
    settings.SYSMANAGE_AGENT_TOKEN_SECONDS = 300
    # Proof, not the token, decides: the host's token for a host of that name.
    assert enrollment.prove(name="web-01", host_id=host.id, host_token=host_token) == host
    assert (
        enrollment.prove(name="db-01", host_id=host.id, host_token=host_token)
        is enrollment.Proof.REFUSED
    )
    services.host_revoke_token(host_id=host.id)
    assert enrollment.connection_token_name(token) is None
    assert (
        enrollment.prove(name="web-01", host_id=host.id, host_token=host_token)
        is enrollment.Proof.REFUSED
    )
    with pytest.raises(EnrollmentRefused) as caught:
        enrollment.connection_token_issue("web-01")
    assert caught.value.status == 403
    with pytest.raises(EnrollmentRefused) as caught:
        enrollment.connection_token_issue("nobody")
    assert caught.value.status == 404


# -- the command queue -------------------------------------------------------------------------


def online(host):
    return services.host_set_status(host_id=host.id, status=HostStatus.ONLINE)


@pytest.mark.django_db
def test_commands_are_sent_once_and_resent_until_acknowledged(settings, published):
    host, _ = approved_host()
    execution = published.run(
        services.command_create, host=host, command="uptime", timeout=20, user=None
    )
    [sent] = published.run(deliveries.take_due, host.id)
    assert sent.ref == str(execution.id)
    assert sent.message["data"] == {
        "command_type": "execute_shell",
        "timeout": 20,
        "parameters": {"command": "uptime", "timeout": 20},
    }
    execution.refresh_from_db()
    assert execution.status == ExecutionStatus.RUNNING
    assert deliveries.take_due(host.id) == []  # not overdue yet
    settings.SYSMANAGE_AGENT_ACK_SECONDS = -1
    [again] = deliveries.take_due(host.id)
    assert again.message["queue_message_id"] == sent.message["queue_message_id"]
    assert AgentDelivery.objects.get().attempts == 2
    assert deliveries.acknowledge(host_id=host.id, delivery_id=sent.message["message_id"])
    assert deliveries.take_due(host.id) == []
    assert not deliveries.acknowledge(host_id=uuid.uuid4(), delivery_id=sent.message["message_id"])


@pytest.mark.django_db
def test_a_command_never_acknowledged_fails_as_not_delivered(settings):
    host, _ = approved_host()
    execution = services.command_create(host=host, command="uptime", timeout=20, user=None)
    settings.SYSMANAGE_AGENT_ACK_SECONDS = -1
    settings.SYSMANAGE_AGENT_MAX_ATTEMPTS = 2
    assert len(deliveries.take_due(host.id)) == 1
    assert len(deliveries.take_due(host.id)) == 1
    assert deliveries.take_due(host.id) == []
    execution.refresh_from_db()
    assert execution.status == ExecutionStatus.FAILED
    assert "did not acknowledge" in execution.error
    assert AgentDelivery.objects.get().state == DeliveryState.ABANDONED


@pytest.mark.django_db
def test_a_result_before_the_acknowledgement_is_stored_once():
    host, _ = approved_host()
    execution = services.command_create(host=host, command="echo hi", timeout=20, user=None)
    [sent] = deliveries.take_due(host.id)
    result = {
        "command_id": sent.message["message_id"],
        "command_type": "execute_shell",
        "success": True,
        "exit_code": 0,
        "result": {"result": {"stdout": "hi\n", "stderr": "", "exit_code": 0}},
    }
    assert deliveries.record_result(host_id=host.id, data=result)
    assert deliveries.acknowledge(host_id=host.id, delivery_id=sent.message["message_id"])
    changed = {**result, "result": {"result": {"stdout": "other", "stderr": "", "exit_code": 0}}}
    assert deliveries.record_result(host_id=host.id, data=changed)  # a duplicate: acked only
    execution.refresh_from_db()
    assert (execution.status, execution.stdout, execution.exit_code) == ("completed", "hi\n", 0)
    assert execution.execution_time is not None
    assert execution.execution_time >= 0
    assert not deliveries.record_result(host_id=host.id, data={"command_id": "metrics-sync"})


@pytest.mark.django_db
def test_package_operations_map_to_install_and_uninstall_packages():
    host, _ = approved_host()
    install = services.package_operation_create(
        host=host, operation="install", package="jq", user=None
    )
    remove = services.package_operation_create(
        host=host, operation="remove", package="vim", user=None
    )
    sent = {item.ref: item.message for item in deliveries.take_due(host.id)}
    assert sent[str(install.id)]["data"]["command_type"] == "install_packages"
    assert sent[str(remove.id)]["data"]["command_type"] == "uninstall_packages"
    assert sent[str(install.id)]["data"]["parameters"]["packages"] == [
        {"package_name": "jq", "package_manager": "auto"}
    ]
    assert sent[str(install.id)]["data"]["parameters"]["request_id"] == str(install.id)
    install.refresh_from_db()
    assert install.status == OperationStatus.IN_PROGRESS
    deliveries.record_result(
        host_id=host.id,
        data={
            "command_id": sent[str(install.id)]["message_id"],
            "success": True,
            "result": {"failed_packages": [], "installation_log": "Setting up jq"},
        },
    )
    deliveries.record_result(
        host_id=host.id,
        data={
            "command_id": sent[str(remove.id)]["message_id"],
            "success": False,
            "error": "E: Unable to locate package vim",
            "result": None,
        },
    )
    install.refresh_from_db()
    removal = PackageOperation.objects.get(id=remove.id)
    assert (install.status, install.progress, install.output) == ("completed", 100, "Setting up jq")
    assert removal.status == "failed"
    assert "Unable to locate" in removal.message


@pytest.mark.django_db
def test_undelivered_commands_fail_once_and_sent_ones_do_not(settings):
    host, _ = approved_host()
    waiting = services.command_create(host=host, command="a", timeout=20, user=None)
    taken = services.command_create(host=host, command="b", timeout=20, user=None)
    CommandExecution.objects.filter(id=waiting.id).update(
        created_at=timezone.now() - timedelta(minutes=5)
    )
    AgentDelivery.objects.create(
        host=host, command_type="execute_shell", execution=taken, sent_at=timezone.now()
    )
    assert not deliveries.fail_undelivered_command(execution_id=taken.id, why="x")
    native = services.host_register(hostname="native-01")[0]
    native_command = services.command_create(host=native, command="c", timeout=20, user=None)
    CommandExecution.objects.filter(id=native_command.id).update(
        created_at=timezone.now() - timedelta(minutes=5)
    )
    assert deliveries.expire_undelivered() == 1
    assert CommandExecution.objects.get(id=waiting.id).status == "failed"
    assert "Not delivered" in CommandExecution.objects.get(id=waiting.id).error
    assert CommandExecution.objects.get(id=native_command.id).status == "pending"
    assert deliveries.expire_undelivered() == 0


# -- the socket consumer -----------------------------------------------------------------------


async def connect(token: str, headers=None) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(
        application, f"/api/agent/connect?token={token}", headers=headers or []
    )
    connected, _ = await comm.connect()
    assert connected
    return comm


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("token", ["", "garbage", "a.b.c"])
async def test_bad_connection_tokens_are_accepted_then_closed_with_4001(token):
    comm = await connect(token)
    error = await comm.receive_json_from(timeout=3)
    assert error["message_type"] == "error"
    assert error["error_type"] == "invalid_token"
    assert await expect_close(comm) == 4001


@pytest.mark.django_db(transaction=True)
async def test_browsers_are_refused_at_the_handshake():
    _host, _ = await database_sync_to_async(approved_host)()
    token = await database_sync_to_async(enrollment.connection_token_issue)("web-01")
    comm = WebsocketCommunicator(
        application,
        f"/api/agent/connect?token={token}",
        headers=[(b"origin", b"http://evil.example")],
    )
    connected, _ = await comm.connect()
    assert not connected


@pytest.mark.django_db(transaction=True)
async def test_an_agent_that_cannot_prove_its_identity_stays_offline_and_is_dropped():
    host, _host_token = await database_sync_to_async(approved_host)()
    comm = await connect(await database_sync_to_async(enrollment.connection_token_issue)("web-01"))
    wrong = {"host_id": str(host.id), "host_token": "not-it", "hostname": "web-01"}
    # A message naming no identity (the agent's periodic os_version_update) is held, not
    # refused: refusing it made real hosts drop their identity.
    await comm.send_json_to(message("os_version_update", {"platform": "Linux"}))
    assert (await comm.receive_json_from(timeout=3))["message_type"] == "ping"
    assert await comm.receive_nothing(timeout=0.3)
    for _ in range(5):
        await comm.send_json_to(message("system_info", wrong))
        reply = await comm.receive_json_from(timeout=3)
        assert reply["error_type"] == "host_not_registered", reply
    final = await comm.receive_json_from(timeout=3)
    assert final["error_type"] == "host_not_registered"
    assert await expect_close(comm) == 4001
    status = await database_sync_to_async(lambda: Host.objects.get(id=host.id).status)()
    assert status != HostStatus.ONLINE


@pytest.mark.django_db(transaction=True)
async def test_an_agent_that_lost_its_identity_is_told_so_when_its_pong_names_nobody():
    await database_sync_to_async(approved_host)()
    comm = await connect(await database_sync_to_async(enrollment.connection_token_issue)("web-01"))
    await comm.send_json_to(message("system_info", {"hostname": "web-01"}))
    ping = await comm.receive_json_from(timeout=3)
    assert ping["message_type"] == "ping"
    await comm.send_json_to(message("pong", {"ping_id": ping["message_id"]}))
    refusal = await comm.receive_json_from(timeout=3)
    assert refusal["error_type"] == "host_not_registered", refusal
    await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_proven_agent_comes_online_gets_its_metric_scripts_and_bad_frames_get_errors(
    settings,
):
    settings.SYSMANAGE_AGENT_MAX_MESSAGE_BYTES = 64 * 1024
    host, host_token = await database_sync_to_async(approved_host)()
    comm = await connect(await database_sync_to_async(enrollment.connection_token_issue)("web-01"))
    ids = {"host_id": str(host.id), "host_token": host_token}
    os_info = {"distribution": "Debian", "distribution_version": "12"}
    info = message(
        "system_info", {**ids, "hostname": "web-01", "platform": "Linux", "os_info": os_info}
    )
    await comm.send_json_to(info)
    sync = await comm.receive_json_from(timeout=3)
    assert sync["message_type"] == "command"
    assert sync["data"]["command_type"] == "sync_custom_metrics"
    ack = await comm.receive_json_from(timeout=3)
    assert ack["message_type"] == "ack"
    assert ack["data"]["acked_message_id"] == info["message_id"]
    check = await comm.receive_json_from(timeout=3)  # a fresh look at pending updates
    assert check["data"]["command_type"] == "check_updates"
    row = await database_sync_to_async(Host.objects.get)(id=host.id)
    assert (row.status, row.os_name, row.os_version) == ("online", "Debian", "12")
    for frame in ("not json", "[]", json.dumps({"message_type": "heartbeat"})):
        await comm.send_to(text_data=frame)
        assert (await comm.receive_json_from(timeout=3))["error_type"] == "invalid_message"
    await comm.send_to(bytes_data=b"\x00\x01")
    assert (await comm.receive_json_from(timeout=3))["error_type"] == "invalid_message"
    unknown = message("firewall_status_update", {**ids, "enabled": True})
    await comm.send_json_to(unknown)
    assert (await comm.receive_json_from(timeout=3))["data"]["acked_message_id"] == unknown[
        "message_id"
    ]
    big = message("software_inventory_update", {**ids, "pad": "x" * 70000})
    await comm.send_to(text_data=json.dumps(big))
    refused = await comm.receive_json_from(timeout=3)
    assert refused["error_type"] == "message_too_large"
    assert refused["data"] == {"message_type": big["message_type"], "message_id": big["message_id"]}
    assert "SYSMANAGE_AGENT_MAX_MESSAGE_BYTES" in refused["message"]
    # not processed, and the connection stays open: the agent has no reason to send it again
    heartbeat = message("heartbeat", ids)
    await comm.send_json_to(heartbeat)
    assert (await comm.receive_json_from(timeout=3))["data"]["acked_message_id"] == heartbeat[
        "message_id"
    ]
    await comm.disconnect()
    status = await database_sync_to_async(lambda: Host.objects.get(id=host.id).status)()
    assert status == HostStatus.OFFLINE


@pytest.mark.django_db
def test_registrations_and_keys_over_rest(client, make_user):
    from tests.conftest import PASSWORD

    pending = submit().body
    make_user("ops")
    client.login(username="ops", password=PASSWORD)
    assert client.get("/api/registrations/").status_code == 403
    assert client.post("/api/registration-keys/", {"name": "k"}).status_code == 403
    # the staff flag alone is not the admin's permission (see test_security_rest.py)
    make_user(
        "root",
        staff=True,
        perms=[
            "hosts.view_agentregistration",
            "hosts.change_agentregistration",
            "hosts.view_registrationkey",
            "hosts.add_registrationkey",
            "hosts.change_registrationkey",
        ],
    )
    client.login(username="root", password=PASSWORD)
    listed = client.get("/api/registrations/?status=pending").json()
    assert [r["id"] for r in listed["results"]] == [pending["id"]]
    approved = client.post(f"/api/registrations/{pending['id']}/approve/")
    assert approved.status_code == 200
    assert approved.json()["status"] == "approved"
    assert client.post(f"/api/registrations/{pending['id']}/approve/").status_code == 409
    created = client.post(
        "/api/registration-keys/",
        {"name": "rollout", "max_uses": 1, "expires_in_seconds": 3600},
        content_type="application/json",
    )
    assert created.status_code == 201
    assert created.json()["key"].startswith("smrk_")
    assert created.json()["usable"] is True
    key_id = created.json()["id"]
    assert "key" not in client.get(f"/api/registration-keys/{key_id}/").json()
    revoked = client.post(f"/api/registration-keys/{key_id}/revoke/")
    assert revoked.json()["usable"] is False
    with pytest.raises(EnrollmentRefused, match="revoked"):
        submit("web-09", created.json()["key"])
    assert AgentRegistration.objects.get(id=pending["id"]).status == RegistrationStatus.APPROVED


@pytest.mark.django_db(transaction=True)
def test_polling_carries_messages_in_and_commands_out(client):
    host, host_token = approved_host()
    token = enrollment.connection_token_issue("web-01")

    def poll(body, bearer=token):
        return client.post(
            "/api/agent/poll",
            body,
            content_type="application/json",
            headers={"Authorization": f"Bearer {bearer}"} if bearer else {},
        )

    assert poll({"host_id": str(host.id), "messages": []}, bearer=None).status_code == 401
    assert poll({"host_id": str(host.id), "messages": []}, bearer="nope").status_code == 401
    assert poll({"host_id": str(uuid.uuid4()), "messages": []}).status_code == 403
    assert poll({"host_id": str(host.id), "messages": "x"}).status_code == 400
    ids = {"host_id": str(host.id), "host_token": host_token}
    info = {
        "message_type": "system_info",
        "message_id": str(uuid.uuid4()),
        "data": {**ids, "hostname": "web-01", "platform": "Linux"},
    }
    reply = poll({"host_id": str(host.id), "messages": [info, "junk"], "max_wait": 0})
    assert reply.status_code == 200
    assert reply.json()["poll_interval"] > 0
    kinds = [(m["message_type"], m["data"].get("error_type")) for m in reply.json()["messages"]]
    assert sorted(kinds, key=str) == [
        ("ack", None),
        ("command", None),  # the metric scripts
        ("command", None),  # check_updates
        ("error", "invalid_message"),
        ("ping", None),
    ], kinds
    assert Host.objects.get(id=host.id).status == HostStatus.ONLINE
    execution = services.command_create(host=host, command="id", timeout=20, user=None)
    # A poll without proof takes nothing (the connection token is anybody's).
    assert [
        m["message_type"]
        for m in poll({"host_id": str(host.id), "messages": []}).json()["messages"]
    ] == ["ping"]
    beat = {"message_type": "heartbeat", "message_id": str(uuid.uuid4()), "data": ids}
    replies = poll({"host_id": str(host.id), "messages": [beat]}).json()["messages"]
    [command] = [m for m in replies if m["message_type"] == "command"]
    assert command["data"]["queue_message_id"] == command["message_id"]
    assert command["data"]["data"]["parameters"]["command"] == "id"
    result = {
        "message_type": "command_result",
        "message_id": str(uuid.uuid4()),
        "data": {
            **ids,
            "command_id": command["message_id"],
            "success": True,
            "exit_code": 0,
            "result": {"result": {"stdout": "uid=0", "stderr": "", "exit_code": 0}},
        },
    }
    acknowledgement = {
        "message_type": "command_acknowledgment",
        "message_id": command["message_id"],
    }
    poll({"host_id": str(host.id), "messages": [result, acknowledgement]})
    execution.refresh_from_db()
    assert (execution.status, execution.stdout) == ("completed", "uid=0")
    assert AgentDelivery.objects.get(execution=execution).state == DeliveryState.ACKNOWLEDGED
    spoofed = {
        **result,
        "message_id": str(uuid.uuid4()),
        "data": {**result["data"], "host_token": "guess"},
    }
    replies = poll({"host_id": str(host.id), "messages": [spoofed]}).json()["messages"]
    assert [m["data"]["error_type"] for m in replies if m["message_type"] == "error"] == [
        "host_not_registered"
    ]


@pytest.mark.django_db
def test_the_agent_may_ask_for_a_token_with_its_short_name():
    # It registers with `hostname -f` but sends gethostname() to /api/agent/auth.
    host, host_token = approved_host("web-01.example.com")
    token = enrollment.connection_token_issue("web-01")
    assert enrollment.connection_token_name(token) == "web-01"
    assert enrollment.connection_token_name(enrollment.connection_token_issue("WEB-01")) == "web-01"
    assert enrollment.prove(name="web-01", host_id=host.id, host_token=host_token) == host
    # A short name several hosts share still gets a token: the proof says which host the
    # connection is, and it is always the one that proved it.
    other, other_token = approved_host("web-01.other.example")
    assert enrollment.connection_token_name(enrollment.connection_token_issue("web-01"))
    assert enrollment.prove(name="web-01", host_id=other.id, host_token=other_token) == other
    assert (
        enrollment.prove(name="web-01", host_id=host.id, host_token=other_token)
        is enrollment.Proof.REFUSED
    )
    stranger, stranger_token = approved_host("db-01")
    assert (
        enrollment.prove(name="web-01", host_id=stranger.id, host_token=stranger_token)
        is enrollment.Proof.REFUSED
    )
    assert (
        enrollment.prove(name="web-01.example.com", host_id=other.id, host_token=other_token)
        is enrollment.Proof.REFUSED
    )
    submit("mail-01.example.com")
    with pytest.raises(EnrollmentRefused, match="waiting for approval"):
        enrollment.connection_token_issue("mail-01")


@pytest.mark.django_db(transaction=True)
async def test_messages_naming_the_host_without_its_token_wait_for_proof():
    # The agent adds host_token only where it adds host_id itself: system_info (always the
    # first message) names the host alone, so it is held until a message proves identity.
    host, host_token = await database_sync_to_async(approved_host)()
    comm = await connect(await database_sync_to_async(enrollment.connection_token_issue)("web-01"))
    info = message(
        "system_info",
        {
            "host_id": str(host.id),
            "hostname": "web-01",
            "platform": "Linux",
            "platform_version": "6.1.0-28",
            "os_info": {"distribution": "Debian", "distribution_version": "12"},
        },
    )
    await comm.send_json_to(info)
    ping = await comm.receive_json_from(timeout=3)  # held, and proof asked for
    assert ping["message_type"] == "ping"
    assert await comm.receive_nothing(timeout=0.3)
    status = await database_sync_to_async(lambda: Host.objects.get(id=host.id).status)()
    assert status != HostStatus.ONLINE
    beat = message("heartbeat", {"host_id": str(host.id), "host_token": host_token})
    await comm.send_json_to(beat)
    replies = [await comm.receive_json_from(timeout=3) for _ in range(4)]
    acked = [r["data"]["acked_message_id"] for r in replies if r["message_type"] == "ack"]
    assert acked == [info["message_id"], beat["message_id"]]  # in the order sent
    assert [r["data"]["command_type"] for r in replies if r["message_type"] == "command"] == [
        "sync_custom_metrics",
        "check_updates",
    ]
    row = await database_sync_to_async(Host.objects.get)(id=host.id)
    assert (row.status, row.os_name, row.kernel) == ("online", "Debian", "6.1.0-28")
    flat = message("script_execution_result", execution_id="e", host_id=str(host.id), exit_code=0)
    await comm.send_json_to(flat)
    assert (await comm.receive_json_from(timeout=3))["data"]["acked_message_id"] == flat[
        "message_id"
    ]
    await comm.disconnect()


@pytest.mark.django_db(transaction=True)
def test_a_poll_speaks_for_its_host_only_with_proof_in_that_poll(client, settings):
    host, host_token = approved_host()
    info = {
        "message_type": "system_info",
        "message_id": str(uuid.uuid4()),
        "data": {"host_id": str(host.id), "hostname": "web-01"},
    }

    def poll(messages):
        token = enrollment.connection_token_issue("web-01")  # one per poll, as the agent
        return client.post(
            "/api/agent/poll",
            {"host_id": str(host.id), "messages": messages},
            content_type="application/json",
            headers={"Authorization": f"Bearer {token}"},
        ).json()["messages"]

    refused, ping = poll([info])
    assert refused["data"]["error_type"] == "identification_pending"
    assert ping["message_type"] == "ping"  # its pong would prove the next poll
    beat = {
        "message_type": "heartbeat",
        "message_id": str(uuid.uuid4()),
        "data": {"host_id": str(host.id), "host_token": host_token},
    }
    types = [m["message_type"] for m in poll([info, beat])]
    assert types.count("ack") == 2
    assert "error" not in types
    # Online now, but a later poll proves nothing by that: still refused.
    again, _ = poll([{**info, "message_id": str(uuid.uuid4())}])
    assert again["data"]["error_type"] == "identification_pending"
    settings.SYSMANAGE_AGENT_TRUST_POLLING = True  # the operator's explicit choice
    [ack] = poll([{**info, "message_id": str(uuid.uuid4())}])
    assert ack["message_type"] == "ack"


def test_polled_messages_are_read_as_the_agent_queued_them():
    inner = message("heartbeat", {"host_id": "h", "host_token": "t"})
    polled = {
        "message_type": "heartbeat",
        "message_id": str(uuid.uuid4()),
        "data": json.dumps(inner),
    }
    assert protocol.check_envelope(polled, polled=True) == (
        "heartbeat",
        inner["message_id"],
        {"host_id": "h", "host_token": "t"},
    )
    with pytest.raises(AgentProtocolError):
        protocol.check_envelope({**polled, "data": "{broken"}, polled=True)


@pytest.mark.django_db
def test_reregistration_over_rest_and_the_command_line(client, make_user):
    from django.core.management import CommandError, call_command

    from tests.conftest import PASSWORD

    host, _ = approved_host()
    make_user("ops")
    client.login(username="ops", password=PASSWORD)
    url = f"/api/hosts/{host.id}/allow-reregistration/"
    assert client.post(url).status_code == 403
    make_user("root", staff=True, perms=["hosts.change_host"])
    client.login(username="root", password=PASSWORD)
    assert client.post(url).json()["reregistration_allowed_until"]
    assert submit().status == 201
    AgentRegistration.objects.filter(for_host=host).delete()
    call_command("allow_reregistration", "web-01", "--minutes", "5")
    assert submit().status == 201
    with pytest.raises(CommandError, match="--minutes"):
        call_command("allow_reregistration", "web-01", "--minutes", "0")
    native = services.host_register(hostname="native-01")[0]
    with pytest.raises(CommandError, match="not managed by a SysManage agent"):
        call_command("allow_reregistration", str(native.id))
    out, err = io.StringIO(), io.StringIO()
    call_command(
        "create_registration_key",
        "rollout",
        "--max-uses",
        "3",
        "--expires-in",
        "7d",
        stdout=out,
        stderr=err,
    )
    # the setting the agent reads (security.registration_key), not another one
    assert "security.registration_key" in err.getvalue()
    assert "server.registration_key" not in err.getvalue()
    created = json.loads(out.getvalue().strip().splitlines()[-1])
    assert submit("web-02", created["key"]).body["approved"] is True
    with pytest.raises(CommandError, match="--expires-in"):
        call_command("create_registration_key", "x", "--expires-in", "soon")


@pytest.mark.django_db
def test_the_host_admin_offers_the_reregistration_action(client, make_user):
    from tests.conftest import PASSWORD

    host, _ = approved_host()
    make_user("root", superuser=True)
    client.login(username="root", password=PASSWORD)
    response = client.post(
        "/admin/hosts/host/",
        {"action": "allow_reregistration", "_selected_action": [str(host.id)]},
        follow=True,
    )
    assert "may register again within the next hour" in response.content.decode()
    host.refresh_from_db()
    assert host.reregistration_allowed_until is not None


@pytest.mark.django_db(transaction=True)
async def test_the_metric_scripts_go_once_when_a_held_hardware_report_came_first():
    host, host_token = await database_sync_to_async(approved_host)()
    comm = await connect(await database_sync_to_async(enrollment.connection_token_issue)("web-01"))
    hardware = message(
        "hardware_update",
        {
            "host_id": str(host.id),
            "storage_devices": [{"mount_point": "/"}, {"mount_point": "/var"}],
        },
    )
    await comm.send_json_to(hardware)
    assert (await comm.receive_json_from(timeout=3))["message_type"] == "ping"
    await comm.send_json_to(
        message("heartbeat", {"host_id": str(host.id), "host_token": host_token})
    )
    replies = [await comm.receive_json_from(timeout=3) for _ in range(4)]
    assert await comm.receive_nothing(timeout=0.3)
    syncs = [r for r in replies if r["data"].get("command_type") == "sync_custom_metrics"]
    assert len(syncs) == 1, replies
    ids = {m["id"] for m in syncs[0]["data"]["parameters"]["metrics"]}
    assert protocol.METRIC_PREFIX + "disk:/var" in ids
    await comm.disconnect()


WEIRD_VALUES = [
    None,
    True,
    -1,
    1e308,
    "x" * 3000,
    [],
    [None, 1, "a"],
    {"a": {"b": []}},
    "\x00",
    {"mount_point": 7},
]
FIELDS = [
    "samples",
    "storage_devices",
    "software_packages",
    "available_updates",
    "os_info",
    "result",
    "command_id",
    "success",
    "exit_code",
    "error",
    "cpu_threads",
    "memory_total_mb",
    "ipv4",
    "ipv6",
    "fqdn",
    "platform",
    "platform_release",
    "platform_version",
    "hostname",
    "agent_version",
    "users",
    "groups",
    "roles",
]


@pytest.mark.django_db(transaction=True)
async def test_odd_field_values_get_an_ack_or_a_clear_error_never_a_server_error():
    host, host_token = await database_sync_to_async(approved_host)()
    comm = await connect(await database_sync_to_async(enrollment.connection_token_issue)("web-01"))
    ids = {"host_id": str(host.id), "host_token": host_token}
    await comm.send_json_to(message("heartbeat", ids))
    while (await comm.receive_json_from(timeout=3))["message_type"] != "ack":
        pass
    types = [
        "system_info",
        "heartbeat",
        "command_result",
        "custom_metric_samples",
        "os_version_update",
        "hardware_update",
        "software_inventory_update",
        "package_updates_update",
        "user_access_update",
        "role_data",
        "something_else",
    ]
    for index, message_type in enumerate(types):
        for value in WEIRD_VALUES:
            data = {**ids, **dict.fromkeys(FIELDS[index % 3 :: 2], value)}
            sent = message(message_type, data)
            await comm.send_json_to(sent)
            while True:
                reply = await comm.receive_json_from(timeout=3)
                if reply["message_type"] == "command":  # a new metrics set: fine
                    continue
                break
            assert reply["message_type"] in ("ack", "error"), reply
            if reply["message_type"] == "error":
                assert reply["error_type"] == "invalid_message", (message_type, value, reply)
    await comm.disconnect()


@pytest.mark.django_db(transaction=True)
def test_a_busy_database_is_answered_503_with_retry_after(client, monkeypatch):
    from django.db import OperationalError

    def locked(*args, **kwargs):
        raise OperationalError("database is locked")

    monkeypatch.setattr(enrollment, "registration_submit", locked)
    monkeypatch.setattr(enrollment, "connection_token_issue", locked)
    monkeypatch.setattr(enrollment, "named_host_ids", locked)
    for path, headers in (
        ("/api/host/register", {}),
        ("/api/agent/auth", {"x-agent-hostname": "web-01"}),
        ("/api/agent/poll", {"Authorization": f"Bearer {tokens.issue('web-01')}"}),
    ):
        response = client.post(
            path,
            {"hostname": "web-01", "host_id": "x", "messages": []},
            content_type="application/json",
            headers=headers,
        )
        assert response.status_code == 503, (path, response.content)
        assert response["Retry-After"] == "5"
        assert response.json()["detail"]


@pytest.mark.django_db
def test_unchanged_inventory_reports_are_not_written_again():
    host, _ = approved_host()
    report = {"software_packages": [{"package_name": "jq"}]}
    digest = protocol.digest(report)
    assert digest == protocol.digest(json.loads(json.dumps(report)))
    assert services.host_inventory_save(
        host_id=host.id, kind="software", data=report, item_count=1, facts={}, digest=digest
    )
    assert not services.host_inventory_save(
        host_id=host.id, kind="software", data=report, item_count=1, facts={}, digest=digest
    )
    changed = {"software_packages": [{"package_name": "jq"}, {"package_name": "vim"}]}
    assert services.host_inventory_save(
        host_id=host.id,
        kind="software",
        data=changed,
        item_count=2,
        facts={},
        digest=protocol.digest(changed),
    )
    assert host.inventory.get(kind="software").item_count == 2


@pytest.mark.django_db
def test_keyed_registrations_do_not_count_against_the_address_limit(settings):
    settings.SYSMANAGE_AGENT_REGISTRATIONS_PER_HOUR = 2
    _, secret = enrollment.key_create(name="rollout")
    for n in range(3):
        assert submit(f"keyed-{n}", secret, address="192.0.2.50").status == 201
    assert submit("asks-1", address="192.0.2.50").status == 201
    assert submit("asks-2", address="192.0.2.50").status == 201
    with pytest.raises(EnrollmentRefused, match="this address"):
        submit("asks-3", address="192.0.2.50")


@pytest.mark.django_db(transaction=True)
async def test_a_failure_while_handling_the_proving_message_still_brings_the_host_online(
    monkeypatch,
):
    from django.db import OperationalError

    from hosts.smagent import session as session_module

    host, host_token = await database_sync_to_async(approved_host)()
    comm = await connect(await database_sync_to_async(enrollment.connection_token_issue)("web-01"))

    def locked(self):
        raise OperationalError("database is locked")

    monkeypatch.setattr(session_module.AgentSession, "seen", locked)
    await comm.send_json_to(
        message("heartbeat", {"host_id": str(host.id), "host_token": host_token})
    )
    replies = [await comm.receive_json_from(timeout=3) for _ in range(2)]
    assert [r["message_type"] for r in replies] == ["command", "error"], replies
    assert replies[1]["error_type"] == "server_error"
    status = await database_sync_to_async(lambda: Host.objects.get(id=host.id).status)()
    assert status == HostStatus.ONLINE
    await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_connection_that_cannot_come_online_is_closed_to_be_retried(monkeypatch):
    from django.db import OperationalError

    host, host_token = await database_sync_to_async(approved_host)()
    comm = await connect(await database_sync_to_async(enrollment.connection_token_issue)("web-01"))

    def locked(**kwargs):
        raise OperationalError("database is locked")

    monkeypatch.setattr(services, "host_agent_hello", locked)
    await comm.send_json_to(
        message("heartbeat", {"host_id": str(host.id), "host_token": host_token})
    )
    replies = [await comm.receive_json_from(timeout=3) for _ in range(2)]
    assert replies[0]["message_type"] == "ack"
    assert replies[1]["error_type"] == "server_busy"
    assert await expect_close(comm) == 4503
