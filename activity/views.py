"""
Pages of the activity app, and the pages that span every app: the login page and the
fleet overview. They live here because activity is the top of the app stack, the one
app that may read hosts, alerts and activity alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypedDict

from django.contrib.auth.views import LoginView
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.urls import reverse
from django.utils.http import urlencode
from django.views.generic import TemplateView

from activity import selectors
from activity.forms import LockoutAuthenticationForm
from activity.models import UserActivity
from alerts import selectors as alert_selectors
from alerts.models import Severity
from hosts import selectors as host_selectors
from hosts.models import RegistrationStatus
from hosts.views import DashboardMixin
from sysmanage import permissions

OVERVIEW_ACTIVITY_ROWS = 20
ACTIVITY_PAGE_ROWS = 100
#: How many rows the live activity page keeps before dropping the oldest.
ACTIVITY_PAGE_LIVE_ROWS = 500

#: Words for the recorded actions; the page scripts get the same table.
ACTION_LABELS = {
    "login": "Logged in",
    "logout": "Logged out",
    "login_failed": "Login failed",
    "login_locked": "Login refused (locked)",
    "command_run": "Ran a command",
    "package_operation_started": "Package operation",
    "alert_acknowledged": "Acknowledged an alert",
    "alert_resolved": "Resolved an alert",
    "host_enrolled": "Enrolled a host",
    "host_token_rotated": "Replaced a host token",
    "host_token_revoked": "Revoked a host token",
    "registration_approved": "Approved a host registration",
    "registration_rejected": "Rejected a host registration",
    "registration_key_created": "Created a registration key",
    "registration_key_revoked": "Revoked a registration key",
    "host_reregistration_allowed": "Let a host register again",
    "registration_key_changed": "Changed a registration key's host groups",
    "host_group_created": "Created a host group",
    "host_group_changed": "Changed a host group",
    "host_group_deleted": "Deleted a host group",
    "host_group_members_changed": "Changed the hosts of a host group",
    "host_groups_changed": "Changed the groups of a host",
    "host_group_grant_given": "Granted access to a host group",
    "host_group_grant_changed": "Changed access to a host group",
    "host_group_grant_removed": "Took away access to a host group",
    "host_updates_check": "Asked a host to check for updates",
    "fleet_run_started": "Started a fleet run",
}
#: Actions shown as warnings.
WARNING_ACTIONS = ("login_failed", "login_locked")
#: Identifiers in ``details`` that mean nothing to a reader.
HIDDEN_DETAILS = (
    "execution_id",
    "host_id",
    "alert_id",
    "activity_id",
    "group_id",
    "grant_id",
    "user_id",
)


class ActivityRow(TypedDict):
    """One activity record as the activity tables show it."""

    timestamp: datetime
    username: str
    action: str
    label: str
    warning: bool
    ip_address: str
    user_agent: str
    details: str


class ActivityScriptData(TypedDict):
    """What the activity scripts read from the page (``json_script``)."""

    activityRows: int
    actionLabels: dict[str, str]
    warningActions: list[str]
    hiddenDetails: list[str]


def details_text(details: Mapping[str, object]) -> str:
    """``details`` as one line, ``key: value · key: value``, without identifiers."""
    return " · ".join(
        f"{key}: {value}"
        for key, value in details.items()
        if key not in HIDDEN_DETAILS and value not in (None, "")
    )


def activity_row(record: UserActivity) -> ActivityRow:
    """One activity record as the activity tables show it."""
    return {
        "timestamp": record.timestamp,
        "username": record.username,
        "action": record.action,
        "label": ACTION_LABELS.get(record.action, record.action),
        "warning": record.action in WARNING_ACTIONS,
        "ip_address": record.ip_address or "",
        "user_agent": record.user_agent,
        "details": details_text(record.details),
    }


def activity_script_data(rows: int) -> ActivityScriptData:
    """What the activity scripts need: the row limit and the action words."""
    return {
        "activityRows": rows,
        "actionLabels": ACTION_LABELS,
        "warningActions": list(WARNING_ACTIONS),
        "hiddenDetails": list(HIDDEN_DETAILS),
    }


def pending_registrations_url() -> str:
    """The admin's list of SysManage agent registrations waiting for approval."""
    query = urlencode({"status__exact": RegistrationStatus.PENDING.value})
    return f"{reverse('admin:hosts_agentregistration_changelist')}?{query}"


class DashboardLoginView(LoginView):
    """``/login/``: Django's login view with the lockout-aware form."""

    form_class = LockoutAuthenticationForm
    template_name = "registration/login.html"
    redirect_authenticated_user = True
    next_page = "dashboard-overview"


class OverviewView(DashboardMixin, TemplateView):
    """``/``: fleet figures, active alerts by severity and, for staff, registrations
    waiting for approval and recent activity.

    Anonymous visitors get the login form here with 200 (not a redirect): SysManage
    agents check that ``GET /`` answers 200 before every connection attempt.
    """

    template_name = "activity/overview.html"
    nav_section = "overview"

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        """Show the login form to anonymous visitors; the overview to everyone else."""
        if not request.user.is_authenticated:
            return DashboardLoginView.as_view()(request, *args, **kwargs)
        return super().dispatch(request, *args, **kwargs)

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        """Figures and counts as they are now; the page script keeps them current."""
        can_view_activity = permissions.can_view_activity(self.request.user)
        scope = permissions.host_scope(self.request.user)
        counts = alert_selectors.alert_severity_counts(scope=scope)
        return {
            **super().get_context_data(**kwargs),
            # Registrations are approved in the admin; the count is as of page load.
            "pending_registrations": (
                host_selectors.registration_pending_count()
                if permissions.can_view_registrations(self.request.user)
                else 0
            ),
            "pending_registrations_url": pending_registrations_url(),
            "fleet": alert_selectors.fleet_stats(scope),
            "alert_counts": [
                (value, label, counts[value]) for value, label in reversed(Severity.choices)
            ],
            "active_alerts": sum(counts.values()),
            "activities": (
                [activity_row(r) for r in selectors.activity_recent(limit=OVERVIEW_ACTIVITY_ROWS)]
                if can_view_activity
                else []
            ),
            "page_data": {
                "canViewActivity": can_view_activity,
                **activity_script_data(OVERVIEW_ACTIVITY_ROWS),
            },
        }


class ActivityView(DashboardMixin, TemplateView):
    """``/activity/`` (staff only): the live user activity stream."""

    template_name = "activity/activity_list.html"
    nav_section = "activity"
    required_permission = staticmethod(permissions.can_view_activity)

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        """The most recent records; the page script prepends new ones as they happen."""
        records = selectors.activity_recent(limit=ACTIVITY_PAGE_ROWS)
        return {
            **super().get_context_data(**kwargs),
            "activities": [activity_row(r) for r in records],
            "page_data": activity_script_data(ACTIVITY_PAGE_LIVE_ROWS),
        }
