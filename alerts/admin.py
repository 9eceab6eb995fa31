"""Admin of alerts, with acknowledge and resolve actions."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from alerts import services
from alerts.evaluation import reload_rules
from alerts.models import Alert, AlertRule
from sysmanage import permissions
from sysmanage.audit import request_actor


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin[Alert]):
    """Alerts; state changes go through the services so that subscribers see them."""

    list_display = ("title", "severity", "status", "host", "category", "created_at")
    list_filter = ("severity", "status", "category")
    search_fields = ("title", "message", "host__hostname")
    readonly_fields = (
        "id",
        "status",
        "created_at",
        "updated_at",
        "acknowledged_by",
        "acknowledged_at",
        "resolved_by",
        "resolved_at",
    )
    actions = ["acknowledge", "resolve"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Raising alerts: the right the REST API asks too."""
        return permissions.can_raise_alerts(request.user)

    def has_change_permission(self, request: HttpRequest, obj: Alert | None = None) -> bool:
        """Changing alerts: the right the REST API and the sockets ask too."""
        return permissions.can_manage_alerts(request.user)

    def save_model(self, request: HttpRequest, obj: Alert, form: Any, change: bool) -> None:
        """New alerts are raised through the service."""
        if change:
            super().save_model(request, obj, form, change)
            return
        created = services.alert_raise(
            severity=obj.severity,
            category=obj.category,
            title=obj.title,
            message=obj.message,
            host=obj.host,
        )
        obj.pk = created.pk

    def _apply(
        self,
        request: HttpRequest,
        queryset: QuerySet[Alert],
        service: services.AlertTransition,
        verb: str,
    ) -> None:
        done = skipped = 0
        for alert in queryset:
            try:
                service(alert_id=alert.pk, actor=request_actor(request))
                done += 1
            except services.AlertStateError:
                skipped += 1
        self.message_user(
            request,
            f"{done} alert(s) {verb}; {skipped} skipped.",
            messages.SUCCESS if not skipped else messages.WARNING,
        )

    @admin.action(description="Acknowledge selected alerts", permissions=["change"])
    def acknowledge(self, request: HttpRequest, queryset: QuerySet[Alert]) -> None:
        """Acknowledge each open alert selected."""
        self._apply(request, queryset, services.alert_acknowledge, "acknowledged")

    @admin.action(description="Resolve selected alerts", permissions=["change"])
    def resolve(self, request: HttpRequest, queryset: QuerySet[Alert]) -> None:
        """Resolve each unresolved alert selected."""
        self._apply(request, queryset, services.alert_resolve, "resolved")


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin[AlertRule]):
    """Alert rules; every server process picks up edits within ALERT_RULES_RELOAD_SECONDS."""

    list_display = (
        "name",
        "metric",
        "warning_threshold",
        "critical_threshold",
        "sustained_samples",
        "clear_margin",
        "enabled",
    )
    list_editable = ("enabled",)
    list_filter = ("metric", "enabled")
    fieldsets = (
        (None, {"fields": ("name", "metric", "category", "enabled")}),
        (
            "Thresholds",
            {
                "fields": (
                    "warning_threshold",
                    "critical_threshold",
                    "sustained_samples",
                    "clear_margin",
                ),
                "description": "Disk, memory and CPU rules are in percent; the load "
                "rule is the 1-minute load average per CPU; the reboot rule is hours. "
                "The certificate rule is days until a certificate expires, where lower "
                "is worse: its warning threshold is at least its critical one (an "
                "expired certificate is critical; CA certificates are not judged). A "
                "rule for host offline needs no thresholds: set a critical threshold "
                "(any value) to raise critical alerts, or only a warning threshold for "
                "warnings.",
            },
        ),
    )

    def save_model(self, request: HttpRequest, obj: AlertRule, form: Any, change: bool) -> None:
        """Save, and let this process use the new rules at once."""
        super().save_model(request, obj, form, change)
        reload_rules()
