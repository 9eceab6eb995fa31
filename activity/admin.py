"""Admin of the activity log (read-only) and of the failed-login counters."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from activity.forms import LockoutAdminAuthenticationForm
from activity.models import LoginCounter, UserActivity
from sysmanage import permissions

# Session logins (admin, dashboards) refuse locked-out accounts and addresses.
admin.site.login_form = LockoutAdminAuthenticationForm


@admin.register(UserActivity)
class UserActivityAdmin(admin.ModelAdmin[UserActivity]):
    """What users did; nobody edits history."""

    list_display = ("timestamp", "username", "action", "ip_address")
    list_filter = ("action",)
    search_fields = ("username", "ip_address")
    date_hierarchy = "timestamp"

    def has_view_permission(self, request: HttpRequest, obj: UserActivity | None = None) -> bool:
        """Reading the log: the right the REST API, the sockets and the pages ask too."""
        return permissions.can_view_activity(request.user)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: UserActivity | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: UserActivity | None = None) -> bool:
        return False


@admin.register(LoginCounter)
class LoginCounterAdmin(admin.ModelAdmin[LoginCounter]):
    """Failed-login counters (``activity/lockout.py``): deleting one lifts its lock or
    slow-down at once, e.g. for an owner locked out at their own address."""

    list_display = ("scope", "key", "failures", "window_started", "blocked_until")
    list_filter = ("scope",)
    search_fields = ("key",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: LoginCounter | None = None) -> bool:
        return False
