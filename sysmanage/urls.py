"""HTTP routes: the dashboard pages, the admin, the REST API and its schema, and the
routes apps plug in (:mod:`sysmanage.plugins`)."""

from datetime import UTC, datetime

from django.conf import settings
from django.contrib import admin
from django.contrib.auth.views import LogoutView
from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView
from rest_framework.routers import DefaultRouter

from activity.api import (
    LoginTokenView,
    LogoutTokenView,
    RefreshTokenView,
    UserActivityViewSet,
)
from activity.views import ActivityView, DashboardLoginView, OverviewView
from alerts.api import AlertViewSet
from alerts.views import AlertListView
from hosts.api import (
    CommandExecutionViewSet,
    HostGroupViewSet,
    HostViewSet,
    PackageOperationViewSet,
)
from hosts.fleetapi import FleetRunViewSet
from hosts.views import FleetRunDetailView, FleetRunListView, HostDetailView, HostListView
from sysmanage import dbgate, drain, plugins
from sysmanage.dbthreads import in_database_threads
from sysmanage.metrics import metrics_view
from sysmanage.middleware import reported_elsewhere
from sysmanage.node import Node
from sysmanage.protocol import iso

router = DefaultRouter()
router.register("hosts", HostViewSet, basename="host")
router.register("host-groups", HostGroupViewSet, basename="host-group")
router.register("alerts", AlertViewSet, basename="alert")
router.register("activity", UserActivityViewSet, basename="activity")
router.register("commands", CommandExecutionViewSet, basename="command")
router.register("package-operations", PackageOperationViewSet, basename="package-operation")
router.register("fleet-runs", FleetRunViewSet, basename="fleet-run")
for prefix, viewset, basename in plugins.api_routes():
    router.register(prefix, viewset, basename=basename)


def health(request: HttpRequest) -> HttpResponse:
    """Liveness check for load balancers and the test harness."""
    return HttpResponse("ok", content_type="text/plain")


def _database_check() -> str:
    """``ok``, or why this process cannot use its database now."""
    outage = dbgate.gate().outage()
    if outage is not None:
        since, reason = outage
        return f"unreachable since {iso(since)}: {reason}"
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as exc:
        return f"{dbgate.unavailable(exc) or 'failing'}: {dbgate.first_line(exc)}"
    return "ok"


def _channel_layer_check() -> str:
    """``ok``, or since when this process cannot reach its channel layer (its clients
    then get no events)."""
    node = Node.current()
    if node is None:
        # No socket has started this process's node yet: ask Redis directly, so that a
        # process is not sent clients it could not serve.
        return _redis_check()
    down_since = node.layer_down_since
    if down_since is None:
        return "ok"
    return f"unreachable since {iso(datetime.fromtimestamp(down_since, UTC))}"


def _redis_check() -> str:
    """``ok`` when there is no Redis to reach or it answers a ping within a second."""
    if not settings.REDIS_URL:
        return "ok"
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"unreachable ({type(exc).__name__})"
    finally:
        client.close()
    return "ok"


def readiness(request: HttpRequest) -> JsonResponse:
    """Readiness check: 503 while this process drains before stopping, or cannot use its
    database or reach its channel layer, with what failed; 200 otherwise."""
    since = drain.draining_since()
    if since is not None:
        draining = {"status": "draining", "since": iso(datetime.fromtimestamp(since, UTC))}
        return reported_elsewhere(JsonResponse(draining, status=503))
    checks = {"database": _database_check(), "channel_layer": _channel_layer_check()}
    if all(result == "ok" for result in checks.values()):
        return JsonResponse({"status": "ready", "checks": checks})
    # Load balancers ask often; the faults themselves are logged where they are found.
    response = JsonResponse({"status": "unavailable", "checks": checks}, status=503)
    return reported_elsewhere(response)


urlpatterns = [
    path("", OverviewView.as_view(), name="dashboard-overview"),
    path("hosts/", HostListView.as_view(), name="dashboard-hosts"),
    path("hosts/<uuid:host_id>/", HostDetailView.as_view(), name="dashboard-host"),
    path("fleet-runs/", FleetRunListView.as_view(), name="dashboard-fleet-runs"),
    path("fleet-runs/<uuid:run_id>/", FleetRunDetailView.as_view(), name="dashboard-fleet-run"),
    path("alerts/", AlertListView.as_view(), name="dashboard-alerts"),
    path("activity/", ActivityView.as_view(), name="dashboard-activity"),
    path("login/", DashboardLoginView.as_view(), name="login"),
    path("logout/", LogoutView.as_view(next_page="login"), name="logout"),
    path("admin/", admin.site.urls),
    path("api/token/", LoginTokenView.as_view(), name="token_obtain_pair"),
    # In the database threads: a storm of refreshes queues there instead of making a
    # thread and a connection each (sysmanage/dbthreads.py).
    path(
        "api/token/refresh/",
        in_database_threads(RefreshTokenView.as_view()),
        name="token_refresh",
    ),
    path("api/token/logout/", LogoutTokenView.as_view(), name="token_logout"),
    # Routes of the apps that plug in (sysmanage.plugins).
    *(path("", include(module)) for module in plugins.url_modules()),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/", include(router.urls)),
    path("healthz", health, name="health"),
    path("readyz", readiness, name="readiness"),
    path("metrics", metrics_view, name="metrics"),
]
