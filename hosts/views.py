"""
Pages of the hosts app: the hosts table, one host's page, and the fleet runs.

Also home of :class:`DashboardMixin`, which every dashboard page uses; the alerts and
activity pages import it from here (higher apps may import lower ones).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponseBase
from django.shortcuts import get_object_or_404
from django.views.generic import TemplateView

from hosts import selectors
from hosts.fleetruns import fleet_run_data
from hosts.models import FleetRun, Host
from sysmanage import permissions
from sysmanage.protocol import iso


class DashboardMixin(LoginRequiredMixin):
    """A dashboard page: login required, optionally a permission, and the navigation.

    ``required_permission`` is one of the :mod:`sysmanage.permissions` predicates; a
    logged-in user who fails it gets 403 (anonymous visitors go to the login page).
    """

    nav_section = ""
    required_permission: Callable[[Any], bool] | None = None

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        """Refuse logged-in users without the page's permission; the rest as usual."""
        check = type(self).required_permission
        if request.user.is_authenticated and check is not None and not check(request.user):
            raise PermissionDenied("You do not have permission to see this page.")
        return super().dispatch(request, *args, **kwargs)

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        """Add what the navigation shows to this user."""
        context: dict[str, Any] = super().get_context_data(**kwargs)  # type: ignore[misc]
        user = self.request.user  # type: ignore[attr-defined]
        context.update(
            nav_section=self.nav_section,
            can_view_activity=permissions.can_view_activity(user),
            can_use_admin=permissions.can_use_admin(user),
        )
        return context


class HostListView(DashboardMixin, TemplateView):
    """``/hosts/``: every host (or those in the group ``?group=`` names, or matching
    ``?q=``), with its groups and live status, and for those who may watch every host's
    metrics at once, live CPU and memory."""

    template_name = "hosts/host_list.html"
    nav_section = "hosts"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        """The hosts matching the search in the group, and how many the group (or the
        fleet) has in all."""
        query = self.request.GET.get("q", "").strip()[:255]
        group = self.request.GET.get("group", "").strip()[:100] or None
        scope = permissions.host_scope(self.request.user)
        hosts = list(selectors.host_list(search=query or None, group=group, visible=scope))
        if not query:
            total = len(hosts)
        elif group:
            total = selectors.host_list(group=group, visible=scope).count()
        else:
            total = selectors.host_counts(scope)["total_hosts"]
        groups = list(selectors.host_group_list(scope))
        if group is not None:
            # the group as it is named, however the address spelled it
            group = next((g.name for g in groups if g.name.lower() == group.lower()), group)
        live_metrics = permissions.can_watch_fleet_metrics(self.request.user)
        return {
            **super().get_context_data(**kwargs),
            "query": query,
            "group": group,
            "groups": groups,
            "group_known": group is None or any(g.name.lower() == group.lower() for g in groups),
            "hosts": hosts,
            "total_hosts": total,
            "live_metrics": live_metrics,
            "can_run_commands": permissions.can_run_commands(self.request.user),
            "page_data": {"liveMetrics": live_metrics, "group": group},
        }


class HostDetailView(DashboardMixin, TemplateView):
    """``/hosts/<uuid>/``: a host's facts and inventory, live charts, console, packages
    and alerts."""

    template_name = "hosts/host_detail.html"
    nav_section = "hosts"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        """The host, its inventory, what this user may do to it, and the data its page
        script needs."""
        user = self.request.user
        host = get_object_or_404(
            selectors.host_list(visible=permissions.scope_query(user)), pk=kwargs["host_id"]
        )
        can_run = permissions.may_on_host(user, "run_command", host.pk)
        can_manage = permissions.may_on_host(user, "manage_alert", host.pk)
        return {
            **super().get_context_data(**kwargs),
            "host": host,
            "inventory": selectors.host_inventory_view(host.pk),
            "patch": selectors.host_patch_view(host.pk),
            "certs": selectors.host_certificates_view(host.pk),
            "can_run_commands": can_run,
            "can_manage_alerts": can_manage,
            "can_patch_and_reboot": permissions.may_on_host(user, "patch_reboot", host.pk),
            "page_data": host_page_data(
                host,
                username=user.get_username(),
                can_run_commands=can_run,
                can_manage_alerts=can_manage,
            ),
        }


def host_page_data(
    host: Host, *, username: str, can_run_commands: bool, can_manage_alerts: bool
) -> dict[str, Any]:
    """What the host page's script starts from (rendered with ``json_script``); ``username``
    tells the page which commands on the host are its user's."""
    return {
        "hostId": str(host.id),
        "username": username,
        "hostname": host.hostname,
        "status": host.status,
        "lastSeen": iso(host.last_seen),
        "cpuCount": host.cpu_count,
        "canRunCommands": can_run_commands,
        "canManageAlerts": can_manage_alerts,
        "offlineAfterSeconds": settings.HOST_OFFLINE_AFTER_SECONDS,
    }


class FleetRunListView(DashboardMixin, TemplateView):
    """``/fleet-runs/``: start a command on a host group and/or the hosts a search matches
    (``?group=`` and ``?q=`` fill them in) and the latest runs with their outcome."""

    template_name = "hosts/fleet_run_list.html"
    nav_section = "fleet-runs"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        """The groups to choose from (their hosts counted over those this user sees),
        and the latest runs as this user may see them."""
        user = self.request.user
        group = self.request.GET.get("group", "").strip()[:100]
        query = self.request.GET.get("q", "").strip()[:255]
        runs = [
            _run_view(run, user)
            for run in permissions.fleet_runs_visible(
                FleetRun.objects.select_related("requested_by"), self.request.user
            )[:RECENT_RUNS]
        ]
        return {
            **super().get_context_data(**kwargs),
            "groups": list(selectors.host_group_list(permissions.scope_query(user))),
            "group": group,
            "query": query,
            "runs": runs,
            "can_run_commands": permissions.can_run_commands(user),
        }


class FleetRunDetailView(DashboardMixin, TemplateView):
    """``/fleet-runs/<uuid>/``: one run, its counts and each host's outcome, live."""

    template_name = "hosts/fleet_run_detail.html"
    nav_section = "fleet-runs"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        """The run with its hosts, and what the page's script starts from."""
        run = get_object_or_404(
            permissions.fleet_runs_visible(
                FleetRun.objects.select_related("requested_by"), self.request.user
            ),
            pk=kwargs["run_id"],
        )
        view = _run_view(run, self.request.user)
        return {
            **super().get_context_data(**kwargs),
            "run": view,
            "hosts": view["data"]["hosts"],
            "page_data": {"runId": str(run.id), "state": run.state},
        }


#: Runs the list page shows.
RECENT_RUNS = 50


def _run_view(run: FleetRun, user: Any) -> dict[str, Any]:
    """A run for a page: its API data (with hosts) and whether ``user`` sees its command."""
    data = fleet_run_data(run, with_hosts=True)
    visible = permissions.can_see_command_output(user, run.requested_by_id)
    return {"data": data, "command_visible": visible, "run": run}
