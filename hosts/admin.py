"""Admin of hosts, command executions and package operations."""
from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from hosts import services
from hosts.models import CommandExecution, Host, PackageOperation


class ReadOnlyAdmin(admin.ModelAdmin):
    """A record the server writes and people only read."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    """Hosts: status comes from the agent; the rest can be corrected by hand."""

    list_display = ("hostname", "status", "last_seen", "os_name", "os_version", "agent_version")
    list_filter = ("status", "os_name")
    search_fields = ("hostname", "fqdn")
    readonly_fields = ("id", "status", "last_seen", "created_at", "updated_at")

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
