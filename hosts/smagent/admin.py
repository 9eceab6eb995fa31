"""Admin of SysManage-agent registrations, registration keys and deliveries, and the
host action that lets a SysManage agent register again.  Discovered by the admin as
this app's ``admin`` module; the models are the hosts app's."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.http import HttpRequest

from hosts.admin import HostAdmin, ReadOnlyAdmin, add_host_action
from hosts.models import AgentDelivery, AgentRegistration, RegistrationKey, RegistrationStatus
from hosts.smagent import enrollment
from hosts.smagent.enrollment import EnrollmentRefused
from sysmanage import permissions
from sysmanage.audit import request_actor


@admin.action(
    description="Let its SysManage agent register again (within an hour)",
    permissions=["manage_tokens"],
)
def allow_reregistration(modeladmin: HostAdmin, request: HttpRequest, queryset: Any) -> None:
    """For agents that lost their identity: their next registration gets a new token."""
    for host in queryset:
        try:
            enrollment.allow_reregistration(host_id=host.pk, actor=request_actor(request))
        except EnrollmentRefused as exc:
            modeladmin.message_user(request, exc.detail, messages.ERROR)
            continue
        modeladmin.message_user(
            request,
            f"The agent of {host.hostname} may register again within the next hour (once).",
        )


add_host_action(allow_reregistration)


@admin.register(AgentRegistration)
class AgentRegistrationAdmin(ReadOnlyAdmin[AgentRegistration]):
    """SysManage agents asking to be managed: approve or reject those waiting.  Deleting
    a rejected registration lets that host ask again."""

    list_display = (
        "hostname",
        "status",
        "for_host",
        "fqdn",
        "remote_address",
        "agent_version",
        "key",
        "created_at",
        "decided_by",
    )
    list_filter = ("status", ("for_host", admin.EmptyFieldListFilter))
    search_fields = ("hostname", "fqdn", "remote_address")
    actions = ["approve", "reject"]

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Seeing registrations: the right the REST API asks too."""
        return permissions.can_view_registrations(request.user)

    def has_decide_permission(self, request: HttpRequest) -> bool:
        """Approving and rejecting: the right the REST API asks too."""
        return permissions.can_decide_registrations(request.user)

    def _decide(self, request: HttpRequest, queryset: Any, decide: Any, done: str) -> None:
        count = 0
        for record in queryset.filter(status=RegistrationStatus.PENDING):
            try:
                decide(registration_id=record.pk, actor=request_actor(request))
                count += 1
            except EnrollmentRefused as exc:
                self.message_user(request, f"{record.hostname}: {exc.detail}", messages.ERROR)
        self.message_user(request, f"{done} {count} registration(s).")

    @admin.action(description="Approve: manage these hosts", permissions=["decide"])
    def approve(self, request: HttpRequest, queryset: Any) -> None:
        """Create the host of each selected waiting registration."""
        self._decide(request, queryset, enrollment.registration_approve, "Approved")

    @admin.action(description="Reject", permissions=["decide"])
    def reject(self, request: HttpRequest, queryset: Any) -> None:
        """Refuse each selected waiting registration."""
        self._decide(request, queryset, enrollment.registration_reject, "Rejected")


@admin.register(RegistrationKey)
class RegistrationKeyAdmin(admin.ModelAdmin[RegistrationKey]):
    """Keys that approve SysManage agents on registration; the key is shown once."""

    list_display = (
        "name",
        "key_prefix",
        "uses",
        "max_uses",
        "expires_at",
        "revoked_at",
        "usable",
        "group_names",
        "created_at",
    )
    fields = ("name", "max_uses", "expires_at", "groups")
    filter_horizontal = ("groups",)
    actions = ["revoke"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        """A key's groups can be changed; the rest is as it was created."""
        return ("name", "max_uses", "expires_at") if obj is not None else ()

    def get_queryset(self, request: HttpRequest) -> Any:
        """Keys with their groups, which the list shows."""
        return super().get_queryset(request).prefetch_related("groups")

    @admin.display(description="host groups")
    def group_names(self, obj: RegistrationKey) -> str:
        """The groups hosts registering with the key join."""
        return ", ".join(group.name for group in obj.groups.all())

    @admin.display(boolean=True)
    def usable(self, obj: RegistrationKey) -> bool:
        """Whether agents presenting the key are approved now."""
        return enrollment.key_problem(obj) is None

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Seeing keys: the right the REST API asks too."""
        return permissions.can_view_registration_keys(request.user)

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Creating keys: the right the REST API asks too."""
        return permissions.can_create_registration_keys(request.user)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Keys are created and revoked, and their groups changed, not otherwise edited:
        the right to revoke them."""
        return permissions.can_revoke_registration_keys(request.user)

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        """Revoking keys: the right the REST API asks too."""
        return permissions.can_revoke_registration_keys(request.user)

    def save_model(
        self, request: HttpRequest, obj: RegistrationKey, form: Any, change: bool
    ) -> None:
        """Create the key through the service and show it once (a change is only to its
        groups: :meth:`save_related`)."""
        if change:
            return
        key, secret = enrollment.key_create(
            name=obj.name,
            max_uses=obj.max_uses,
            expires_at=obj.expires_at,
            groups=list(form.cleaned_data.get("groups", [])),
            actor=request_actor(request),
        )
        obj.pk, obj.key_prefix, obj.created_at = key.pk, key.key_prefix, key.created_at
        self.message_user(
            request,
            f"Registration key {key.name} (shown only now): {secret} "
            "- put it in the agent's configuration as registration_key.",
            messages.WARNING,
        )

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        """A changed key's groups change through the service, which records who changed
        them; a new key has its groups already."""
        groups = form.cleaned_data.pop("groups", None)
        super().save_related(request, form, formsets, change)
        if change and groups is not None:
            enrollment.key_set_groups(
                key_id=form.instance.pk, groups=list(groups), actor=request_actor(request)
            )

    @admin.action(description="Revoke", permissions=["revoke"])
    def revoke(self, request: HttpRequest, queryset: Any) -> None:
        """Revoke each selected key."""
        for key in queryset:
            enrollment.key_revoke(key_id=key.pk, actor=request_actor(request))
        self.message_user(request, f"Revoked {queryset.count()} key(s).")


@admin.register(AgentDelivery)
class AgentDeliveryAdmin(ReadOnlyAdmin[AgentDelivery]):
    """Commands sent to SysManage agents and whether they acknowledged them, read-only."""

    list_display = ("command_type", "host", "state", "attempts", "sent_at", "acknowledged_at")
    list_filter = ("state", "command_type")
    search_fields = ("host__hostname",)
