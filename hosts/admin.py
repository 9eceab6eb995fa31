"""Admin of hosts, command executions and package operations."""
from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.http import HttpRequest

from hosts import services
from hosts.models import CommandExecution, Host, PackageOperation
from sysmanage.audit import request_actor

# The admin's "View site" link leads to the dashboards.
admin.site.site_url = "/"


class ReadOnlyAdmin(admin.ModelAdmin):
    """A record the server writes and people only read."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    """Hosts: status comes from the agent; the rest can be corrected by hand."""

    list_display = ("hostname", "status", "last_seen", "os_name", "os_version", "agent_version",
                    "has_token")
    list_filter = ("status", "os_name")
    search_fields = ("hostname", "fqdn")
    readonly_fields = ("id", "status", "last_seen", "token_issued_at", "token_revoked_at",
                       "created_at", "updated_at")
    actions = ["rotate_token", "revoke_token"]

    @admin.display(boolean=True, description="agent token")
    def has_token(self, obj: Host) -> bool:
        """Whether an agent can authenticate as this host."""
        return obj.has_token

    @admin.action(description="Issue a new agent token (shown once)")
    def rotate_token(self, request: HttpRequest, queryset: Any) -> None:
        """Rotate each selected host's token and show the new tokens once."""
        for host in queryset:
            _, token = services.host_rotate_token(host_id=host.pk, actor=request_actor(request))
            self.message_user(request, f"New agent token for {host.hostname} (shown only "
                              f"now): {token}", messages.WARNING)

    @admin.action(description="Revoke agent token")
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


@admin.register(CommandExecution)
class CommandExecutionAdmin(ReadOnlyAdmin):
    """Commands run on hosts, read-only."""

    list_display = ("command", "host", "status", "exit_code", "requested_by", "created_at")
    list_filter = ("status",)
    search_fields = ("command", "host__hostname")


@admin.register(PackageOperation)
class PackageOperationAdmin(ReadOnlyAdmin):
    """Package operations, read-only."""

    list_display = ("operation", "package", "host", "status", "progress", "created_at")
    list_filter = ("status", "operation")
    search_fields = ("package", "host__hostname")
