"""Pages of the alerts app: the alerts table, filtered by severity and state."""

from __future__ import annotations

from typing import Any

from django.core.paginator import Paginator
from django.http import QueryDict
from django.views.generic import TemplateView

from alerts import selectors
from alerts.models import AlertStatus, Severity
from hosts.views import DashboardMixin
from sysmanage import permissions

ALERTS_PER_PAGE = 100
#: States shown when the filter form was never submitted: what still needs attention.
DEFAULT_STATES = [AlertStatus.OPEN.value, AlertStatus.ACKNOWLEDGED.value]


def chosen_values(
    params: QueryDict, name: str, choices: list[str], default: list[str]
) -> list[str]:
    """The known values of a multi-select parameter, in ``choices`` order.

    Accepts repeated parameters (``?status=open&status=resolved``) and commas
    (``?status=open,resolved``), as the REST API does. Without the parameter, ``default``;
    once the form was submitted (``filtered``), nothing chosen means no restriction.
    """
    raw = {part for value in params.getlist(name) for part in value.split(",")}
    values = [choice for choice in choices if choice in raw]
    if values or "filtered" in params:
        return values
    return list(default)


class AlertListView(DashboardMixin, TemplateView):
    """``/alerts/``: alerts, newest first, filtered by severity and state, updated live."""

    template_name = "alerts/alert_list.html"
    nav_section = "alerts"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        """The chosen filters, one page of matching alerts, and the user's rights."""
        params = self.request.GET
        severities = chosen_values(params, "severity", Severity.values, [])
        states = chosen_values(params, "status", AlertStatus.values, DEFAULT_STATES)
        alerts = permissions.visible(
            selectors.alert_list(severity=severities or None, status=states or None),
            self.request.user,
            hostless=True,
        )
        page = Paginator(alerts, ALERTS_PER_PAGE).get_page(params.get("page"))
        can_manage = permissions.may_anywhere(self.request.user, "manage_alert")
        return {
            **super().get_context_data(**kwargs),
            "page_obj": page,
            "alerts": page.object_list,
            "severity_choices": Severity.choices,
            "state_choices": AlertStatus.choices,
            "severities": severities,
            "states": states,
            "showing_default": states == DEFAULT_STATES and not severities,
            "can_manage_alerts": can_manage,
            "page_data": {
                "severities": severities,
                "states": states,
                "canManageAlerts": can_manage,
                "firstPage": page.number == 1,
                "count": page.paginator.count,
            },
        }
