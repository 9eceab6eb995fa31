"""Admin of hosts, command executions and package operations."""

from __future__ import annotations

from typing import Any, TypeVar

from django.contrib import admin, messages
from django.db.models import Count, Model, QuerySet
from django.http import HttpRequest

from hosts import services
from hosts.models import (
    CommandExecution,
    FleetRun,
    FleetRunHost,
    Host,
    HostGroup,
    HostGroupGrant,
    HostInventory,
    PackageOperation,
)
from sysmanage import permissions
from sysmanage.audit import request_actor

# The admin's "View site" link leads to the dashboards.
admin.site.site_url = "/"


#: The model an admin shows.
_Record = TypeVar("_Record", bound=Model)


class ReadOnlyAdmin(admin.ModelAdmin[_Record]):
    """A record the server writes and people only read."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Host)
class HostAdmin(admin.ModelAdmin[Host]):
    """Hosts: status comes from the agent; the rest can be corrected by hand."""

    list_display = (
        "hostname",
        "status",
        "last_seen",
        "os_name",
        "os_version",
        "agent_kind",
        "agent_version",
        "group_names",
        "has_token",
    )
    list_filter = ("status", "agent_kind", "groups", "os_name")
    search_fields = ("hostname", "fqdn")
    filter_horizontal = ("groups",)
    readonly_fields = (
        "id",
        "status",
        "agent_kind",
        "last_seen",
        "token_issued_at",
        "token_revoked_at",
        "reregistration_allowed_until",
        "created_at",
        "updated_at",
    )
    actions: list[Any] = ["rotate_token", "revoke_token"]

    def has_manage_tokens_permission(self, request: HttpRequest) -> bool:
        """Token actions: the right the REST API asks too (not merely seeing hosts)."""
        return permissions.can_manage_host_tokens(request.user)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Host]:
        """Hosts with their groups, which the list shows."""
        return super().get_queryset(request).prefetch_related("groups")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        """A host's groups are shown to all, changed by those who may manage groups."""
        fields = tuple(super().get_readonly_fields(request, obj))
        if permissions.can_manage_host_groups(request.user):
            return fields
        return (*fields, "groups")

    @admin.display(description="groups")
    def group_names(self, obj: Host) -> str:
        """The groups the host is in."""
        return ", ".join(group.name for group in obj.groups.all())

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        """The host's groups change through the service, which records who changed them."""
        groups = form.cleaned_data.pop("groups", None)
        super().save_related(request, form, formsets, change)
        if groups is not None:
            services.host_set_groups(
                host_id=form.instance.pk, groups=list(groups), actor=request_actor(request)
            )

    @admin.display(boolean=True, description="agent token")
    def has_token(self, obj: Host) -> bool:
        """Whether an agent can authenticate as this host."""
        return obj.has_token

    @admin.action(description="Issue a new agent token (shown once)", permissions=["manage_tokens"])
    def rotate_token(self, request: HttpRequest, queryset: Any) -> None:
        """Rotate each selected host's token and show the new tokens once."""
        for host in queryset:
            try:
                _, token = services.host_rotate_token(host_id=host.pk, actor=request_actor(request))
            except ValueError as exc:
                self.message_user(request, str(exc), messages.ERROR)
                continue
            self.message_user(
                request,
                f"New agent token for {host.hostname} (shown only now): {token}",
                messages.WARNING,
            )

    @admin.action(description="Revoke agent token", permissions=["manage_tokens"])
    def revoke_token(self, request: HttpRequest, queryset: Any) -> None:
        """Revoke each selected host's token; connected agents are disconnected."""
        for host in queryset:
            services.host_revoke_token(host_id=host.pk, actor=request_actor(request))
        self.message_user(request, f"Revoked {queryset.count()} agent token(s).")

    def save_model(self, request: HttpRequest, obj: Host, form: Any, change: bool) -> None:
        """New hosts go through the service so that fleet figures are published."""
        if change:
            super().save_model(request, obj, form, change)
            return
        facts = {f: getattr(obj, f) for f in services.HOST_FACT_FIELDS}
        created = services.host_create(hostname=obj.hostname, **facts)
        obj.pk = created.pk
        obj.created_at = created.created_at

    def delete_model(self, request: HttpRequest, obj: Host) -> None:
        """Deleting goes through the service so that fleet figures are published."""
        services.host_delete(host=obj)

    def delete_queryset(self, request: HttpRequest, queryset: Any) -> None:
        """Bulk deletes too."""
        for host in queryset:
            services.host_delete(host=host)


@admin.register(HostGroupGrant)
class HostGroupGrantAdmin(admin.ModelAdmin[HostGroupGrant]):
    """Who sees which host groups, and what they may do there: each grant lets a user
    (or every member of a user group) see the group's hosts, and adds the actions its
    flags name.  Changes reach open sockets within seconds.  Every change needs the
    right to manage host access."""

    list_display = (
        "host_group",
        "holder",
        "can_run_commands",
        "can_run_package_operations",
        "can_manage_alerts",
        "can_patch_and_reboot",
        "created_at",
    )
    list_filter = ("host_group",)
    search_fields = ("host_group__name", "user__username", "group__name")
    fields = (
        "host_group",
        "user",
        "group",
        "can_run_commands",
        "can_run_package_operations",
        "can_manage_alerts",
        "can_patch_and_reboot",
    )

    @admin.display(description="granted to")
    def holder(self, obj: HostGroupGrant) -> str:
        """The user, or the user group."""
        return str(obj.user) if obj.user_id is not None else f"group {obj.group}"

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Seeing grants: the right to manage host access."""
        return permissions.can_manage_host_access(request.user)

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Giving grants: the right to manage host access."""
        return permissions.can_manage_host_access(request.user)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Changing grants: the right to manage host access."""
        return permissions.can_manage_host_access(request.user)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Taking grants away: the right to manage host access."""
        return permissions.can_manage_host_access(request.user)

    def save_model(
        self, request: HttpRequest, obj: HostGroupGrant, form: Any, change: bool
    ) -> None:
        """Give or change the grant through the services, which record who did."""
        # The form checked the model's constraints; what a concurrent change makes
        # wrong since is told, not raised.
        try:
            services.host_group_grant_save(obj, actor=request_actor(request))
        except ValueError as exc:
            self.message_user(request, str(exc), messages.ERROR)

    def delete_model(self, request: HttpRequest, obj: HostGroupGrant) -> None:
        """Take the grant away through the services."""
        services.host_group_grant_delete(grant_id=obj.pk, actor=request_actor(request))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[HostGroupGrant]) -> None:
        """Take each selected grant away through the services."""
        for grant_id in queryset.values_list("pk", flat=True):
            services.host_group_grant_delete(grant_id=grant_id, actor=request_actor(request))


@admin.register(HostGroup)
class HostGroupAdmin(admin.ModelAdmin[HostGroup]):
    """Host groups: named sets of hosts (a host's groups are edited on the host).  Every
    change needs the right to manage host groups, which the REST API asks too."""

    list_display = ("name", "description", "host_count", "created_at")
    search_fields = ("name", "description")
    fields = ("name", "description")

    def get_queryset(self, request: HttpRequest) -> QuerySet[HostGroup]:
        """Groups with their host counts."""
        return super().get_queryset(request).annotate(host_count=Count("hosts"))

    @admin.display(description="hosts", ordering="host_count")
    def host_count(self, obj: HostGroup) -> int:
        """How many hosts are in the group."""
        return int(getattr(obj, "host_count", 0))

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Creating groups: the right to manage them."""
        return permissions.can_manage_host_groups(request.user)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Changing groups: the right to manage them."""
        return permissions.can_manage_host_groups(request.user)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Deleting groups: the right to manage them."""
        return permissions.can_manage_host_groups(request.user)

    def save_model(self, request: HttpRequest, obj: HostGroup, form: Any, change: bool) -> None:
        """Create or change the group through the services, which record who did."""
        actor = request_actor(request)
        if change:
            services.host_group_update(
                group_id=obj.pk, name=obj.name, description=obj.description, actor=actor
            )
            return
        created = services.host_group_create(
            name=obj.name, description=obj.description, actor=actor
        )
        obj.pk, obj.created_at = created.pk, created.created_at

    def delete_model(self, request: HttpRequest, obj: HostGroup) -> None:
        """Delete through the service (hosts stay)."""
        services.host_group_delete(group_id=obj.pk, actor=request_actor(request))

    def delete_queryset(self, request: HttpRequest, queryset: Any) -> None:
        """Bulk deletes too."""
        for group in queryset:
            services.host_group_delete(group_id=group.pk, actor=request_actor(request))


def add_host_action(action: Any) -> None:
    """Offer ``action`` (a function decorated with ``admin.action``, called with the host
    admin, the request and the selected hosts) in the host list: apps with host actions
    of their own, such as an agent protocol, add them from their admin module."""
    if action not in HostAdmin.actions:
        HostAdmin.actions = [*HostAdmin.actions, action]


class OutputHidingAdmin(ReadOnlyAdmin[_Record]):
    """Shows ``private_fields`` only to the requester and holders of
    ``hosts.view_command_output``, as the REST API and the sockets do."""

    private_fields: tuple[str, ...] = ()

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        """Leave out the private fields of a record this user may not read."""
        fields = super().get_fields(request, obj)
        if obj is not None and not permissions.can_see_command_output(
            request.user, obj.requested_by_id
        ):
            return [f for f in fields if f not in self.private_fields]
        return fields

    def get_search_fields(self, request: HttpRequest) -> Any:
        """Searching private text would reveal it: only for those who see everyone's."""
        fields = super().get_search_fields(request)
        if permissions.holds(request.user, "view_command_output"):
            return fields
        return [f for f in fields if f not in self.private_fields]


@admin.register(CommandExecution)
class CommandExecutionAdmin(OutputHidingAdmin[CommandExecution]):
    """Commands run on hosts, read-only; text and output for those who may see them."""

    list_display = ("command", "host", "status", "exit_code", "requested_by", "created_at")
    list_filter = ("status",)
    search_fields = ("command", "host__hostname")
    private_fields = ("command", "stdout", "stderr", "error")

    def get_list_display(self, request: HttpRequest) -> Any:
        """The list, with each command shown only to those who may read it (a column
        made per request: the admin object is shared by every request)."""
        viewer = request.user

        @admin.display(description="command")
        def command_text(obj: CommandExecution) -> str:
            if permissions.can_see_command_output(viewer, obj.requested_by_id):
                return obj.command
            return "(hidden)"

        return (command_text, *self.list_display[1:])

    def get_queryset(self, request: HttpRequest) -> QuerySet[CommandExecution]:
        """Outputs (up to 512 Ki characters each) are read only when a page shows them."""
        return super().get_queryset(request).defer("stdout", "stderr")


@admin.register(PackageOperation)
class PackageOperationAdmin(OutputHidingAdmin[PackageOperation]):
    """Package operations, read-only; output for those who may see it."""

    list_display = ("operation", "package", "host", "status", "progress", "created_at")
    list_filter = ("status", "operation")
    search_fields = ("package", "host__hostname")
    private_fields = ("output",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[PackageOperation]:
        """The output (up to 512 Ki characters) is read only when a page shows it."""
        return super().get_queryset(request).defer("output")


class FleetRunHostInline(admin.TabularInline[FleetRunHost, FleetRun]):
    """Each host of a run and how it went there."""

    model = FleetRunHost
    fields = ("hostname", "status", "reason", "exit_code", "execution", "started_at", "finished_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Whoever may view the run sees its hosts (no permission of their own)."""
        return bool(request.user.has_perm("hosts.view_fleetrun"))


@admin.register(FleetRun)
class FleetRunAdmin(OutputHidingAdmin[FleetRun]):
    """Fleet runs, read-only, with each host's outcome; the command for those who may
    see it."""

    list_display = ("__str__", "state", "total", "succeeded", "failed", "skipped", "created_at")
    list_filter = ("state",)
    private_fields = ("command",)
    inlines = (FleetRunHostInline,)
    fields = (
        "command",
        "target",
        "timeout",
        "batch_size",
        "failure_limit",
        "failure_percent",
        "offline",
        "state",
        "reason",
        "total",
        "succeeded",
        "failed",
        "skipped",
        "requested_by",
        "created_at",
        "finished_at",
    )
    readonly_fields = fields


@admin.register(HostInventory)
class HostInventoryAdmin(ReadOnlyAdmin[HostInventory]):
    """The latest inventory reports of hosts, read-only."""

    list_display = ("host", "kind", "item_count", "updated_at")
    list_filter = ("kind",)
    search_fields = ("host__hostname",)
