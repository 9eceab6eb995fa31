"""Models of managed hosts, command executions and package operations."""
from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.urls import reverse


class HostStatus(models.TextChoices):
    """Connection state of a host's agent."""

    ONLINE = "online", "Online"
    OFFLINE = "offline", "Offline"
    UNKNOWN = "unknown", "Unknown"


class Host(models.Model):
    """A managed machine, with the facts its agent last reported."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    hostname = models.CharField(max_length=255, unique=True)
    fqdn = models.CharField(max_length=255, blank=True)
    ip_addresses = models.JSONField(default=list, blank=True)
    os_name = models.CharField("OS", max_length=100, blank=True)
    os_version = models.CharField("OS version", max_length=100, blank=True)
    kernel = models.CharField(max_length=200, blank=True)
    architecture = models.CharField(max_length=50, blank=True)
    cpu_count = models.PositiveIntegerField(null=True, blank=True)
    memory_total = models.PositiveBigIntegerField("memory (bytes)", null=True, blank=True)
    agent_version = models.CharField(max_length=50, blank=True)
    status = models.CharField(
        max_length=10, choices=HostStatus.choices, default=HostStatus.UNKNOWN, db_index=True
    )
    last_seen = models.DateTimeField(null=True, blank=True)
    # SHA-256 of the agent's token; the token itself is shown once and never stored.
    # Empty when the host has no valid token (never enrolled, or revoked).
    token_hash = models.CharField(max_length=64, blank=True, db_index=True, editable=False)
    token_issued_at = models.DateTimeField(null=True, blank=True, editable=False)
    token_revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Which agent connection last said hello: a late disconnect of an older connection
    # (possibly in another server process) must not mark the host offline.
    agent_session = models.CharField(max_length=64, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["hostname"]

    def __str__(self) -> str:
        return self.hostname

    def get_absolute_url(self) -> str:
        """The host's dashboard page."""
        return reverse("dashboard-host", args=[self.pk])

    @property
    def has_token(self) -> bool:
        """Whether an agent can currently authenticate as this host."""
        return bool(self.token_hash)


class ExecutionStatus(models.TextChoices):
    """Life cycle of a command execution."""

    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    TIMEOUT = "timeout", "Timed out"


class CommandExecution(models.Model):
    """A shell command that a user asked a host's agent to run, and its result."""

    ACTIVE_STATUSES = (ExecutionStatus.PENDING, ExecutionStatus.RUNNING)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="commands")
    command = models.TextField()
    timeout = models.PositiveIntegerField(default=30)
    status = models.CharField(
        max_length=10, choices=ExecutionStatus.choices, default=ExecutionStatus.PENDING,
        db_index=True,
    )
    exit_code = models.IntegerField(null=True, blank=True)
    stdout = models.TextField(blank=True)
    stderr = models.TextField(blank=True)
    execution_time = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
        related_name="commands",
    )
    request_id = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.command} on {self.host_id}"


class PackageOperationKind(models.TextChoices):
    """What a package operation does."""

    INSTALL = "install", "Install"
    REMOVE = "remove", "Remove"
    UPDATE = "update", "Update"


class OperationStatus(models.TextChoices):
    """Life cycle of a package operation."""

    PENDING = "pending", "Pending"
    IN_PROGRESS = "in_progress", "In progress"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"


class PackageOperation(models.Model):
    """A package install, removal or update on one host, with its progress."""

    ACTIVE_STATUSES = (OperationStatus.PENDING, OperationStatus.IN_PROGRESS)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="package_operations")
    operation = models.CharField(max_length=10, choices=PackageOperationKind.choices)
    package = models.CharField(max_length=255)
    status = models.CharField(
        max_length=12, choices=OperationStatus.choices, default=OperationStatus.PENDING,
        db_index=True,
    )
    progress = models.PositiveSmallIntegerField(default=0)
    message = models.TextField(blank=True)
    output = models.TextField(blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
        related_name="package_operations",
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.operation} {self.package} on {self.host_id}"


class MetricSample(models.Model):
    """One minute of a host's metrics, averaged: the history behind the charts."""

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="metric_samples")
    minute = models.DateTimeField(db_index=True)
    samples = models.PositiveIntegerField(default=0)
    cpu_usage = models.FloatField(null=True, blank=True)
    memory_usage = models.FloatField(null=True, blank=True)
    disk_usage = models.JSONField(default=dict, blank=True)
    load_average = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["host", "minute"]
        constraints = [
            models.UniqueConstraint(fields=["host", "minute"], name="one_sample_per_host_minute"),
        ]

    def __str__(self) -> str:
        return f"{self.host_id} @ {self.minute:%Y-%m-%d %H:%M}"
