"""Models of managed hosts, command executions and package operations."""

from __future__ import annotations

import uuid
from typing import TypeGuard

from django.conf import settings
from django.db import models
from django.db.models.functions import Lower
from django.urls import reverse


class HostStatus(models.TextChoices):
    """Connection state of a host's agent."""

    ONLINE = "online", "Online"
    OFFLINE = "offline", "Offline"
    UNKNOWN = "unknown", "Unknown"


class AgentKind(models.TextChoices):
    """Which agent program manages a host, and so which protocol it speaks."""

    NATIVE = "native", "SysManage server agent (/ws/agent)"
    SYSMANAGE = "sysmanage", "SysManage agent (/api/agent/connect)"


class HostGroup(models.Model):
    """A named set of hosts; a host may be in several.

    Groups are the unit that fleet-wide actions and grants of rights over hosts attach
    to: a grant names a group, never a list of hosts.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            # Group names compare without regard to case, as host names do.
            models.UniqueConstraint(Lower("name"), name="host_group_name_unique_ci"),
        ]

    def __str__(self) -> str:
        return self.name


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
    agent_kind = models.CharField(
        max_length=10, choices=AgentKind.choices, default=AgentKind.NATIVE
    )
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
    # Until when a SysManage agent may register this hostname again (and get a new host
    # token); set by an administrator for an agent that lost its identity.
    reregistration_allowed_until = models.DateTimeField(null=True, blank=True, editable=False)
    groups = models.ManyToManyField(HostGroup, blank=True, related_name="hosts")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["hostname"]
        constraints = [
            # Host names compare without regard to case everywhere (DNS does too).
            models.UniqueConstraint(Lower("hostname"), name="host_hostname_unique_ci"),
        ]
        permissions = [
            # Without it (and without staff status), a user sees only the hosts of the
            # groups granted to them (HostGroupGrant; sysmanage.permissions).
            ("view_all_hosts", "Can see every host"),
            # Applying updates and rebooting: a right of its own, apart from running
            # commands, since a reboot takes every service of the host down.
            ("patch_host", "Can apply updates to and reboot hosts"),
        ]

    def __str__(self) -> str:
        return self.hostname

    def get_absolute_url(self) -> str:
        """The host's dashboard page."""
        return reverse("dashboard-host", args=[self.pk])

    @property
    def has_token(self) -> bool:
        """Whether an agent can currently authenticate as this host."""
        return bool(self.token_hash)


class HostGroupGrant(models.Model):
    """Rights over the hosts of one group, granted to a user or to a Django group.

    Every grant lets its holders see the group's hosts (REST, pages and every WebSocket
    channel); its flags add the actions they may take there.  Rights granted on every
    host by model permissions (``sysmanage.run_command``, ``alerts.change_alert``) and
    ``hosts.view_all_hosts`` still apply everywhere; :mod:`sysmanage.permissions` decides.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    host_group = models.ForeignKey(HostGroup, on_delete=models.CASCADE, related_name="grants")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="host_group_grants",
    )
    group = models.ForeignKey(
        "auth.Group",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="host_group_grants",
        verbose_name="user group",
    )
    can_run_commands = models.BooleanField("run commands", default=False)
    can_run_package_operations = models.BooleanField("run package operations", default=False)
    can_manage_alerts = models.BooleanField("acknowledge and resolve alerts", default=False)
    can_patch_and_reboot = models.BooleanField(
        "apply updates and reboot", default=False, db_default=False
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["host_group__name"]
        constraints = [
            models.CheckConstraint(
                condition=(
                    models.Q(user__isnull=False, group__isnull=True)
                    | models.Q(user__isnull=True, group__isnull=False)
                ),
                name="host_group_grant_one_holder",
            ),
            models.UniqueConstraint(
                fields=["host_group", "user"], name="host_group_grant_unique_user"
            ),
            models.UniqueConstraint(
                fields=["host_group", "group"], name="host_group_grant_unique_group"
            ),
        ]

    def __str__(self) -> str:
        holder = self.user if self.user_id is not None else self.group
        return f"{self.host_group} → {holder}"


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
        max_length=10,
        choices=ExecutionStatus.choices,
        default=ExecutionStatus.PENDING,
        db_index=True,
    )
    exit_code = models.IntegerField(null=True, blank=True)
    stdout = models.TextField(blank=True)
    stderr = models.TextField(blank=True)
    #: whether ``stdout``/``stderr`` hold less than the command wrote (cut by the agent
    #: or the server, or lost with a result too large to take)
    stdout_truncated = models.BooleanField(default=False, db_default=False)
    stderr_truncated = models.BooleanField(default=False, db_default=False)
    #: the size in bytes of everything the command wrote there, when known
    stdout_bytes = models.PositiveBigIntegerField(null=True, blank=True)
    stderr_bytes = models.PositiveBigIntegerField(null=True, blank=True)
    execution_time = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="commands",
    )
    request_id = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        permissions = [
            # Without it, a user sees the text and output of their own commands only
            # (and the output of their own package operations): commands can carry
            # secrets (sysmanage.permissions).
            (
                "view_command_output",
                "Can see the text and output of every user's commands and package operations",
            ),
        ]

    def __str__(self) -> str:
        # Not the command: this name shows in admin titles and history to users who may
        # not see the text (hosts.view_command_output).
        return f"command {str(self.id)[:8]} on {self.host_id}"


class PackageOperationKind(models.TextChoices):
    """What a package operation does."""

    INSTALL = "install", "Install"
    REMOVE = "remove", "Remove"
    UPDATE = "update", "Update"
    #: apply pending updates: ``package`` is :data:`hosts.patchapply.ALL_UPDATES`,
    #: :data:`hosts.patchapply.SECURITY_UPDATES` or package names separated by spaces
    UPGRADE = "upgrade", "Apply updates"
    #: reboot the host (``package`` empty); ends when the host is back online
    REBOOT = "reboot", "Reboot"


#: The kinds a package operation request may name (``package_operations`` commands,
#: package fleet runs); applying updates and rebooting need a right of their own
#: (``hosts.patchapply``).
PACKAGE_CHANGES: tuple[str, ...] = (
    PackageOperationKind.INSTALL,
    PackageOperationKind.REMOVE,
    PackageOperationKind.UPDATE,
)


def is_package_name(value: object) -> TypeGuard[str]:
    """Whether ``value`` is one package name: printable, no space, not an option."""
    return (
        isinstance(value, str)
        and bool(value.strip())
        and len(value) <= 255
        and not value.startswith("-")
        and not any(c.isspace() or not c.isprintable() for c in value)
    )


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
        max_length=12,
        choices=OperationStatus.choices,
        default=OperationStatus.PENDING,
        db_index=True,
    )
    progress = models.PositiveSmallIntegerField(default=0)
    message = models.TextField(blank=True)
    output = models.TextField(blank=True)
    #: whether ``output`` holds less than the package manager wrote
    output_truncated = models.BooleanField(default=False, db_default=False)
    #: the size in bytes of everything it wrote, when known
    output_bytes = models.PositiveBigIntegerField(null=True, blank=True)
    #: a reboot: when its agent said the reboot began (it then waits for the host), and
    #: when the host's agent connected again after it was handed the reboot
    rebooting_since = models.DateTimeField(null=True, blank=True)
    agent_returned_at = models.DateTimeField(null=True, blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
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


class RegistrationKey(models.Model):
    """A key an administrator hands out so that SysManage agents presenting it are
    approved on registration.  Only a SHA-256 digest is stored; the key is shown once."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    key_prefix = models.CharField("key starts with", max_length=12, editable=False)
    max_uses = models.PositiveIntegerField(
        null=True, blank=True, help_text="Leave empty for no limit."
    )
    uses = models.PositiveIntegerField(default=0, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    #: the groups that hosts enrolled with this key join
    groups = models.ManyToManyField(
        HostGroup,
        blank=True,
        related_name="registration_keys",
        help_text="Hosts that register with this key join these groups.",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        editable=False,
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.key_prefix}…)"


class RegistrationStatus(models.TextChoices):
    """Where a SysManage agent's registration stands."""

    PENDING = "pending", "Waiting for approval"
    APPROVED = "approved", "Approved"
    REJECTED = "rejected", "Rejected"
    EXPIRED = "expired", "Expired without a decision"


class AgentRegistration(models.Model):
    """A SysManage agent's request to be managed (``POST /api/host/register``).

    Its id is the host id the agent keeps: approving creates the host with this id.
    The agent's host token is issued with the registration and stored as a digest.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    hostname = models.CharField(max_length=255, db_index=True)
    fqdn = models.CharField(max_length=255, blank=True)
    ip_addresses = models.JSONField(default=list, blank=True)
    agent_version = models.CharField(max_length=50, blank=True)
    details = models.JSONField(default=dict, blank=True)
    remote_address = models.GenericIPAddressField(null=True, blank=True)
    status = models.CharField(
        max_length=10,
        choices=RegistrationStatus.choices,
        default=RegistrationStatus.PENDING,
        db_index=True,
    )
    token_hash = models.CharField(max_length=64, editable=False)
    key = models.ForeignKey(
        RegistrationKey,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="registrations",
    )
    host = models.OneToOneField(
        Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="registration"
    )
    # Set on a re-registration: the existing host whose identity the agent asks for.
    # Approving it gives that host the agent's new token; until then the old one works.
    for_host = models.ForeignKey(
        Host,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="reregistrations",
        verbose_name="re-registration of",
    )
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                Lower("hostname"),
                condition=models.Q(status="pending"),
                name="one_pending_registration_per_hostname_ci",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.hostname} ({self.status})"


class DeliveryState(models.TextChoices):
    """Where a command sent to a SysManage agent stands."""

    SENT = "sent", "Sent, not acknowledged"
    ACKNOWLEDGED = "acknowledged", "Acknowledged"
    ABANDONED = "abandoned", "Never acknowledged"


class AgentDelivery(models.Model):
    """A command sent to a SysManage agent: resent until acknowledged, or abandoned.

    Its id is the ``queue_message_id`` (and ``message_id``) the agent acknowledges,
    reports results with and dedupes by, so a resend never runs the command twice.
    Commands and package operations waiting for their host are the queue; a delivery
    records each one's way to the agent.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="deliveries")
    command_type = models.CharField(max_length=64)
    execution = models.OneToOneField(
        CommandExecution, null=True, blank=True, on_delete=models.CASCADE, related_name="delivery"
    )
    operation = models.OneToOneField(
        PackageOperation, null=True, blank=True, on_delete=models.CASCADE, related_name="delivery"
    )
    state = models.CharField(
        max_length=12, choices=DeliveryState.choices, default=DeliveryState.SENT, db_index=True
    )
    attempts = models.PositiveSmallIntegerField(default=1)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField()
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    #: an ``apply_updates``'s ``packages`` (``[{package_name, package_manager}]``), as
    #: first sent: its resends say the same, and the agent's ``update_apply_result``
    #: (which names no command) is matched to it by those names
    packages = models.JSONField(null=True, blank=True)  # null: none (older rows too)
    #: when the agent said it began applying them in the background (its
    #: ``command_result``); the operation ends with its ``update_apply_result``
    applying_since = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at"]
        indexes = [models.Index(fields=["host", "state"])]

    def __str__(self) -> str:
        return f"{self.command_type} for {self.host_id} ({self.state})"


class InventoryKind(models.TextChoices):
    """The parts of a host's inventory its agent reports."""

    OS = "os", "Operating system"
    HARDWARE = "hardware", "Hardware"
    SOFTWARE = "software", "Installed packages"
    UPDATES = "updates", "Available updates"
    USERS = "users", "Users and groups"
    SERVICES = "services", "Services"


class HostInventory(models.Model):
    """The latest inventory of one kind that a host's agent reported."""

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="inventory")
    kind = models.CharField(max_length=10, choices=InventoryKind.choices)
    data = models.JSONField(default=dict)
    # SHA-256 of the report as received: an unchanged report (every reconnect resends
    # them) is not written again.
    digest = models.CharField(max_length=64, blank=True, editable=False)
    item_count = models.PositiveIntegerField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["host", "kind"]
        verbose_name_plural = "host inventories"
        constraints = [
            models.UniqueConstraint(fields=["host", "kind"], name="one_inventory_per_kind"),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} of {self.host_id}"


class HostPatchStatus(models.Model):
    """What a host's agent last reported of its pending updates and of whether it needs
    a reboot, in one shape whichever agent reported it.

    ``None`` counts and ``reboot_required`` mean "not reported": an agent that cannot
    tell is not counted as a host that needs nothing.
    """

    host = models.OneToOneField(
        Host, primary_key=True, on_delete=models.CASCADE, related_name="patch_status"
    )
    update_count = models.PositiveIntegerField(null=True, blank=True)
    security_count = models.PositiveIntegerField(null=True, blank=True, db_index=True)
    #: ``[{name, current, available, security}]``, security updates first
    updates = models.JSONField(default=list, blank=True)
    updates_reported_at = models.DateTimeField(null=True, blank=True)
    reboot_required = models.BooleanField(null=True, blank=True, db_index=True)
    #: since when the host has needed a reboot without a break (its first such report)
    reboot_required_since = models.DateTimeField(null=True, blank=True)
    reboot_reported_at = models.DateTimeField(null=True, blank=True)
    #: a fresh check of updates asked for (``POST /api/hosts/<id>/check-updates/``), and
    #: when the agent was last sent one: a request newer than the send is still due
    check_requested_at = models.DateTimeField(null=True, blank=True, editable=False)
    check_sent_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        verbose_name_plural = "host patch statuses"

    def __str__(self) -> str:
        return f"Patch status of {self.host_id}"


class HostCertificate(models.Model):
    """A certificate file its agent found on a host (``hosts.certificates``); each report
    replaces the host's set."""

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="certificates")
    file_path = models.CharField(max_length=1024)
    #: the agent's name for it, or the subject's common name, or the file's name
    name = models.CharField(max_length=255, blank=True)
    subject = models.CharField(max_length=1024, blank=True)
    issuer = models.CharField(max_length=1024, blank=True)
    serial_number = models.CharField(max_length=128, blank=True)
    fingerprint_sha256 = models.CharField(max_length=128, blank=True)
    not_before = models.DateTimeField(null=True, blank=True)
    not_after = models.DateTimeField(null=True, blank=True)
    #: the agent's guess (from the path, the subject and the purposes)
    is_ca = models.BooleanField(default=False)
    key_usage = models.CharField(max_length=100, blank=True)
    #: when the agent last reported it
    reported_at = models.DateTimeField()

    class Meta:
        ordering = ["host", "not_after"]
        indexes = [
            models.Index(fields=["host", "not_after"]),
            # the periodic check of the "cert_expiry" alert rules
            models.Index(fields=["is_ca", "not_after"]),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["host", "file_path"], name="one_certificate_per_host_file"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name or self.file_path} on {self.host_id}"


class FleetRunKind(models.TextChoices):
    """What a fleet run does on each host."""

    COMMAND = "command", "Shell command"
    PACKAGE = "package", "Package operation"
    #: apply updates (``hosts.patchapply``), and reboot (a host succeeds once back online)
    PATCH = "patch", "Apply updates"
    REBOOT = "reboot", "Reboot"


class FleetRunState(models.TextChoices):
    """Life cycle of a fleet run."""

    RUNNING = "running", "Running"
    #: every targeted host ran it and succeeded
    SUCCEEDED = "succeeded", "Succeeded"
    #: it ran to the end, but some hosts failed or were skipped
    FAILED = "failed", "Failed"
    #: the failure limit was reached: the hosts not yet started were skipped
    STOPPED = "stopped", "Stopped"
    #: the server process running it stopped before it ended
    INTERRUPTED = "interrupted", "Interrupted"


class FleetRunHostStatus(models.TextChoices):
    """Where one host of a fleet run is."""

    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    SKIPPED = "skipped", "Skipped"


class FleetRun(models.Model):
    """A command run on many hosts at once: a group, a list of hosts or both, in
    batches, stopped when too many fail.  Kept as history with each host's outcome."""

    ACTIVE_STATES = (FleetRunState.RUNNING,)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=20, choices=FleetRunKind.choices, default="command")
    #: what was asked for: ``{"groups": [names], "host_ids": [ids]}``
    target = models.JSONField(default=dict)
    #: the shell command; for a package run, ``<operation> <package>``
    command = models.TextField()
    #: a package run's operation and package
    operation = models.CharField(max_length=10, blank=True)
    package = models.CharField(max_length=255, blank=True)
    #: seconds each host may take (a command's own timeout; how long a package
    #: operation is waited for before the host counts as failed)
    timeout = models.PositiveIntegerField(default=30)
    batch_size = models.PositiveIntegerField(default=5)
    #: stop after this many failures, or this percent of the hosts (see ``failure_percent``)
    failure_limit = models.PositiveIntegerField(null=True, blank=True)
    failure_percent = models.BooleanField(default=False)
    #: what becomes of a host that is offline when its turn comes: ``skip`` it, or
    #: ``wait`` for it (once the batches are done) up to ``offline_wait`` seconds
    offline = models.CharField(max_length=10, default="skip")
    offline_wait = models.PositiveIntegerField(default=600)
    state = models.CharField(
        max_length=12, choices=FleetRunState.choices, default=FleetRunState.RUNNING, db_index=True
    )
    reason = models.TextField(blank=True)
    total = models.PositiveIntegerField(default=0)
    succeeded = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    skipped = models.PositiveIntegerField(default=0)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="fleet_runs",
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    #: last sign of life of the process running it; a silent running run is interrupted
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"fleet run {str(self.id)[:8]}"


class FleetRunHost(models.Model):
    """One host of a fleet run and how it went there."""

    id = models.BigAutoField(primary_key=True)
    run = models.ForeignKey(FleetRun, on_delete=models.CASCADE, related_name="hosts")
    #: the host (null once deleted; its name is kept)
    host = models.ForeignKey(
        Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="fleet_runs"
    )
    hostname = models.CharField(max_length=255)
    #: the order the host runs in (batches take hosts in this order)
    position = models.PositiveIntegerField()
    status = models.CharField(
        max_length=10, choices=FleetRunHostStatus.choices, default=FleetRunHostStatus.QUEUED
    )
    #: why it was skipped or failed without a result
    reason = models.TextField(blank=True)
    execution = models.ForeignKey(
        CommandExecution, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    package_operation = models.ForeignKey(
        PackageOperation, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    exit_code = models.IntegerField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "position"]
        constraints = [
            models.UniqueConstraint(fields=["run", "position"], name="fleet_run_host_position")
        ]

    def __str__(self) -> str:
        return f"{self.hostname} in {self.run}"
